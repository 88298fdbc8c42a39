"""A checkpoint folder that already holds a job ([Note: used folders] in ps/jobdir.py).

The server says what the folder holds and what it does: an unfinished job is resumed with no
flag (a restart after a crash), a finished one is refused (exit 2, naming its step and the
ways out) instead of "resumed" into a 0-step run that exits 0, ``--resume always|never`` choose,
another model names the checkpoint θ came from, and two servers never share one folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError, RemoteError
from ps import checkpoint, jobdir
from tests.procs import Procs
from worker.client import PSClient

W = {"w": torch.zeros(2, dtype=torch.float64)}
ONES = {"w": torch.ones(2, dtype=torch.float64)}


def _ckpt(d: Path, step: int) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    checkpoint.save_checkpoint(d, step, {"w": torch.full((2,), float(step))}, opt.state_dict(),
                               {"versions": {"w": step}})


def _final(d: Path, step: int | None) -> None:
    checkpoint.save_final(d, {"w": [torch.zeros(2)]}, step)


# ---------------------------------------------------------------- what a folder holds (units)
def test_the_states_of_a_folder(tmp_path: Path) -> None:
    assert jobdir.survey(tmp_path / "absent").state == "new"
    assert jobdir.survey(tmp_path).state == "new"
    _ckpt(tmp_path, 0)
    _ckpt(tmp_path, 40)
    f = jobdir.survey(tmp_path)
    assert (f.state, f.step, f.keys) == ("unfinished", 40, ("w",))
    _final(tmp_path, 40)
    assert (jobdir.survey(tmp_path).state, jobdir.survey(tmp_path).step) == ("finished", 40)
    _ckpt(tmp_path, 45)  # resumed with --resume always and trained further, then crashed
    assert jobdir.survey(tmp_path).state == "unfinished"
    _final(tmp_path, None)  # a final file of an older zmqps (no step): finished
    assert jobdir.survey(tmp_path).state == "finished"


def test_auto_refuses_a_finished_job_naming_it_and_the_choices(tmp_path: Path) -> None:
    _ckpt(tmp_path, 100)
    _final(tmp_path, 100)
    with pytest.raises(ConfigError) as e:
        jobdir.decide(jobdir.survey(tmp_path), "auto")
    text = str(e.value)
    assert "holds a finished job: final.safetensors of step 100" in text
    for choice in ("--checkpoint-dir OTHER", "--resume never", "--resume always"):
        assert choice in text


def test_auto_resumes_an_unfinished_job_and_always_a_finished_one(tmp_path: Path) -> None:
    _ckpt(tmp_path, 8)
    d = jobdir.decide(jobdir.survey(tmp_path), "auto")
    assert d.resume and "holds an unfinished job" in d.message and "step 8" in d.message
    _final(tmp_path, 8)
    d = jobdir.decide(jobdir.survey(tmp_path), "always")
    assert d.resume and "resuming it at step 8 as asked" in d.message


def test_never_moves_the_old_job_aside_and_deletes_nothing(tmp_path: Path) -> None:
    _ckpt(tmp_path, 4)
    _ckpt(tmp_path, 8)
    _final(tmp_path, 8)
    log = tmp_path / "metrics.jsonl"
    log.write_text("{}\n")
    d = jobdir.decide(jobdir.survey(tmp_path), "never", [log])
    assert not d.resume and "a new job starts" in d.message
    (aside,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt-000000004.safetensors", "ckpt-000000008.safetensors",
                                                       "final.safetensors", "metrics.jsonl"]
    assert jobdir.survey(tmp_path).state == "new" and str(aside) in d.message


def test_a_final_file_alone_cannot_be_resumed(tmp_path: Path) -> None:
    _final(tmp_path, 5)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        jobdir.decide(jobdir.survey(tmp_path), "always")


# ---------------------------------------------------------------- real servers
def _train(endpoint: str, steps: int) -> None:
    with PSClient(endpoint, 0, 1, timeout=60) as ps:
        ps.init(dict(W))
        for step in range(ps.step, steps):
            ps.push_pull(dict(ONES), step)
        ps.done()


def _second_server(procs: Procs, ckpt: Path, *args: str):
    return procs.spawn("server again", [sys.executable, "-m", "ps", "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                                        "--checkpoint-dir", str(ckpt), *args])


@pytest.mark.timeout(240)
def test_a_server_on_a_finished_job_exits_2_instead_of_training_nothing(procs: Procs) -> None:
    ckpt = procs.tmp / "ck"
    server, ep = procs.server(1, ckpt=ckpt)
    _train(ep, 5)
    assert server.wait(60) == 0
    again = _second_server(procs, ckpt)
    assert again.wait(60) == 2, again.output()
    out = again.output()
    assert "holds a finished job: final.safetensors of step 5" in out and "--resume always" in out
    assert "listening" not in out
    # --resume always: trains it further (a worker with more steps)
    server, ep = procs.server(1, "--resume", "always", ckpt=ckpt)
    with PSClient(ep, 0, 1, timeout=60) as ps:
        ps.init(dict(W))
        assert ps.step == 5
        ps.push_pull(dict(ONES), 5)
        ps.done()
    assert server.wait(60) == 0
    assert "resuming it at step 5 as asked (--resume always)" in server.output()
    # --resume never: the old job goes aside, a new one starts at step 0
    server, ep = procs.server(1, "--resume", "never", ckpt=ckpt)
    _train(ep, 2)
    assert server.wait(60) == 0
    assert "moved its files into" in server.output()
    (aside,) = ckpt.glob("previous-*")
    assert (aside / "final.safetensors").exists() and jobdir.survey(ckpt).step == 2


@pytest.mark.timeout(240)
def test_another_model_in_a_used_folder_names_the_old_checkpoint(procs: Procs) -> None:
    ckpt = procs.tmp / "ck"
    server, ep = procs.server(1, "--checkpoint-every", "1", ckpt=ckpt)
    with PSClient(ep, 0, 1, timeout=60) as ps:  # a job that never finishes (its process dies)
        ps.init(dict(W))
        ps.push_pull(dict(ONES), 0)
    deadline = time.monotonic() + 30  # step 1's checkpoint is written off the loop: let it land
    while not list(ckpt.rglob("ckpt-000000001.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    server.wait(30)
    server, ep = procs.server(1, ckpt=ckpt)
    assert "holds an unfinished job" in server.output() and "resuming it" in server.output()
    with PSClient(ep, 0, 1, timeout=60) as ps, pytest.raises(RemoteError) as e:
        ps.init({"0.weight": torch.zeros(3)})
    text = str(e.value)
    assert "SCHEMA_MISMATCH" in text and "ckpt-000000001.safetensors" in text
    assert "--checkpoint-dir" in text and "--resume never" in text


@pytest.mark.timeout(240)
def test_two_servers_never_share_a_checkpoint_folder(procs: Procs) -> None:
    ckpt = procs.tmp / "ck"
    first, _ = procs.server(1, ckpt=ckpt)
    second = _second_server(procs, ckpt)
    assert second.wait(60) == 2, second.output()
    assert f"is in use by process {first.pid}" in second.output()
    first.kill()  # a dead server's claim goes with it
    first.wait(30)
    third, _ = procs.server(1, ckpt=ckpt)
    assert third.proc.poll() is None


@pytest.mark.timeout(300)
def test_launch_with_a_config_naming_a_finished_folder_fails_and_says_why(procs: Procs, tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    conf = tmp_path / "job.toml"
    conf.write_text(f'checkpoint_dir = "{ckpt}"\nepochs = 1\nprogress = "off"\n')
    argv = [sys.executable, "-m", "worker.launch", "--config", str(conf)]
    first = procs.spawn("launch", argv)
    assert first.wait(180) == 0, first.output()
    second = procs.spawn("launch again", argv)
    assert second.wait(180) == 2, second.output()  # the server's configuration error, passed on
    out = second.output(20000)
    assert "holds a finished job: final.safetensors of step 10" in out and "done: 0 steps" not in out


@pytest.mark.timeout(300)
def test_a_new_job_in_a_used_folder_starts_its_own_held_out_log(procs: Procs, tmp_path: Path) -> None:
    """``--resume never`` moves the old job's ``eval.jsonl`` (ps-launch's default ``--eval-log``) aside with
    it, so the new job's held-out curve does not continue the old one's."""
    ckpt = tmp_path / "ck"
    job = [sys.executable, "-m", "worker.launch", "--workers", "1", "--model", "tests.jobs:linear64",
           "--data", "tests.jobs:data64", "--eval-data", "tests.jobs:data64", "--eval-every", "5",
           "--eval-rows", "100", "--batch-size", "100", "--progress", "off", "--checkpoint-dir", str(ckpt)]
    first = procs.spawn("launch", [*job, "--epochs", "1"])
    procs.wait_ok([first], timeout=180)
    old = (ckpt / "eval.jsonl").read_text()
    assert [json.loads(line)["step"] for line in old.splitlines()] == [0, 5, 10]  # 10 steps of 100 rows
    second = procs.spawn("launch again", [*job, "--epochs", "2", "--resume", "never"])
    procs.wait_ok([second], timeout=180)
    assert "moved its files into" in second.output(20000)
    (aside,) = ckpt.glob("previous-*")
    assert (aside / "eval.jsonl").read_text() == old  # the old job's curve, whole, beside its checkpoints
    new = [json.loads(line)["step"] for line in (ckpt / "eval.jsonl").read_text().splitlines()]
    assert new == [0, 5, 10, 15, 20]  # the new job's only
