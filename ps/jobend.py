"""How a server's job ends: DONE's barrier and the final files, a failure, a stop, a rewind.

[Note: the final write] DONE is a barrier: no worker is released before the final checkpoint
and ``final.safetensors`` are on disk, so a worker that exits 0 can never be needed again. If
writing them fails (a full disk, a read-only directory), nobody is released: θ stays in memory,
the write is tried again with a growing pause (the operator can free the disk meanwhile), and
after ``--rejoin-deadline`` seconds of failing the job fails - every waiting worker gets
WRITE_FAILED and the server exits 1, naming the file, the error and the newest good
checkpoint. A job never ends "done" without its files.
"""

from __future__ import annotations

import logging
import os
import time

from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.procfs import status_bytes
from common.protocol import Op
from common.wire import Message
from ps.checkpoint import checkpoint_path, latest_checkpoint
from ps.checkpointer import Checkpointer
from ps.engine.base import StepEngine
from ps.membership import Membership
from ps.outbox import Outbox
from ps.parking import Waiter
from ps.store import ParameterStore

log = logging.getLogger(__name__)


class JobEnd:
    """The end of the job (see the module doc); the loop runs while :attr:`finished` is False."""

    def __init__(self, cfg: ServerConfig, store: ParameterStore, members: Membership, engine: StepEngine,
                 checkpoints: Checkpointer, outbox: Outbox) -> None:
        self.cfg = cfg
        self.store = store
        self.members = members
        self.engine = engine
        self.checkpoints = checkpoints
        self.outbox = outbox
        self.finished = False
        self.failed: str | None = None
        self.final_written = False
        self.rewind_to: int | None = None  # set by REWIND: the loop returns and ps.cli starts over there
        self._failures = 0
        self._failing_since: float | None = None
        self.retry_at: float | None = None

    # ------------------------------------------------------------------ DONE
    def on_done(self, ident: bytes, msg: Message) -> None:
        """DONE: answered once every worker is done and the final files are written."""
        w = self.members.worker(msg)
        workers = self.members.workers
        if not w.done:
            log.info("rank %d finished (%d/%d done)", w.rank, sum(x.done for x in workers.values()) + 1,
                     self.cfg.workers)
        w.done = True
        self.members.parking.park(Waiter(ident, msg.id, Op.DONE, w.rank, (), step=0))
        self.finish_if_done()

    def finish_if_done(self) -> None:
        """Once every worker of the job is done: write the final files, then release them all."""
        if not self.members.all_done():
            return
        shrink = self.cfg.on_worker_loss == "shrink" and self.engine.started
        if len(self.members.workers) < self.cfg.workers and not shrink:
            return
        if self.retry_at is not None and time.monotonic() < self.retry_at:
            return
        try:
            self._write_final()
        except Exception as e:  # noqa: BLE001 - an OSError mostly; whatever it is, the job is not done
            self._write_failed(e)
            return
        version = self.engine.step_now()
        for w in self.members.parking.take_done():
            self.outbox.reply(w.ident, Op.DONE, w.req_id, {"version": version})
        self.finished = True

    def retry_due(self, now: float) -> None:
        """The loop's turn: try the final files again once their pause is over."""
        if self.retry_at is not None and now >= self.retry_at:
            self.finish_if_done()

    def _write_final(self) -> None:
        if self.final_written:
            return
        if not self.store.initialized:
            log.warning("no θ to write: training never started")
            self.final_written = True
            return
        version = self.engine.step_now()
        path = self.checkpoints.write_final(version)
        self.final_written = True
        if self._failures:
            log.warning("the final files were written after %d failed attempts", self._failures)
        loss = "-" if self.engine.loss is None else f"{self.engine.loss:.6g}"
        peak = status_bytes("VmHWM")
        theta = sum(p.numel() * p.element_size() for p in self.store.params.values())
        log.info("all %d workers done after %d steps, final loss %s; wrote %s (%d copy-on-write clones; "
                 "peak resident set %s)", self.cfg.workers, version, loss, os.path.abspath(path),
                 self.store.cow_clones, "-" if peak is None else f"{peak / 2**20:.0f} MiB, |θ| {theta / 2**20:.1f} MiB")

    def _write_failed(self, e: BaseException) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = now
        failing = now - self._failing_since
        why = (f"cannot write the final checkpoint and final.safetensors in {self.cfg.checkpoint_dir}: "
               f"{type(e).__name__}: {e}")
        if failing > self.cfg.rejoin_deadline:
            self.fail(f"{why} (failing for {failing:.0f}s, --rejoin-deadline {self.cfg.rejoin_deadline:g}s)",
                      ErrorCode.WRITE_FAILED)
            return
        pause = min(30.0, 2.0 ** min(self._failures, 5))
        self.retry_at = now + pause
        log.error("%s; θ of step %d is kept in memory and the workers wait: trying again in %.0fs "
                  "(the job fails after %.0fs more)", why, self.engine.step_now(), pause,
                  self.cfg.rejoin_deadline - failing)

    # ------------------------------------------------------------------ other ends
    def fail(self, why: str, code: ErrorCode = ErrorCode.WORKER_LOST) -> None:
        """Give up: checkpoint what is consistent, answer every parked request with ``code``, stop."""
        step = self.engine.step_now()
        ckpt = self.checkpoints
        ckpt.settle()
        if self.store.initialized and step > ckpt.saved_step and self.engine.consistent_cut():
            ckpt.save(step)
        saved = ""
        if ckpt.saved_step == step:
            saved = f"; checkpoint of step {step} written"
        elif ckpt.saved_step >= 0:
            saved = (f"; the newest good checkpoint is {checkpoint_path(self.cfg.checkpoint_dir, ckpt.saved_step)} "
                     f"(step {ckpt.saved_step}): a restart resumes there")
        log.error("job failed at step %d: %s%s", step, why, saved)
        for w in self.members.parking.take_all():
            self.outbox.error(w.ident, code, f"the job failed: {why}", w.req_id)
        self.failed = why
        self.finished = True

    def stop_on_signal(self, signum: int) -> int:
        """A graceful stop (systemd, Kubernetes): checkpoint θ as of now if it is a consistent cut
        newer than the newest on disk, so a restart recomputes nothing; the workers ride out
        the gap as after a crash. Returns the exit status, ``128 + signum``."""
        ckpt = self.checkpoints
        ckpt.settle()
        saved = "nothing new to checkpoint"
        if self.store.initialized:
            version = self.engine.step_now()
            if version > ckpt.saved_step and self.engine.consistent_cut():
                ckpt.save(version)
                saved = f"checkpoint of step {version} written"
            elif version > ckpt.saved_step:
                saved = f"step {version} is not a consistent cut; the newest checkpoint is step {ckpt.saved_step}"
        log.warning("stopping on signal %d: %s", signum, saved)
        return 128 + signum

    def on_rewind(self, ident: bytes, msg: Message) -> None:
        """[Note: shards rewind together] Shards checkpoint on their own. When one restarts from
        its newest checkpoint, the others are a step or two ahead, and a worker that rejoins finds
        the shards at different steps. It then asks every shard ahead to go back to the newest
        step every shard can restore (each INIT reply lists its checkpoints' steps and its own,
        ``restorable``): a shard with a checkpoint of that step starts over from it (``ps.cli``
        builds a new server in the same process, on the same endpoint: a new incarnation, so the
        workers register again), dropping its newer checkpoints; the steps in between are
        recomputed, exactly, as after any restart. A shard without it refuses, naming it.
        """
        self.members.worker(msg)
        step = msg.fields["step"]
        version = self.engine.step_now()
        if not self.store.initialized or step >= version:
            self.outbox.reply(ident, Op.REWIND, msg.id, {"version": version})
            return
        path = checkpoint_path(self.cfg.checkpoint_dir, step)
        if not path.exists():
            newest = latest_checkpoint(self.cfg.checkpoint_dir)
            raise ProtocolError(ErrorCode.BAD_STEP,
                                f"another server shard restarted from step {step}, but this one (at step {version}) "
                                f"has no checkpoint of step {step} to go back to (newest: "
                                f"{newest.name if newest else 'none'}); restart every shard from one step")
        log.warning("rank %d asks this shard to go back from step %d to step %d, where another shard restarted: "
                    "starting over from %s", msg.fields["rank"], version, step, path.name)
        self.outbox.reply(ident, Op.REWIND, msg.id, {"version": step})
        self.checkpoints.settle()
        self.rewind_to = step
        self.finished = True
