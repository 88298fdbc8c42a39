"""A ZeroMQ fault proxy between workers and one server: duplicates, delays, reorders; never drops.

Workers connect their DEALERs (each with its identity; a heartbeat socket has the worker's
identity plus ``/hb``, see :mod:`common.watch`) to the proxy's ROUTER. For each identity the
proxy opens a DEALER *with the same identity* to the real server, since the server fences
ranks by identity. Messages are forwarded both ways, frame for frame; the proxy decodes the
msgpack header (frame 0) only to read ``op`` for its counters.

Faults, each drawn per message from a seeded :class:`random.Random`:

* **duplicate** - the message is sent twice (the copy goes through the same delay rules);
* **delay** - the message is held for ``delay_ms`` (a few to a few hundred ms). Later
  messages on the same path (identity and direction) queue behind it, as on a slow link;
* **reorder** - a delayed message is set aside instead: later messages on its path overtake it.

Nothing is ever dropped: the protocol's clients resend only after a reconnect or a server
restart, so a silent drop is not a fault zmqps claims to survive. (A reply for a worker that
is gone is discarded by the ROUTER, as it would be without the proxy.)

The proxy runs in a thread of the test process (:meth:`FaultProxy.start`, :meth:`stop`; also a
context manager). It never blocks without a timeout.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
import msgpack
import zmq

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"
"""Directions: worker to server, server to worker."""


@dataclass(frozen=True)
class ProxyRates:
    """Fault probabilities per message, and how long a delay lasts.

    Attributes:
        duplicate: probability that a message is sent twice.
        delay: probability that a message is held.
        reorder: probability that a held message lets later ones overtake it.
        delay_ms: (shortest, longest) hold in milliseconds, drawn uniformly.
    """

    duplicate: float = 0.0
    delay: float = 0.0
    reorder: float = 0.0
    delay_ms: tuple[float, float] = (2.0, 300.0)

    def text(self) -> str:
        """A compact form for the schedule's one-liner."""
        lo, hi = self.delay_ms
        if not (self.duplicate or self.delay):
            return "clean"
        return f"dup={self.duplicate:.2f},delay={self.delay:.2f}({lo:.0f}-{hi:.0f}ms),reorder={self.reorder:.2f}"


def op_of(header: bytes) -> str:
    """The ``op`` of a zmqps header frame, or ``?`` when it cannot be read (never raises)."""
    try:
        h = msgpack.unpackb(header, raw=False, strict_map_key=False, max_bin_len=0, max_ext_len=0)
        op = h.get("op") if isinstance(h, dict) else None
        return op if isinstance(op, str) else "?"
    except Exception:  # any garbage: the server will judge it, the proxy only counts
        return "?"


class FaultProxy:
    """A ROUTER facing the workers and a DEALER per identity facing ``upstream`` (see the module doc).

    Args:
        upstream: the real server's endpoint (``tcp://127.0.0.1:PORT``); it may not be listening
            yet, or restart: the DEALERs reconnect by themselves and queue meanwhile.
        rates: the fault probabilities.
        seed: seeds the proxy's own :class:`random.Random`.
        name: for log lines and the thread's name.
    """

    def __init__(self, upstream: str, rates: ProxyRates, seed: int, name: str = "proxy") -> None:
        self.upstream = upstream
        self.rates = rates
        self.name = name
        self.rng = random.Random(f"proxy:{seed}:{name}")
        self.faults: Counter[str] = Counter()
        """Faults injected, keyed ``KIND:OP`` (``duplicate:push_pull``, ``delay:ping``, ``reorder:init``)."""
        self.forwarded: Counter[str] = Counter()
        """Messages forwarded, keyed ``DIRECTION:OP``."""
        self.endpoint = ""
        self._ctx = zmq.Context()
        self._front: zmq.Socket | None = None
        self._backs: dict[bytes, zmq.Socket] = {}
        self._by_sock: dict[zmq.Socket, bytes] = {}
        self._heap: list[tuple[float, int, str, bytes, list[bytes]]] = []
        self._path_free: dict[tuple[str, bytes], float] = {}
        self._seq = itertools.count()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Bind the ROUTER on a port the OS picks, start the thread; return the endpoint to dial."""
        front = self._ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.RCVHWM, 0)
        front.setsockopt(zmq.SNDHWM, 0)
        front.setsockopt(zmq.ROUTER_HANDOVER, 1)
        front.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        front.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        front.bind("tcp://127.0.0.1:*")
        self.endpoint = front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._front = front
        self._thread = threading.Thread(target=self._run, name=f"nemesis-{self.name}", daemon=True)
        self._thread.start()
        log.debug("%s: %s -> %s (%s)", self.name, self.endpoint, self.upstream, self.rates.text())
        return self.endpoint

    def stop(self) -> None:
        """Stop the thread and close every socket (messages still held are discarded)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive():
                log.error("%s: the proxy thread did not stop within 10 s", self.name)
        self._ctx.destroy(linger=0)

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # reported by the runner: a harness bug, not a product one
            if not self._halt.is_set():
                log.exception("%s: the proxy failed", self.name)
                self.error = e

    def _loop(self) -> None:
        assert self._front is not None
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        while not self._halt.is_set():
            now = time.monotonic()
            wait_ms = 50.0
            if self._heap:
                wait_ms = min(wait_ms, max(0.0, (self._heap[0][0] - now) * 1000))
            for sock, _ in poller.poll(wait_ms):
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sock is self._front:
                        if len(frames) >= 2:
                            self._route(UP, frames[0], frames[1:], poller)
                    else:
                        self._route(DOWN, self._by_sock[sock], frames, poller)
            self._release(time.monotonic())

    def _back(self, ident: bytes, poller: zmq.Poller) -> zmq.Socket:
        """The DEALER that speaks to the server as ``ident`` (opened on first use)."""
        sock = self._backs.get(ident)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            for opt, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 0), (zmq.SNDHWM, 0), (zmq.RECONNECT_IVL, 100),
                               (zmq.RECONNECT_IVL_MAX, 1000), (zmq.HEARTBEAT_IVL, 1000),
                               (zmq.HEARTBEAT_TIMEOUT, 5000)):
                sock.setsockopt(opt, value)
            sock.setsockopt(zmq.IDENTITY, ident)
            sock.connect(self.upstream)
            self._backs[ident] = sock
            self._by_sock[sock] = ident
            poller.register(sock, zmq.POLLIN)
        return sock

    def _route(self, direction: str, ident: bytes, body: list[bytes], poller: zmq.Poller) -> None:
        """Schedule one message (and perhaps its duplicate) for sending."""
        op = op_of(body[0]) if body else "?"
        if direction == UP:
            self._back(ident, poller)  # connect early: the server sees the identity on first contact
        copies = 1
        if self.rng.random() < self.rates.duplicate:
            copies = 2
            self.faults[f"duplicate:{op}"] += 1
        for _ in range(copies):
            self._schedule(direction, ident, body, op)

    def _schedule(self, direction: str, ident: bytes, body: list[bytes], op: str) -> None:
        now = time.monotonic()
        path = (direction, ident)
        free = self._path_free.get(path, 0.0)
        if self.rng.random() < self.rates.delay:
            lo, hi = self.rates.delay_ms
            at = now + self.rng.uniform(lo, hi) / 1000.0
            if self.rng.random() < self.rates.reorder:
                self.faults[f"reorder:{op}"] += 1  # set aside: the path stays free for later messages
            else:
                self.faults[f"delay:{op}"] += 1
                at = max(at, free)
                self._path_free[path] = at
        else:
            at = max(now, free)  # behind whatever is held on this path (FIFO)
            if at > now:
                self._path_free[path] = at
        heapq.heappush(self._heap, (at, next(self._seq), direction, ident, body))
        self.forwarded[f"{direction}:{op}"] += 1

    def _release(self, now: float) -> None:
        """Send every held message whose time has come, in (time, arrival) order."""
        assert self._front is not None
        while self._heap and self._heap[0][0] <= now:
            _, _, direction, ident, body = heapq.heappop(self._heap)
            if direction == UP:
                self._backs[ident].send_multipart(body)
            else:
                try:
                    self._front.send_multipart([ident, *body], zmq.NOBLOCK)
                except zmq.Again:  # pragma: no cover - HWM 0 never blocks
                    log.warning("%s: could not forward a reply to %r", self.name, ident)

    # ------------------------------------------------------------------ results
    def counts(self) -> dict[str, int]:
        """Faults injected so far (a copy; read it once the proxy has stopped)."""
        return dict(self.faults)
