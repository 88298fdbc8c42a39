"""Fault injection for tests: a process stops or kills itself at a chosen point of a chosen step.

``--fault ACTION:POINT:STEP`` (or ``PS_FAULT``) arms one fault in this process, like torchft's
``EventInjector().fail_at(...)``: faults happen where the test says, not by luck.

* ``ACTION``: ``stop`` sends SIGSTOP to the process itself (the test then sees it stopped and
  kills it with ``kill -9``, or pulls its network cable and lets it continue with SIGCONT);
  ``kill`` sends SIGKILL to itself.
* ``POINT``: where in the step it fires:

  - ``before-push`` (worker): the gradients of STEP are computed but not sent;
  - ``after-push`` (worker): the push of STEP has reached the server (the client waits for the
    answer to a PING sent after it on the same connection), its reply not yet received;
  - ``after-apply`` (server): the update of STEP is applied to θ, but neither checkpointed nor
    answered;
  - ``mid-round`` (worker, ``--sync diloco``): half of round STEP's local steps are taken.

A fault fires at most once per process. Pass it through the environment (``PS_FAULT``) when the
test restarts the process "with the same command": the restart then runs without it.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from common.errors import ConfigError

log = logging.getLogger(__name__)

ACTIONS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}
POINTS = ("before-push", "after-push", "after-apply", "mid-round")


@dataclass(frozen=True)
class Fault:
    """One armed fault."""

    action: str
    point: str
    step: int


def parse_fault(text: str) -> Fault:
    """``ACTION:POINT:STEP`` as a :class:`Fault`.

    Raises:
        ConfigError: an unknown action or point, or a step that is not a non-negative integer.
    """
    parts = text.split(":")
    if (len(parts) != 3 or parts[0] not in ACTIONS or parts[1] not in POINTS
            or not parts[2].isdigit()):
        raise ConfigError(f"--fault must be ACTION:POINT:STEP with ACTION in {sorted(ACTIONS)}, "
                          f"POINT in {list(POINTS)} and STEP >= 0, got {text!r}")
    return Fault(parts[0], parts[1], int(parts[2]))


_armed: Fault | None = None


def arm(spec: str | None) -> None:
    """Arm the fault ``spec`` for this process (None disarms)."""
    global _armed
    _armed = parse_fault(spec) if spec else None
    if _armed:
        log.warning("fault armed: %s at %s of step %d", _armed.action, _armed.point, _armed.step)


def armed(point: str, step: int) -> bool:
    """Whether the armed fault is for ``point`` of ``step`` (so the caller can prepare for it)."""
    return _armed is not None and _armed.point == point and _armed.step == step


def hit(point: str, step: int) -> None:
    """Fire the armed fault if it is for ``point`` of ``step``; a no-op otherwise."""
    global _armed
    fault = _armed
    if fault is None or fault.point != point or fault.step != step:
        return
    _armed = None
    log.warning("fault: %s at %s of step %d", fault.action, point, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), ACTIONS[fault.action])
