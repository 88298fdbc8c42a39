"""Background checkpoints (ps.snapshot): the file holds the cut exactly while θ moves on.

A writer is held inside its first tensor while the optimizer (Adam: θ and two slots per key)
applies more updates; the file must still equal a deep copy taken at the cut, bit for bit,
and the same scenario without the copy-on-write hook must not (so the test can fail). Then
a real server with ``--checkpoint-every 1`` writes every step's checkpoint in the background,
and each must equal θ of that step from the single-process reference.
"""

from __future__ import annotations

import threading

import pytest
import torch

from common.config import ServerConfig
from ps import checkpoint
from ps.snapshot import BackgroundSaver, checkpoint_snapshot
from ps.store import ParameterStore
from tests import jobs
from tests.faultjob import BATCH, EPOCHS, SERVER, STEPS, TOL, WORLD, fork_server, fork_worker
from tests.reference import replay

pytestmark = pytest.mark.timeout(120)


class HeldFile:
    """A file whose first data write (after the header) waits until released."""

    def __init__(self, f, entered: threading.Event, release: threading.Event) -> None:
        self.f, self.entered, self.release, self.n = f, entered, release, 0

    def write(self, b) -> int:
        self.n += 1
        if self.n == 2:
            self.entered.set()
            assert self.release.wait(30)
        return self.f.write(b)


def _store(tmp_path) -> ParameterStore:
    st = ParameterStore(ServerConfig(workers=1, optimizer="adam", lr=0.1, checkpoint_dir=str(tmp_path)))
    g = torch.Generator().manual_seed(0)
    st.initialize({k: torch.randn(64, 8, dtype=torch.float64, generator=g) for k in ("a", "b", "c")})
    st.apply({k: torch.randn(64, 8, dtype=torch.float64, generator=g) for k in st.params})
    return st


def _cut(st: ParameterStore) -> tuple[dict, dict]:
    theta = {k: p.detach().clone() for k, p in st.params.items()}
    state = {i: {s: v.clone() for s, v in slots.items()} for i, slots in st.optimizer.state_dict()["state"].items()}
    return theta, state


def _run(tmp_path, protect: bool) -> tuple[bool, int]:
    st = _store(tmp_path)
    theta, state = _cut(st)
    saver = BackgroundSaver()
    st.before_update = saver.protect if protect else None
    snap = checkpoint_snapshot(1, st.params, st.optimizer, {"versions": st.versions})
    entered, release = threading.Event(), threading.Event()
    saver.start(1, snap, lambda s: checkpoint.write_checkpoint(tmp_path, 1, lambda f: s.write(HeldFile(f, entered, release))))
    assert entered.wait(30)  # the writer is inside the first tensor (param/a)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # keys the writer has not reached change in place, twice
        st.apply({k: torch.randn(64, 8, dtype=torch.float64, generator=g) for k in ("b", "c")})
    release.set()
    st.apply({"a": torch.randn(64, 8, dtype=torch.float64, generator=g)})
    done = saver.wait()
    assert done is not None and done.error is None and done.step == 1
    params, opt_state, meta = checkpoint.load_checkpoint(done.path)
    same = all(torch.equal(params[k], theta[k]) for k in theta) and all(
        torch.equal(opt_state["state"][i][s], state[i][s]) for i in state for s in state[i])
    assert meta["versions"] == {"a": 1, "b": 1, "c": 1}
    return same, done.cloned_bytes


def test_the_file_holds_the_cut_while_theta_and_the_slots_move_on(tmp_path):
    same, cloned = _run(tmp_path, protect=True)
    assert same
    assert cloned >= 2 * 3 * 64 * 8 * 8  # b and c: θ and both Adam slots were kept


def test_without_copy_on_write_the_same_file_would_be_torn(tmp_path):
    same, cloned = _run(tmp_path, protect=False)
    assert not same and cloned == 0


def test_one_checkpoint_at_a_time_and_a_failed_write_is_reported(tmp_path):
    st = _store(tmp_path)
    saver = BackgroundSaver()
    snap = checkpoint_snapshot(1, st.params, st.optimizer, {})
    saver.start(1, snap, lambda s: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(RuntimeError, match="already"):
        saver.start(2, snap, lambda s: tmp_path)
    done = saver.wait()
    assert isinstance(done.error, OSError) and done.path is None
    assert saver.wait() is None and not saver.busy


def test_a_server_checkpointing_every_step_in_the_background_saves_each_step_exactly(forkserver, procs, tmp_path):
    server, ep = fork_server(forkserver, procs, *SERVER, "--checkpoint-every", "1")
    workers = [fork_worker(forkserver, procs, ep, r) for r in range(WORLD)]
    procs.wait_ok([*workers, server], timeout=200)
    found = sorted((tmp_path / "ckpt").glob("ckpt-*.safetensors"))
    steps = [checkpoint.load_checkpoint(p)[2]["step"] for p in found]
    assert steps == [STEPS - 2, STEPS - 1, STEPS]  # the newest KEEP = 3 survive pruning
    for path, step in zip(found, steps):
        want = replay(jobs.linear64, jobs.data64, WORLD, batch=BATCH, epochs=EPOCHS, steps=step)
        got = checkpoint.load_checkpoint(path)[0]
        for k in want:
            diff = (got[k] - want[k]).abs().max().item()
            assert diff <= TOL, f"step {step} {k}: |checkpoint - reference| = {diff:.3g}"
    log = server.log.read_text()
    assert log.count("checkpoint ") >= STEPS and "failed" not in log
