"""The zmqps modes the wan benchmark runs: a label, extra ps-server and ps-worker options, shards.

A new mode is one line of :data:`MODES` (or ``--add-mode 'LABEL;SERVER ARGS;WORKER ARGS[;SHARDS]'``
on the command line). A mode of S server shards runs S ``ps-server`` processes, each on its own
lab host (:func:`server_hosts`), and gives every worker all their endpoints, in order, as one
comma-separated ``--server`` (README, "Several server shards"). A mode whose options the
installed ``ps-server --help`` / ``ps-worker --help`` do not list (a flag, or a value outside a
flag's listed choices) is skipped with the reason (:func:`unsupported`): modes are listed here
before the branches that build them are merged.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Sequence

from benchmarks.harness import ROOT, child_env


@dataclass(frozen=True)
class Mode:
    """One zmqps configuration of the benchmark."""

    label: str
    server: tuple[str, ...] = field(default=())
    worker: tuple[str, ...] = field(default=())
    shards: int = 1  # ps-server processes, one per host (server, server1, ...)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"mode {self.label}: shards must be at least 1, got {self.shards}")

    @property
    def family(self) -> str:
        """The label without its ``/N shards`` suffix: the runs a shards comparison pairs up."""
        return re.sub(r"\s*/\s*\d+ shards?$", "", self.label)

    @property
    def folder(self) -> str:
        """The label as one folder name (``bsp/2 shards`` -> ``bsp-2shards``)."""
        return re.sub(r"[^\w+.-]+", "", re.sub(r"\s*/\s*", "-", self.label))

    @classmethod
    def parse(cls, spec: str) -> "Mode":
        """``LABEL;SERVER ARGS;WORKER ARGS;SHARDS`` (all but the label optional, args shell-quoted)."""
        parts = spec.split(";")
        if not parts[0].strip() or len(parts) > 4:
            raise ValueError(f"a mode is LABEL;SERVER ARGS;WORKER ARGS;SHARDS, got {spec!r}")
        parts += [""] * (4 - len(parts))
        try:
            shards = int(parts[3]) if parts[3].strip() else 1
        except ValueError:
            raise ValueError(f"a mode's SHARDS is a whole number, got {parts[3]!r} in {spec!r}") from None
        return cls(parts[0].strip(), tuple(shlex.split(parts[1])), tuple(shlex.split(parts[2])), shards)


MODES: list[Mode] = [
    Mode("bsp"),
    Mode("bsp/2 shards", shards=2),
    Mode("bsp+topk", worker=("--compress", "topk:0.01")),
    Mode("diloco", server=("--sync", "diloco", "--inner-steps", "50", "--optimizer", "adamw")),
    Mode("diloco-async", server=("--sync", "diloco-async", "--inner-steps", "50", "--optimizer", "adamw")),
]


SHARDS_MODES = ("bsp", "bsp/2 shards")  # --shards-only: does the server's link stop limiting a step?


def server_hosts(shards: int) -> list[str]:
    """The lab hosts of ``shards`` server shards: ``server``, ``server1``, ``server2``, ..."""
    return ["server", *(f"server{i}" for i in range(1, shards))]


def help_texts(modules: Sequence[str] = ("ps", "worker"), python: str = sys.executable) -> list[str]:
    """``python -m MODULE --help`` of each module (``ps``, ``worker``), whitespace collapsed; run at once."""
    env = child_env(1, {"COLUMNS": "2000"})
    procs = [subprocess.Popen([python, "-m", m, "--help"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env, cwd=ROOT) for m in modules]
    return [" ".join(p.communicate(timeout=120)[0].split()) for p in procs]


def missing(args: Sequence[str], helptext: str) -> str | None:
    """What of ``args`` the help text does not list (a flag, or a value outside its choices), or None."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        m = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])( \{{([^}}]*)\}})?", helptext)
        if m is None:
            return f"does not list {flag}"
        value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
        if m.group(2) is not None and value is not None and value not in m.group(2).split(","):
            return f"offers {flag} {{{m.group(2)}}}, not {value}"
    return None


def unsupported(mode: Mode, server_help: str, worker_help: str) -> str | None:
    """Why this installation cannot run ``mode`` (None: it can)."""
    why = missing(mode.server, server_help)
    if why:
        return f"ps-server --help {why}"
    why = missing(mode.worker, worker_help)
    return f"ps-worker --help {why}" if why else None


def select(labels: Sequence[str], extra: Sequence[str] = ()) -> list[Mode]:
    """The modes named by ``labels`` (from :data:`MODES` and the ``extra`` specs), in that order.

    Raises:
        ValueError: a label names no mode.
    """
    known = {m.label: m for m in [*MODES, *(Mode.parse(s) for s in extra)]}
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[lab] for lab in labels]
