"""The README's Python snippets run as written, against real processes, so they cannot drift.

Each snippet follows a ``<!-- snippet: NAME -->`` marker. The only edits before running one
are the ones a reader makes: the server's address (the test's server picks a free port) and
the run folder of the default job.
"""

from __future__ import annotations

import re
import sys

import pytest
from safetensors.torch import load_file

from tests.procs import ROOT, Procs

ADDRESS = "tcp://127.0.0.1:5555"


def snippets() -> dict[str, str]:
    """Every marked snippet of the README by name."""
    text = (ROOT / "README.md").read_text()
    found = dict(re.findall(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S))
    assert {"load-final", "client-loop", "distributed-optimizer"} <= set(found), sorted(found)
    return found


def run_snippet(procs: Procs, name: str, code: str) -> None:
    path = procs.tmp / f"{name}.py"
    path.write_text(code)
    child = procs.spawn(f"snippet {name}", [sys.executable, str(path)], cwd=procs.tmp)
    assert child.wait(180) == 0, f"README snippet {name!r} failed:\n{child.output()}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["client-loop", "distributed-optimizer"])
def test_a_loop_snippet_trains_through_a_server(procs: Procs, name: str) -> None:
    code = snippets()[name]
    assert ADDRESS in code
    server, ep = procs.server(1)
    run_snippet(procs, name, code.replace(ADDRESS, ep))
    assert server.wait(60) == 0, server.output()
    final = load_file(str(procs.tmp / "ckpt" / "final.safetensors"))
    if name == "client-loop":  # the whole state_dict: BatchNorm's buffers are in θ and moved
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(final)
        assert int(final["1.num_batches_tracked"]) == 100


@pytest.mark.timeout(300)
def test_the_final_file_of_the_default_job_loads_as_the_snippet_says(procs: Procs) -> None:
    ck = procs.tmp / "runs" / "launch-test"
    launch = procs.spawn("launch", [sys.executable, "-m", "worker.launch", "--epochs", "1", "--checkpoint-dir",
                                    str(ck), "--progress", "off"])
    assert launch.wait(180) == 0, launch.output()
    code = snippets()["load-final"]
    run_snippet(procs, "load-final", re.sub(r'"runs/launch-[^"]+"', f'"{ck / "final.safetensors"}"', code))
