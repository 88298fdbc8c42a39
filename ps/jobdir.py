"""What a checkpoint folder holds, and what a starting server does with it (``--resume``).

[Note: used folders] A server that finds a job in its ``--checkpoint-dir`` says what it found
and what it will do, before it listens:

* no job (no checkpoint, no ``final.safetensors``): a new job starts;
* an unfinished job (checkpoints, and no ``final.safetensors`` of the newest step): it is
  resumed from the newest readable checkpoint, with no flag, which is what a restart after
  a crash needs (systemd's ``Restart=on-failure``, a pod restarted by Kubernetes);
* a finished job (``final.safetensors`` of the newest step): there is nothing left to train,
  and ``--resume auto`` (the default) refuses to start, naming the job and the ways out,
  instead of "resuming" it and exiting 0 after 0 steps. ``--resume always`` resumes it anyway
  (workers given more ``--epochs`` train it further); ``--resume never`` moves every file of
  the old job into ``previous-<time>/`` inside the folder (nothing is deleted) and starts a new
  job. The old job's logs in the folder go with it: the metrics log when it is there, and
  ``eval.jsonl`` (``ps-launch``'s held-out log, ``common.options.EVAL_LOG``), so a new job's
  curves never continue an old one's. A worker's ``--eval-log`` elsewhere is the user's file
  (the server does not know it): every job appends to it.

A job resumed with another model is refused at REGISTER, and the error names the checkpoint θ
came from (``Server._check_schema``). ``final.safetensors`` records the step it was written at
(older files do not: they count as written at the newest checkpoint's step).

Two servers never share a folder: a running server holds an exclusive ``flock`` on the
folder's directory (released when it closes or dies), and a second one is refused at start,
naming the process that holds it. Checkpoints of two jobs, or of two shards, in one folder
would overwrite each other.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from common.errors import ConfigError
from ps import checkpoint, stfile

log = logging.getLogger(__name__)

FINAL = "final.safetensors"
MODES = ("auto", "always", "never")


def _when(path: Path) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    except OSError:
        return "at an unknown time"


def _keys_of(path: Path) -> list[str]:
    """θ's keys in a checkpoint or final file, from its header (no tensor is read)."""
    entries, _ = stfile.read_header(path)
    if any(k.startswith("param/") for k in entries):
        return [k[len("param/"):] for k in entries if k.startswith("param/")]
    return list(entries)


@dataclass(frozen=True)
class Folder:
    """A checkpoint folder as a starting server finds it.

    Attributes:
        path: the folder.
        newest: its newest ``ckpt-*.safetensors``, or None.
        newest_step: that checkpoint's step (from its name).
        final: its ``final.safetensors``, or None.
        final_step: the step ``final.safetensors`` records (None for files of older versions).
        keys: θ's keys in the newest file (for messages), empty if unreadable.
    """

    path: Path
    newest: Path | None = None
    newest_step: int | None = None
    final: Path | None = None
    final_step: int | None = None
    keys: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """``new`` (no job), ``unfinished`` or ``finished``."""
        if self.final is not None and (self.newest_step is None or self.final_step is None
                                       or self.final_step >= self.newest_step):
            return "finished"
        return "unfinished" if self.newest is not None else "new"

    @property
    def step(self) -> int | None:
        """The step the job in the folder reached (of its newest file)."""
        steps = [s for s in (self.newest_step, self.final_step) if s is not None]
        return max(steps) if steps else None

    def model(self) -> str:
        """θ's keys, shortly: ``2 tensors: weight, bias``."""
        if not self.keys:
            return "θ unreadable"
        shown = ", ".join(self.keys[:4]) + (", ..." if len(self.keys) > 4 else "")
        return f"θ of {len(self.keys)} tensor{'s' if len(self.keys) != 1 else ''}: {shown}"

    def describe(self) -> str:
        """One clause: what the folder holds."""
        if self.state == "finished":
            assert self.final is not None
            step = self.step
            return (f"{self.path} holds a finished job: {FINAL} of step {'?' if step is None else step}, "
                    f"written {_when(self.final)} ({self.model()})")
        if self.state == "unfinished":
            assert self.newest is not None
            return (f"{self.path} holds an unfinished job: its newest checkpoint is {self.newest.name}, step "
                    f"{self.newest_step}, written {_when(self.newest)} ({self.model()})")
        return f"{self.path} holds no job"

    def files(self) -> list[Path]:
        """The job's files: every checkpoint and ``final.safetensors``."""
        found = checkpoint.checkpoints(self.path)
        return [*found, *([self.final] if self.final is not None else [])]


def survey(directory: str | Path) -> Folder:
    """What ``directory`` holds (reads file names and headers only)."""
    d = Path(directory)
    found = checkpoint.checkpoints(d)
    final = d / FINAL
    newest = found[0] if found else None
    newest_step = int(newest.name[len("ckpt-"):-len(".safetensors")]) if newest is not None else None
    final_step = None
    keys: list[str] = []
    if final.is_file():
        try:
            _, meta = stfile.read_header(final)
            final_step = int(meta["step"]) if "step" in meta else None
        except (ValueError, KeyError):
            pass
    for source in ([newest] if newest is not None else []) + ([final] if final.is_file() else []):
        try:
            keys = _keys_of(source)
            break
        except ValueError:
            continue
    return Folder(d, newest, newest_step, final if final.is_file() else None, final_step, tuple(keys))


@dataclass(frozen=True)
class Decision:
    """What the server does with the folder: resume it or not, and the line that says so."""

    resume: bool
    message: str


def decide(folder: Folder, mode: str, also_move: Iterable[Path] = ()) -> Decision:
    """Apply ``--resume MODE`` to ``folder`` (see [Note: used folders]).

    ``never`` moves the old job's files (and ``also_move``, e.g. a metrics log in the folder)
    aside before it returns.

    Raises:
        ConfigError: a finished job under ``auto``, or nothing to resume from under ``always``
            when only ``final.safetensors`` is there: the message names the job and the choices.
    """
    state = folder.state
    if state == "new":
        extra = " (--resume always: nothing to resume)" if mode == "always" else ""
        return Decision(False, f"{folder.path} holds no job: a new job starts{extra}")
    if mode == "never":
        what = folder.describe()
        moved_to = set_aside(folder, also_move)
        return Decision(False, f"{what}; moved its files into {moved_to}/ (--resume never): a new job starts")
    if state == "unfinished":
        return Decision(True, f"{folder.describe()}: resuming it (--resume never would start a new job)")
    step = folder.step
    if mode == "always":
        if folder.newest is None:
            raise ConfigError(f"{folder.describe()}, and no checkpoint to resume from (--resume always): "
                              f"--resume never moves it aside and starts a new job, or use another "
                              f"--checkpoint-dir")
        return Decision(True, f"{folder.describe()}: resuming it at step {folder.newest_step} as asked "
                              f"(--resume always); workers with more --epochs train it further")
    raise ConfigError(f"{folder.describe()}. There is nothing left to train, so the server does not start. "
                      f"Choose: --checkpoint-dir OTHER for a new job in another folder; --resume never to "
                      f"move the finished job into {folder.path}/previous-<time>/ and start a new job here; "
                      f"--resume always to train it further from step {step} (give the workers more --epochs)")


def set_aside(folder: Folder, also_move: Iterable[Path] = ()) -> Path:
    """Move the job's files (and ``also_move``) into a new ``previous-<time>/`` inside the folder."""
    stamp = time.strftime("previous-%Y%m%d-%H%M%S")
    target = folder.path / stamp
    n = 1
    while target.exists():
        n += 1
        target = folder.path / f"{stamp}-{n}"
    target.mkdir()
    files = {p.resolve(): p for p in [*folder.files(), *(Path(x) for x in also_move)] if p.is_file()}
    for p in files.values():  # each once, though named twice (a --metrics-log PATH/eval.jsonl)
        shutil.move(str(p), str(target / p.name))
    return target


# ------------------------------------------------------------------ one server per folder
_held: dict[str, int] = {}  # real path -> the directory's descriptor holding the flock


def _holder(fd: int) -> str:
    """Who holds the flock on the directory open as ``fd`` (from /proc/locks), for messages."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    pid = parts[4]
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        cmd = ""
                    return f"process {pid}" + (f" ({cmd.strip()[:120]})" if cmd.strip() else "")
    except OSError:
        pass
    return "another process"


def claim(directory: str | Path) -> None:
    """Create ``directory`` if needed and take it for this process (see the module's last note).

    Raises:
        ConfigError: another process holds it, or it cannot be created.
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--checkpoint-dir {d}: cannot create it: {e.strerror or e}") from None
    key = os.path.realpath(d)
    if key in _held:
        return
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            who = _holder(fd)
            os.close(fd)
            raise ConfigError(f"--checkpoint-dir {d} is in use by {who}: two servers must not share a "
                              f"checkpoint folder (their checkpoints would overwrite each other); give this one "
                              f"its own --checkpoint-dir (server shards: one folder each)") from None
        log.debug("no lock on %s (%s): going on without one", d, e)  # e.g. a file system without flock
    _held[key] = fd


def release(directory: str | Path) -> None:
    """Give ``directory`` up (a no-op when this process does not hold it)."""
    fd = _held.pop(os.path.realpath(Path(directory)), None)
    if fd is not None:
        os.close(fd)
