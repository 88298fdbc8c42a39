"""Pipeline schedules as data: per-stage lists of actions, a printed form, and a validator.

An action is the forward (``F``) or backward (``B``) of one microbatch on one stage, printed
as ``<stage><F|B><micro>``: ``1F0`` is stage 1's forward of microbatch 0, ``0B3`` stage 0's
backward of microbatch 3 (the form torch.distributed.pipelining prints). A schedule is one
list of actions per stage; :func:`validate` checks it before anything runs.

The two built-in schedules, for P stages and M microbatches:

* ``gpipe``: every stage runs all M forwards, then all M backwards. A stage holds the
  activations of M microbatches at once.
* ``1f1b`` (PipeDream-flush): stage s runs ``min(P - 1 - s, M)`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. A stage
  holds at most ``P - s`` (so at most P) microbatches of activations.

Both have the same bubble, (P - 1) / (M + P - 1) of each stage's time when all stages cost
the same; 1F1B needs less memory.

[Note: the deadlock model] Sends never block (a stage's messages are queued by ZeroMQ
without a high-water mark) and a stage's inbox accepts microbatches in any order, so an
action waits only for its data: ``sF i`` (s > 0) for ``(s-1)F i``'s activation and ``sB i``
(s < P-1) for ``(s+1)B i``'s δ. :func:`validate` replays the schedule under exactly these
rules and rejects it if some stage can never take its next action.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from common.errors import ConfigError
from common.names import PipelineSchedule, implementations

FORWARD, BACKWARD = "F", "B"
_ACTION = re.compile(r"^(\d+)([FB])(\d+)$")


class ScheduleError(ConfigError):
    """A schedule is malformed, incomplete, out of order, or would deadlock."""


@dataclass(frozen=True, order=True)
class Action:
    """The forward or backward of microbatch ``micro`` on stage ``stage``."""

    stage: int
    kind: str  # FORWARD or BACKWARD
    micro: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """The action printed as ``text`` (e.g. ``1F0``)."""
        m = _ACTION.match(text.strip())
        if not m:
            raise ScheduleError(f"{text!r} is not an action like 1F0 or 0B3")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


@dataclass(frozen=True)
class Schedule:
    """One list of actions per stage, for ``stages`` stages and ``micros`` microbatches."""

    name: str
    stages: int
    micros: int
    actions: tuple[tuple[Action, ...], ...]

    def for_stage(self, stage: int) -> tuple[Action, ...]:
        """The actions stage ``stage`` runs, in order."""
        return self.actions[stage]

    def __str__(self) -> str:
        return "\n".join(f"stage {s}: {format_actions(a)}" for s, a in enumerate(self.actions))


def format_actions(actions: Iterable[Action]) -> str:
    """The compact printed form of a list of actions: ``0F0 0F1 0B0 0B1``."""
    return " ".join(str(a) for a in actions)


def gpipe(stages: int, micros: int) -> Schedule:
    """All forwards, then all backwards, on every stage."""
    _check_sizes(stages, micros)
    acts = tuple(tuple([Action(s, FORWARD, i) for i in range(micros)] +
                       [Action(s, BACKWARD, i) for i in range(micros)]) for s in range(stages))
    return Schedule("gpipe", stages, micros, acts)


def one_f_one_b(stages: int, micros: int) -> Schedule:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards."""
    _check_sizes(stages, micros)
    acts = []
    for s in range(stages):
        warmup = min(stages - 1 - s, micros)
        lst = [Action(s, FORWARD, i) for i in range(warmup)]
        for i in range(micros - warmup):
            lst += [Action(s, FORWARD, warmup + i), Action(s, BACKWARD, i)]
        lst += [Action(s, BACKWARD, i) for i in range(micros - warmup, micros)]
        acts.append(tuple(lst))
    return Schedule("1f1b", stages, micros, tuple(acts))


MAKERS: dict[str, Callable[[int, int], Schedule]] = implementations(
    PipelineSchedule, {"gpipe": gpipe, "1f1b": one_f_one_b}, __name__)
"""The built-in schedules, one per ``--schedule`` name (:class:`common.names.PipelineSchedule`)."""
SCHEDULES = tuple(MAKERS)


def build(name: str, stages: int, micros: int) -> Schedule:
    """The built-in schedule ``name`` (``gpipe`` or ``1f1b``), validated."""
    if name not in MAKERS:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    sched = MAKERS[name](stages, micros)
    validate(sched)
    return sched


def parse(text: str, name: str = "custom") -> Schedule:
    """A schedule from its printed form: one line per stage, ``[stage s:] 0F0 0F1 ...``.

    Stage and microbatch counts are inferred; :func:`validate` is not called.
    """
    lines = [ln.split(":", 1)[-1] for ln in text.strip().splitlines() if ln.strip()]
    acts = tuple(tuple(Action.parse(tok) for tok in ln.split()) for ln in lines)
    micros = 1 + max((a.micro for lst in acts for a in lst), default=-1)
    return Schedule(name, len(acts), micros, acts)


def validate(sched: Schedule) -> list[int]:
    """Check ``sched``; return the peak number of microbatches each stage holds activations for.

    Rejects (with :class:`ScheduleError`) a schedule where some stage's list is not its own,
    does not run each microbatch's forward and backward exactly once, runs a backward before
    its forward, runs forwards or backwards out of microbatch order, or where the stages
    would wait on each other forever (see the module's note on the deadlock model).
    """
    P, M = sched.stages, sched.micros
    _check_sizes(P, M)
    if len(sched.actions) != P:
        raise ScheduleError(f"{sched.name}: {len(sched.actions)} action lists for {P} stages")
    peaks = []
    for s, acts in enumerate(sched.actions):
        peaks.append(_check_stage(sched.name, s, M, acts))
    _check_no_deadlock(sched)
    return peaks


def _check_stage(name: str, s: int, M: int, acts: Sequence[Action]) -> int:
    where = f"{name}: stage {s} ({format_actions(acts)})"
    done: dict[str, list[int]] = {FORWARD: [], BACKWARD: []}
    held = peak = 0
    for a in acts:
        if a.stage != s:
            raise ScheduleError(f"{where}: action {a} belongs to stage {a.stage}")
        if a.kind not in done:
            raise ScheduleError(f"{where}: action {a} is neither F nor B")
        if not 0 <= a.micro < M:
            raise ScheduleError(f"{where}: action {a} names microbatch {a.micro}, outside [0, {M})")
        if a.micro in done[a.kind]:
            raise ScheduleError(f"{where}: action {a} appears twice")
        if done[a.kind] and a.micro < done[a.kind][-1]:
            raise ScheduleError(f"{where}: action {a} comes after {s}{a.kind}{done[a.kind][-1]}; "
                                f"microbatches must run in order")
        if a.kind == BACKWARD and a.micro not in done[FORWARD]:
            raise ScheduleError(f"{where}: backward {a} before its forward {s}F{a.micro}")
        done[a.kind].append(a.micro)
        held += 1 if a.kind == FORWARD else -1
        peak = max(peak, held)
    for kind in (FORWARD, BACKWARD):
        missing = sorted(set(range(M)) - set(done[kind]))
        if missing:
            raise ScheduleError(f"{where}: no {kind} for microbatch(es) {missing}")
    return peak


def _needs(a: Action, last: int) -> Action | None:
    """The action on a neighbour whose message ``a`` waits for (None: only local data)."""
    if a.kind == FORWARD:
        return Action(a.stage - 1, FORWARD, a.micro) if a.stage > 0 else None
    return Action(a.stage + 1, BACKWARD, a.micro) if a.stage < last else None


def _check_no_deadlock(sched: Schedule) -> None:
    P = sched.stages
    pos = [0] * P
    done: set[Action] = set()
    progress = True
    while progress:
        progress = False
        for s in range(P):
            while pos[s] < len(sched.actions[s]):
                a = sched.actions[s][pos[s]]
                need = _needs(a, P - 1)
                if need is not None and need not in done:
                    break
                done.add(a)
                pos[s] += 1
                progress = True
    stuck = [(sched.actions[s][pos[s]], _needs(sched.actions[s][pos[s]], P - 1))
             for s in range(P) if pos[s] < len(sched.actions[s])]
    if stuck:
        waits = "; ".join(f"{a} waits for {n}" for a, n in stuck)
        raise ScheduleError(f"{sched.name}: the stages would deadlock: {waits}")


def _check_sizes(stages: int, micros: int) -> None:
    if stages < 1 or micros < 1:
        raise ScheduleError(f"a schedule needs at least one stage and one microbatch, got P={stages}, M={micros}")
