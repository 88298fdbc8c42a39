"""Running one schedule: real processes, real ZeroMQ over TCP loopback, faults on time, a verdict.

:func:`run` takes a :class:`tests.nemesis.schedule.Schedule` and a fork server
(:class:`tests.forkserver.ForkServer`: real child processes without an ``import torch`` each)
and returns a :class:`Result`; it raises :class:`NemesisFailure` when the run went wrong. The
run:

1. reserves the servers' ports (from the OS: bind port 0, read it, release it), so workers may
   start before a server and a restarted server binds the same endpoint; starts a
   :class:`tests.nemesis.proxy.FaultProxy` per server (not for CURVE runs); makes CURVE keys
   (``common.security.keygen``) for CURVE runs;
2. starts the processes in the schedule's start order; the time the last one starts is t0;
3. injects each process fault at t0 + ``at``: SIGKILL (the supervisor restarts the process
   with the same command line after ``gap``) or SIGSTOP (SIGCONT after ``gap``). A fault whose
   target is not running at that moment (the job is over) is skipped and counted as such;
4. supervises like systemd's ``Restart=on-failure``: any process that exits non-zero is
   started again with the same command line (after :data:`RESTART_SEC`, or the kill's gap),
   at most :data:`MAX_RESTARTS` times beyond the nemesis's own kills;
5. waits for every process to exit 0, under a hard deadline (:data:`DEADLINE_S` plus the
   schedule's own times): on timeout it fails with every process's log tail, never hangs;
6. checks the result (:mod:`tests.nemesis.jobs`): θ against the reference, or exactly-once
   counts, and (local steps) that no worker lost its round files; every process must have
   exited 0 in the end.

Every failure message starts with ``NEMESIS seed=<N> <schedule one-liner>`` and the command
that replays it. Every child is stopped when the run ends, pass or fail.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.security import keygen
from tests.forkserver import ForkedChild, ForkServer
from tests.nemesis import jobs, triage
from tests.nemesis.proxy import FaultProxy
from tests.nemesis.schedule import Fault, Schedule

log = logging.getLogger(__name__)

RESTART_SEC = 0.5
"""The supervisor's delay before restarting a process that exited non-zero on its own."""
MAX_RESTARTS = 3
"""Restarts of one process for exits the nemesis did not cause; beyond them it stays down."""
DEADLINE_S = 45.0
"""The hard deadline of a run, on top of its start gaps and the expected training time."""
TICK_S = 0.02
GRACE_S = 5.0
"""Once the job is over (every worker, or every server, exited 0), how long a process the nemesis
killed and restarted may take to exit 0 on its own before it is retired (see :meth:`Run.retire`)."""
LOG_TAIL = 4000
DECISIVE = re.compile(r" (ERROR|WARNING|CRITICAL) |Traceback|Error:")
"""Log lines worth showing first in a failure (repeats of one line are shown once)."""
REPLAY = "NEMESIS_SEED={seed} .venv/bin/python -m pytest tests/test_nemesis.py -k replay"


class NemesisFailure(AssertionError):
    """A run that failed; ``str()`` starts with ``NEMESIS seed=<N> <schedule>``.

    ``kind`` is ``product`` (a check failed: wrong θ, lost or doubled updates, a process that
    never exited 0, the deadline) or ``harness`` (the nemesis itself broke: that is a bug here).
    """

    def __init__(self, schedule: Schedule, what: str, details: str = "", kind: str = "product",
                 result: "Result | None" = None, hints: list[str] | None = None) -> None:
        self.schedule, self.what, self.kind, self.result = schedule, what, kind, result
        self.hints = hints or []
        head = f"NEMESIS seed={schedule.seed} {schedule.text()}"
        replay = REPLAY.format(seed=schedule.seed)
        hint = f"\nhints: {'; '.join(self.hints)}" if self.hints else ""
        super().__init__(f"{head}\n{kind} failure: {what}{hint}\nreplay: {replay}\n{details}".rstrip())


@dataclass
class Result:
    """What one run did and found."""

    seed: int
    schedule: str
    mode: str
    faults: Counter[str] = field(default_factory=Counter)
    """Injected faults: ``kill``, ``stop``, ``restart`` (by the nemesis's kills), ``unplanned-restart``,
    ``skipped``, ``start-kill`` (server-restart start order), and ``proxy:KIND:OP``."""
    theta_compared: bool = False
    max_delta: float | None = None
    exactly_once: str = ""
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    """Unplanned exits and other observations (the exit status of each)."""

    def proxy_faults(self) -> dict[str, int]:
        """Proxy faults by kind (duplicate, delay, reorder)."""
        out: Counter[str] = Counter()
        for k, n in self.faults.items():
            if k.startswith("proxy:"):
                out[k.split(":")[1]] += n
        return dict(out)


def free_port() -> int:
    """A TCP port on 127.0.0.1 the OS considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Slot:
    """One supervised process (``server``, ``server1``, ``worker 0``...) and its incarnations."""

    name: str
    entry: str
    args: list[str]
    ready: Path | None = None
    children: list[ForkedChild] = field(default_factory=list)
    restart_at: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    planned: bool = False  # the current exit was the nemesis's kill (its restart is not "unplanned")
    kills: int = 0
    unplanned: int = 0
    stopped_until: float | None = None
    gave_up: bool = False
    retired: str = ""  # why the run stopped caring about it (the job ended without it)
    started: float = 0.0  # when the current incarnation started

    @property
    def child(self) -> ForkedChild | None:
        return self.children[-1] if self.children else None

    def running(self) -> bool:
        c = self.child
        return c is not None and c.poll() is None

    def finished(self) -> bool:
        c = self.child
        return bool(self.retired) or (c is not None and c.poll() == 0 and self.restart_at is None)


class Run:
    """The state of one schedule's execution (see the module doc)."""

    def __init__(self, s: Schedule, fs: ForkServer, tmp: Path) -> None:
        self.s, self.fs, self.tmp = s, fs, tmp
        self.result = Result(s.seed, s.text(), s.mode)
        self.slots: dict[str, Slot] = {}
        self.proxies: list[FaultProxy] = []
        self.ckpts: list[Path] = []
        self._n = 0
        self._conts: list[tuple[float, Slot]] = []
        self._ended: float | None = None

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Ports, proxies, keys and every process's command line."""
        s = self.s
        binds = [f"tcp://127.0.0.1:{free_port()}" for _ in range(s.shards)]
        curve_server = curve_dir = None
        worker_keys: list[Path] = []
        if s.mode == "curve":
            curve_dir = self.tmp / "keys"
            curve_server = keygen(curve_dir, "server")
            worker_keys = [keygen(curve_dir, f"worker{k}")[1] for k in range(s.workers)]
        dial = []
        for i, bind in enumerate(binds):
            if s.proxy is not None:
                p = FaultProxy(bind, s.proxy, s.seed, name=f"proxy{i}")
                self.proxies.append(p)
                dial.append(p.start())
            else:
                dial.append(bind)
        for i, bind in enumerate(binds):
            name = "server" if i == 0 else f"server{i}"
            ckpt, ready = self.tmp / f"ckpt{i}", self.tmp / f"{name}.ready"
            self.ckpts.append(ckpt)
            curve = (curve_server[1], curve_dir) if curve_server is not None and curve_dir is not None else None
            self.slots[name] = Slot(name, "ps", jobs.server_args(s, bind, ckpt, ready, curve), ready=ready)
        for k in range(s.workers):
            curve = (curve_server[0], worker_keys[k]) if curve_server is not None else None
            args = jobs.worker_args(s, k, ",".join(dial), curve, self.tmp / f"state{k}")
            self.slots[f"worker {k}"] = Slot(f"worker {k}", "worker", args, env=jobs.worker_env(s))

    # ------------------------------------------------------------------ processes
    def spawn(self, slot: Slot) -> None:
        """Start (or restart) ``slot`` with its command line."""
        self._n += 1
        if slot.ready is not None and slot.ready.exists():
            slot.ready.unlink()
        logfile = self.tmp / f"{self._n:02d}-{slot.name.replace(' ', '_')}.log"
        slot.children.append(self.fs.spawn(slot.name, slot.entry, slot.args, logfile, env=slot.env))
        slot.restart_at = None
        slot.started = time.monotonic()
        log.debug("seed %d: started %s (pid %d)", self.s.seed, slot.name, slot.children[-1].pid)

    def kill(self, slot: Slot, gap: float, now: float) -> bool:
        """SIGKILL ``slot``; the supervisor restarts it ``gap`` seconds later.

        Returns False when the process exited 0 on its own just before the signal (nothing to
        restart: the kill came too late).
        """
        c = slot.child
        assert c is not None
        c.kill(signal.SIGKILL)
        if c.wait(30) == 0:
            return False
        slot.planned = True
        slot.kills += 1
        slot.restart_at = now + gap
        return True

    def supervise(self, now: float) -> None:
        """Restart what exited non-zero (systemd ``Restart=on-failure``); resume stopped processes."""
        for at, slot in list(self._conts):
            if now >= at:
                self._conts.remove((at, slot))
                slot.stopped_until = None
                if slot.child is not None:
                    slot.child.kill(signal.SIGCONT)
        self.retire(now)
        for slot in self.slots.values():
            c = slot.child
            if c is None or slot.gave_up or slot.retired:
                continue
            code = c.poll()
            if code is None or code == 0:
                continue
            if slot.restart_at is None:
                if slot.unplanned >= MAX_RESTARTS:
                    slot.gave_up = True
                    self.result.notes.append(f"{slot.name} exited {code}; gave up after {MAX_RESTARTS} restarts")
                    continue
                slot.unplanned += 1
                slot.planned = False
                slot.restart_at = now + RESTART_SEC
                self.result.faults["unplanned-restart"] += 1
                self.result.notes.append(f"{slot.name} (pid {c.pid}) exited {code} on its own: restarted")
            if now >= slot.restart_at:
                if slot.planned:
                    self.result.faults["restart"] += 1
                slot.planned = False
                self.spawn(slot)

    def ended_at(self) -> float | None:
        """When the job ended: every worker, or every server, exited 0 (None while it runs)."""
        for group in ("ps", "worker"):
            slots = [x for x in self.slots.values() if x.entry == group]
            if all(x.child is not None and x.child.poll() == 0 and x.restart_at is None for x in slots):
                return self._ended if self._ended is not None else time.monotonic()
        return None

    def retire(self, now: float) -> None:
        """Once the job has ended, stop waiting for processes the nemesis killed.

        A worker killed after its DONE reached the server, or a server killed after it released
        the workers, is restarted by the supervisor into a job that is over: nobody will ever
        answer it (the barrier promises that a process which exited 0 is never needed again, not
        that a late restart finds anyone). Such a process is retired: a pending restart is
        cancelled at once, a running one is stopped if it has not exited 0 within
        :data:`GRACE_S`. Only a process that had done its part is retired (:meth:`done_its_part`);
        for any other the run waits for its exit 0 (or fails at the deadline).
        """
        end = self.ended_at()
        if end is None:
            return
        self._ended = end
        for slot in self.slots.values():
            if slot.retired or slot.kills == 0 or slot.finished() or not self.done_its_part(slot):
                continue
            if slot.restart_at is not None or (slot.child is not None and slot.child.poll() is not None):
                slot.restart_at = None
                slot.retired = "killed; not restarted, the job had ended"
            elif now - max(end, slot.started) > GRACE_S:
                assert slot.child is not None
                slot.child.kill(signal.SIGCONT)
                slot.child.stop()
                slot.retired = f"restarted into a job that had ended; stopped after {GRACE_S:g}s"
            else:
                continue
            self.result.faults["retired"] += 1
            self.result.notes.append(f"{slot.name}: {slot.retired}")

    def done_its_part(self, slot: Slot) -> bool:
        """Whether ``slot`` had finished its part of the job before the nemesis killed it: a
        worker whose DONE a server logged, a server incarnation that wrote the final θ."""
        if slot.entry == "worker":
            k = slot.name.split()[-1]
            servers = [c for x in self.slots.values() if x.entry == "ps" for c in x.children]
            return any(f"rank {k} finished" in c.output(tail=10**7) for c in servers)
        return any(c.poll() not in (None, 0) and "workers done after" in c.output(tail=10**7) for c in slot.children)

    def inject(self, f: Fault, now: float) -> None:
        """Apply one process fault now (or count it as skipped).

        Skipped: the target is not running (stopped, waiting for its restart), or any process
        already exited 0 (the job is ending: a fault there tests nothing the job still needs).
        """
        slot = self.slots[f.target]
        ending = any(x.child is not None and x.child.poll() == 0 for x in self.slots.values())
        if ending or not slot.running() or slot.stopped_until is not None or slot.restart_at is not None:
            self.result.faults["skipped"] += 1
            return
        if f.kind == "kill":
            self.result.faults["kill" if self.kill(slot, f.gap, now) else "skipped"] += 1
        else:
            assert slot.child is not None
            slot.child.kill(signal.SIGSTOP)
            slot.stopped_until = now + f.gap
            self._conts.append((now + f.gap, slot))
            self.result.faults["stop"] += 1
        log.debug("seed %d: %s", self.s.seed, f.text())

    def wait_ready(self, slot: Slot, deadline: float) -> None:
        """Wait until a server wrote its ready file (it listens)."""
        assert slot.ready is not None
        while not (slot.ready.exists() and slot.ready.read_text().strip()):
            c = slot.child
            if c is not None and c.poll() is not None:
                raise self.failure(f"{slot.name} exited {c.poll()} before listening")
            if time.monotonic() > deadline:
                raise self.failure(f"{slot.name} did not listen in time")
            time.sleep(TICK_S)

    # ------------------------------------------------------------------ the run
    def execute(self) -> None:
        """Start in order, inject, supervise, until every process exited 0 or the deadline."""
        s = self.s
        t_start = time.monotonic()
        deadline = t_start + DEADLINE_S + s.start_gap + s.expected_s + sum(f.gap for f in s.faults)
        servers = [x for x in self.slots.values() if x.entry == "ps"]
        workers = [x for x in self.slots.values() if x.entry == "worker"]
        if s.start == "server-first":
            self._start(servers)
            self._pause(s.start_gap, deadline)
            self._start(workers)
        elif s.start == "workers-first":
            self._start(workers)
            self._pause(s.start_gap, deadline)
            self._start(servers)
        elif s.start == "late-worker":
            late = self.slots[f"worker {s.late_rank}"]
            self._start(servers)
            self._start([w for w in workers if w is not late])
            self._pause(s.start_gap, deadline)
            self._start([late])
        else:  # server-restart: killed -9 once it listens, restarted before any worker arrives
            self._start(servers)
            first = servers[0]
            self.wait_ready(first, deadline)
            if not self.kill(first, s.start_gap, time.monotonic()):
                raise self.failure("the server exited 0 before any worker started")
            self.result.faults["start-kill"] += 1
            self._pause(s.start_gap + 0.05, deadline)
            self.wait_ready(first, deadline)
            self._start(workers)
        t0 = time.monotonic()
        pending = list(s.faults)
        while True:
            now = time.monotonic()
            while pending and now >= t0 + pending[0].at:
                self.inject(pending.pop(0), now)
            self.supervise(now)
            self._check_proxies()
            if all(x.finished() for x in self.slots.values()) and not pending and not self._conts:
                break
            if all(x.finished() for x in self.slots.values()):
                self.result.faults["skipped"] += len(pending)  # the job is over before these faults
                pending.clear()
                if not self._conts:
                    break
            if any(x.gave_up for x in self.slots.values()):
                raise self.failure("a process kept exiting non-zero: " + "; ".join(self.result.notes[-3:]))
            if now > deadline:
                raise self.failure(f"not every process exited 0 within {deadline - t_start:.0f}s (hard deadline): "
                                   + ", ".join(self._states()))
            time.sleep(TICK_S)

    def _start(self, slots: list[Slot]) -> None:
        for slot in slots:
            self.spawn(slot)

    def _pause(self, seconds: float, deadline: float) -> None:
        """Sleep ``seconds`` while supervising (a process that dies meanwhile is restarted)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = time.monotonic()
            self.supervise(now)
            if now > deadline:
                raise self.failure("the hard deadline passed during start-up")
            time.sleep(TICK_S)

    def _check_proxies(self) -> None:
        for p in self.proxies:
            if p.error is not None:
                raise self.failure(f"{p.name} failed: {type(p.error).__name__}: {p.error}", kind="harness")

    def _states(self) -> list[str]:
        out = []
        for slot in self.slots.values():
            c = slot.child
            state = "never started" if c is None else ("running" if c.poll() is None else f"exited {c.poll()}")
            out.append(f"{slot.name} {state}")
        return out

    # ------------------------------------------------------------------ verdict
    def check(self) -> None:
        """θ or exactly-once counts, once every process exited 0."""
        s = self.s
        if s.exact:
            worst, where = jobs.compare_theta(s, self.ckpts)
            self.result.theta_compared, self.result.max_delta = True, worst
            if not worst <= jobs.TOL:
                raise AssertionError(f"final θ differs from the single-process reference: max |Δ| = {worst:.3g} "
                                     f"(key {where!r}) > {jobs.TOL:g}")
        else:
            self.result.exactly_once = jobs.check_exactly_once(s, self.ckpts[0])
        jobs.check_round_files(s, [c.output(tail=10**7) for x in self.slots.values() if x.entry == "worker"
                                   for c in x.children])

    def collect(self) -> None:
        """Stop the proxies and add their counts to the result."""
        for p in self.proxies:
            p.stop()
            for k, n in p.counts().items():
                self.result.faults[f"proxy:{k}"] += n
        self.proxies = []

    def cleanup(self) -> None:
        """Stop every child still running (stopped ones are resumed first), and the proxies."""
        for slot in self.slots.values():
            for c in slot.children:
                if c.poll() is None:
                    c.kill(signal.SIGCONT)
                    c.stop()
        for p in self.proxies:
            p.stop()

    def failure(self, what: str, kind: str = "product") -> NemesisFailure:
        """A :class:`NemesisFailure` with the decisive lines and every process's log tail."""
        texts = {name: [c.output(tail=10**7) for c in slot.children] for name, slot in self.slots.items()}
        found = triage.hints(self.s, what, texts) if kind == "product" else []
        return NemesisFailure(self.s, what, self.logs(), kind, self.result, found)

    def logs(self) -> str:
        """Notes, the ERROR/Traceback lines of every log, then each incarnation's tail."""
        parts = []
        if self.result.notes:
            parts.append("notes: " + "; ".join(self.result.notes))
        parts.append("faults: " + ", ".join(f"{k}={n}" for k, n in sorted(self.result.faults.items())))
        decisive: dict[str, str] = {}
        for slot in self.slots.values():
            for c in slot.children:
                for line in c.output(tail=10**7).splitlines():
                    if DECISIVE.search(line):  # one line per pattern (numbers aside) and process
                        text = re.sub(r"^[0-9:]+ ", "", line)
                        decisive.setdefault(f"{slot.name}:{re.sub(r'[0-9.]+', '#', text)}",
                                            f"[{slot.name} pid {c.pid}] {text}")
        if decisive:
            parts.append("decisive lines:\n" + "\n".join(list(decisive.values())[-60:]))
        for slot in self.slots.values():
            for c in slot.children:
                status = c.poll()
                parts.append(f"--- {slot.name} (pid {c.pid}, {'running' if status is None else f'exit {status}'}, "
                             f"{c.log}) ---\n{c.output(tail=LOG_TAIL)}")
        return "\n".join(parts)


def run(s: Schedule, fs: ForkServer, tmp: Path, keep: bool = True) -> Result:
    """Run ``s`` with processes from ``fs``, logs and checkpoints under ``tmp``; return its result.

    Raises:
        NemesisFailure: the run failed (the message names the seed, the schedule, how to replay
            it, and carries the logs). ``keep=False`` removes ``tmp`` after a passing run.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    r = Run(s, fs, tmp)
    t0 = time.monotonic()
    try:
        try:
            r.prepare()
            r.execute()
        except NemesisFailure:
            raise
        except Exception as e:  # the harness broke, not the product
            log.exception("seed %d: harness error", s.seed)
            raise r.failure(f"{type(e).__name__}: {e}", kind="harness") from e
        finally:
            r.collect()
            r.result.wall_s = time.monotonic() - t0
        try:
            r.check()
        except AssertionError as e:
            raise r.failure(str(e)) from None
    finally:
        r.cleanup()
        r.result.wall_s = time.monotonic() - t0
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return r.result
