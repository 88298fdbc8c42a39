"""The README's walk-through runs as written, in a fresh folder, with the installed commands.

Each ``<!-- walkthrough: NAME -->`` marker is followed by a ```bash block; each
``<!-- file: NAME -->`` by a block a reader saves under that name. The blocks run with
``.venv/bin`` first on ``PATH`` (step 1 of the README), through ``bash``. The only edit is the
one a reader on a busy machine makes: the port. The by-hand server binds a port the OS picks
(``tcp://127.0.0.1:0`` for ``tcp://0.0.0.0:5555``, reported through ``--ready-file``) and the
workers' ``tcp://127.0.0.1:5555`` becomes that endpoint. ``make run`` before step 3 is run as
what it runs (``ps-launch``) in the test's folder.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT, Child, Procs

BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
SERVER_BIND, WORKER_SERVER = "tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555"

pytestmark = pytest.mark.timeout(300)


def block(name: str) -> list[str]:
    """The command lines of the walk-through block ``name`` (comments left to bash)."""
    m = re.search(rf"<!-- walkthrough: {re.escape(name)} -->\n```bash\n(.*?)```", README, flags=re.S)
    assert m, f"README has no walk-through block {name!r}"
    return [ln for ln in m.group(1).splitlines() if ln.strip()]


def saved_file(name: str) -> str:
    m = re.search(rf"<!-- file: {re.escape(name)} -->\n```python\n(.*?)```", README, flags=re.S)
    assert m, f"README has no file block {name!r}"
    return m.group(1)


def env() -> dict[str, str]:
    import os

    return {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def bash(procs: Procs, name: str, script: str, cwd: Path) -> Child:
    return procs.spawn(name, ["bash", "-c", script], env=env(), cwd=cwd)


def _ready(path: Path, child: Child, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        assert child.proc.poll() is None, child.output()
        time.sleep(0.05)
    raise AssertionError(f"no endpoint after {timeout}s:\n{child.output()}")


def _server_line(line: str, ready: Path) -> str:
    assert SERVER_BIND in line and line.split()[0] == "ps-server", line
    return line.replace(SERVER_BIND, "tcp://127.0.0.1:0") + f" --ready-file {shlex.quote(str(ready))}"


def test_look_at_the_result_of_the_default_job(procs: Procs, tmp_path: Path) -> None:
    run = procs.spawn("make run", [str(BIN / "ps-launch")], env=env(), cwd=tmp_path)
    assert run.wait(180) == 0, run.output()
    look = bash(procs, "look", "\n".join(block("look")), tmp_path)
    assert look.wait(120) == 0, look.output()
    listing = look.output()
    for name in ("final.safetensors", "metrics.jsonl", "ckpt-000000100.safetensors"):
        assert name in listing, listing
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_your_model_learns(procs: Procs, tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(saved_file("mymodel.py"))
    job = bash(procs, "your model", "\n".join(block("your-model")), tmp_path)
    assert job.wait(240) == 0, job.output()
    (log,) = tmp_path.glob("runs/launch-*/metrics.jsonl")
    losses = [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r.get("ev") == "update"]
    assert len(losses) == 100 and losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_server_and_workers_by_hand_then_the_same_server_again(procs: Procs, tmp_path: Path) -> None:
    server_line, *worker_lines = block("by-hand")
    assert len(worker_lines) == 2 and all(WORKER_SERVER in w for w in worker_lines)
    ready = tmp_path / "ready"
    server = bash(procs, "server", _server_line(server_line, ready), tmp_path)
    ep = _ready(ready, server)
    workers = [bash(procs, f"worker {k}", w.replace(WORKER_SERVER, ep), tmp_path) for k, w in enumerate(worker_lines)]
    procs.wait_ok([*workers, server], timeout=180)
    assert (tmp_path / "ckpt" / "final.safetensors").exists()
    assert "holds no job: a new job starts" in server.output(20000)
    # the same server command again: the finished job is named, nothing "resumes", exit 2
    (again_line,) = block("by-hand-again")
    assert again_line == server_line
    ready.unlink()
    again = bash(procs, "server again", _server_line(again_line, ready), tmp_path)
    assert again.wait(60) == 2, again.output()
    out = again.output()
    assert "ckpt holds a finished job: final.safetensors of step 100" in out, out
    assert "--resume never" in out and "--checkpoint-dir OTHER" in out and not ready.exists()
    # the README's way out: --resume never starts a new job (the old one moves aside)
    fresh = bash(procs, "server fresh", _server_line(again_line, ready) + " --resume never", tmp_path)
    _ready(ready, fresh)
    assert list((tmp_path / "ckpt").glob("previous-*/final.safetensors"))
