"""The zmqps modes the wan benchmark runs: a label, extra ps-server and extra ps-worker options.

A new mode is one line of :data:`MODES` (or ``--add-mode 'LABEL;SERVER ARGS;WORKER ARGS'`` on
the command line). A mode whose options the installed ``ps-server --help`` / ``ps-worker --help``
do not list (a flag, or a value outside a flag's listed choices) is skipped with the reason
(:func:`unsupported`): modes are listed here before the branches that build them are merged.
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

    @classmethod
    def parse(cls, spec: str) -> "Mode":
        """``LABEL;SERVER ARGS;WORKER ARGS`` (the last two optional, shell-quoted)."""
        parts = spec.split(";")
        if not parts[0].strip() or len(parts) > 3:
            raise ValueError(f"a mode is LABEL;SERVER ARGS;WORKER ARGS, got {spec!r}")
        parts += [""] * (3 - len(parts))
        return cls(parts[0].strip(), tuple(shlex.split(parts[1])), tuple(shlex.split(parts[2])))


MODES: list[Mode] = [
    Mode("bsp"),
    Mode("bsp+topk", worker=("--compress", "topk:0.01")),
    Mode("diloco", server=("--sync", "diloco", "--inner-steps", "50", "--optimizer", "adamw")),
    Mode("diloco-async", server=("--sync", "diloco-async", "--inner-steps", "50", "--optimizer", "adamw")),
]


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
