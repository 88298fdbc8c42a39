"""The server's checkpoints: resuming at start, periodic and final ones, and shards going back.

Files and their format are ``ps.checkpoint``'s; the background writer is ``ps.snapshot``'s
([Note: background checkpoints]). This is the server's side: what a checkpoint holds (θ, the
optimizer, and the record ``meta`` the server composes), when one is written, what a failure
means, and where a starting server resumes ([Note: used folders] in ``ps.jobdir``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.config import ServerConfig
from common.errors import ConfigError
from common.options import EVAL_LOG
from common.partition import piece_groups
from ps import checkpoint, jobdir
from ps.metrics import ServerMetrics
from ps.snapshot import BackgroundSaver, Saved, checkpoint_snapshot
from ps.store import ParameterStore

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """What a resumed server takes from its checkpoint besides θ and the optimizer."""

    path: Path
    step: int
    meta: dict[str, Any]


class Checkpointer:
    """Writes and reads the server's checkpoints (see the module doc).

    Args:
        cfg: the server's configuration (``--checkpoint-dir``, ``--checkpoint-every``, ``--resume``).
        store: θ and the optimizer.
        metrics: where writes are counted and timed.
        meta: the checkpoint record of the moment (versions, membership, the rule's state...).
    """

    def __init__(self, cfg: ServerConfig, store: ParameterStore, metrics: ServerMetrics,
                 meta: Callable[[], dict[str, Any]]) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.meta = meta
        self.saver = BackgroundSaver()
        store.before_update = self.saver.protect
        self.saved_step = -1  # the newest checkpoint on disk
        self.resumed_from = ""  # the checkpoint θ came from, for errors ([Note: used folders])
        self._failures = 0  # periodic checkpoints failed in a row
        self._failure_logged = 0.0

    # ------------------------------------------------------------------ start
    def resume(self, rewind_to: int | None = None) -> Resumed | None:
        """Claim ``--checkpoint-dir``, say what it holds, and load θ and the optimizer from it if
        it holds a job to resume; ``rewind_to``: that checkpoint, newer ones dropped first
        ([Note: shards rewind together] in ``ps.server``).

        Raises:
            ConfigError: the folder cannot be written or used, or no checkpoint can be read.
        """
        d = self.cfg.checkpoint_dir
        try:
            checkpoint.check_writable(d)
        except OSError as e:
            raise ConfigError(f"--checkpoint-dir {d} is not writable: {e.strerror or e} "
                              f"(the server writes its checkpoints and final.safetensors there)") from None
        jobdir.claim(d)
        try:
            if rewind_to is not None:
                for newer in checkpoint.checkpoints(d):
                    if checkpoint.step_of(newer) > rewind_to:
                        newer.unlink()
                        log.warning("removed %s: this shard goes back to step %d with the others", newer.name,
                                    rewind_to)
            return self._resume_claimed()
        except BaseException:
            jobdir.release(d)
            raise

    def _resume_claimed(self) -> Resumed | None:
        for stale in checkpoint.remove_temporaries(self.cfg.checkpoint_dir):
            log.warning("removed %s, left by a crash while writing", stale)
        folder = jobdir.survey(self.cfg.checkpoint_dir)
        mlog = self.cfg.metrics_log
        inside = [Path(mlog)] if mlog and Path(mlog).resolve().parent == folder.path.resolve() else []
        inside.append(folder.path / EVAL_LOG)  # ps-launch's held-out log: the old job's, if it is there
        decision = jobdir.decide(folder, self.cfg.resume, inside)
        log.info("%s", decision.message)
        if not decision.resume:
            return None
        why: list[str] = []
        for path in checkpoint.checkpoints(self.cfg.checkpoint_dir):  # newest first: a damaged one costs steps
            try:
                params, opt_state, meta = checkpoint.load_checkpoint(path)
                break
            except (OSError, ValueError) as e:
                why.append(str(e))
                log.warning("cannot resume from %s, trying an older checkpoint: %s", path.name, e)
        else:
            raise ConfigError(f"no checkpoint in {self.cfg.checkpoint_dir} can be read ({'; '.join(why)[:1000]}); "
                              f"move them away to train from scratch")
        self.store.initialize(params, meta.get("versions"), opt_state, owned=True, buffers=meta.get("buffers", ()))
        self.store.aliases = dict(meta.get("aliases") or {})
        self.saved_step = int(meta["step"])
        self.resumed_from = f"{path} (step {self.saved_step})"
        self.metrics.resumed(self.saved_step, path.stat().st_mtime)
        log.info("resumed from %s at step %d", path, self.saved_step)
        return Resumed(path, self.saved_step, meta)

    def restorable(self) -> list[int]:
        """The steps of the checkpoints on disk (a shard could go back to any of them)."""
        return [checkpoint.step_of(p) for p in checkpoint.checkpoints(self.cfg.checkpoint_dir)]

    # ------------------------------------------------------------------ writing
    def save(self, version: int, background: bool = False) -> None:
        """Checkpoint θ, the optimizer and the record as of now (``version``).

        In the background the loop goes on at once and ``saved_step`` moves when the file is on
        disk; otherwise this returns once it is. A checkpoint still being written is finished
        first: one at a time, in step order.
        """
        assert self.store.optimizer is not None
        self.settle()
        snap = checkpoint_snapshot(version, self.store.params, self.store.optimizer, self.meta())
        directory = self.cfg.checkpoint_dir
        self.saver.start(version, snap, lambda s: checkpoint.write_checkpoint(directory, version, s.write))
        if not background:
            self.settle()

    def maybe_save(self, version: int, cut: bool) -> None:
        """After an update: a background checkpoint if ``version`` is due (``--checkpoint-every``),
        newer than the newest on disk, and a consistent ``cut``."""
        every = self.cfg.checkpoint_every
        if every and version % every == 0 and version > self.saved_step and cut:
            self.save(version, background=True)

    def poll(self) -> None:
        """Record a background checkpoint that has finished, if any (the loop calls this)."""
        if self.saver.busy:
            self._record(self.saver.poll())

    def settle(self) -> Saved | None:
        """Wait for the checkpoint being written, if any, and record its end (returned)."""
        done = self.saver.wait()
        self._record(done)
        return done

    def _record(self, done: Saved | None) -> None:
        """Record a finished checkpoint (or log why it failed, once a minute at most)."""
        if done is None:
            return
        self.metrics.checkpoint(done.step, done.seconds, done.error is None, done.cloned_bytes)
        if done.error is not None:
            self._failures += 1
            now = time.monotonic()
            if self._failures == 1 or now - self._failure_logged >= 60.0:  # one line a minute, not a step
                self._failure_logged = now
                log.error("checkpoint of step %d failed (%d failure(s) in a row), training goes on (the newest on "
                          "disk is step %d): %s: %s", done.step, self._failures, self.saved_step,
                          type(done.error).__name__, done.error)
            return
        if self._failures:
            log.warning("checkpoints are written again (step %d), after %d failure(s)", done.step, self._failures)
            self._failures = 0
        self.saved_step = max(self.saved_step, done.step)
        log.info("checkpoint %s%s", done.path,
                 f" ({done.cloned_bytes / 2**20:.1f} MiB kept while θ moved on)" if done.cloned_bytes else "")

    def write_final(self, version: int) -> Path:
        """The last checkpoint and ``final.safetensors`` (the whole state_dict, tied names included),
        both on disk when this returns.

        Raises:
            OSError: either could not be written ([Note: the final write] in ``ps.jobend``).
        """
        self.settle()
        # The last checkpoint (on the saver's thread) and final.safetensors are written at once
        # (each mostly waits on fsync); nothing changes θ meanwhile: the loop waits here.
        if version > self.saved_step:
            self.save(version, background=True)
        path = checkpoint.save_final(self.cfg.checkpoint_dir,
                                     piece_groups(checkpoint.with_aliases(self.store.params, self.store.aliases)),
                                     version)
        last = self.settle()
        if last is not None and last.error is not None:
            raise last.error
        return path
