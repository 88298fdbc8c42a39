"""What the server measures: Prometheus metrics, a JSONL log, and its one-line status.

Every applied push is recorded with its staleness and lead (see :mod:`ps.engine.base`),
every optimizer update with θ's version and the loss. The same numbers feed three outputs:

* Prometheus text on ``http://HOST:PORT/metrics`` (``--metrics-port``; HOST is the host of
  ``--bind``), served by prometheus_client from a daemon thread, from a private registry.
* A JSONL file (``--metrics-log``): one object per line, ``ev`` is ``start``, ``push``,
  ``update`` or ``end``; ``t`` is Unix time. ``ps-plot`` draws loss and throughput from it.
* :meth:`ServerMetrics.status` - rates since the previous status line, for the server's log.

Names (all prefixed ``zmqps_``): ``version``, ``step``, ``updates_total``, ``pushes_total``
{rank}, ``samples_total``, ``loss``, ``request_seconds`` {op}, ``bytes_received_total``,
``bytes_sent_total``, ``staleness`` (histogram, in updates), ``lead_steps`` (histogram),
``worker_last_seen_seconds`` {rank} (age), ``worker_clock`` {rank}, ``worker_done`` {rank},
``workers_registered``, ``info`` {sync, staleness, optimizer, lr}, ``checkpoint_step`` (the
newest checkpoint on disk), ``checkpoint_timestamp_seconds`` (when it reached the disk, Unix
time: its age is ``time() - zmqps_checkpoint_timestamp_seconds``), ``checkpoint_seconds`` (cut → file
on disk), ``checkpoint_failures_total``,
``checkpoint_kept_bytes_total`` (θ and slots copied to keep background checkpoints exact),
``push_bytes_total`` {rank} (tensor frames of pushes as they travelled: compressed size with
``--compress``) and ``push_dense_bytes_total`` {rank} (what the same tensors take dense); and
the standard ``process_*`` metrics (resident memory, CPU seconds, open files) of the server.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections import Counter as Tally
from typing import IO, Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.config import ServerConfig

log = logging.getLogger(__name__)


STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

WorkerRow = tuple[int, float, int, bool]
"""(rank, last seen on the monotonic clock, clock, done)."""


class _WorkerCollector(Collector):
    """Per-worker gauges read at scrape time (so last-seen ages are current)."""

    def __init__(self, rows: Callable[[], Iterable[WorkerRow]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        seen = GaugeMetricFamily("zmqps_worker_last_seen_seconds", "seconds since the worker's last message",
                                 labels=["rank"])
        clock = GaugeMetricFamily("zmqps_worker_clock", "steps the worker has pushed", labels=["rank"])
        done = GaugeMetricFamily("zmqps_worker_done", "1 once the worker has finished", labels=["rank"])
        registered = GaugeMetricFamily("zmqps_workers_registered", "workers registered")
        now = time.monotonic()
        rows = list(self._rows())
        for rank, last, clk, fin in rows:
            seen.add_metric([str(rank)], max(0.0, now - last))
            clock.add_metric([str(rank)], clk)
            done.add_metric([str(rank)], 1.0 if fin else 0.0)
        registered.add_metric([], len(rows))
        yield from (seen, clock, done, registered)


class ServerMetrics:
    """The server's measurements (call only from the server's loop thread)."""

    def __init__(self, cfg: ServerConfig, workers: Callable[[], Iterable[WorkerRow]] = lambda: ()) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.p_version = Gauge("zmqps_version", "updates applied to θ (its version)", registry=r)
        self.p_step = Gauge("zmqps_step", "the slowest live worker's clock (steps done by everyone)", registry=r)
        self.p_updates = Counter("zmqps_updates", "optimizer updates applied", registry=r)
        self.p_pushes = Counter("zmqps_pushes", "pushes applied, per worker", ["rank"], registry=r)
        self.p_samples = Counter("zmqps_samples", "samples in applied pushes", registry=r)
        self.p_nonfinite = Counter("zmqps_nonfinite_pushes", "pushes left out for NaN or infinity "
                                   "(--nonfinite skip), per worker", ["rank"], registry=r)
        self.p_loss = Gauge("zmqps_loss", "the server's latest mean loss", registry=r)
        self.p_latency = Histogram("zmqps_request_seconds", "time from a request's arrival to its reply",
                                   ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self.p_in = Counter("zmqps_bytes_received", "bytes received (all frames)", registry=r)
        self.p_out = Counter("zmqps_bytes_sent", "bytes sent (all frames)", registry=r)
        self.p_push_bytes = Counter("zmqps_push_bytes", "bytes of pushed tensor frames as they travelled "
                                    "(compressed size with --compress), per worker", ["rank"], registry=r)
        self.p_push_dense = Counter("zmqps_push_dense_bytes", "bytes the same pushed tensors take dense, "
                                    "per worker", ["rank"], registry=r)
        self.p_stale = Histogram("zmqps_staleness", "staleness of applied gradients, in updates",
                                 buckets=STALENESS_BUCKETS, registry=r)
        self.p_lead = Histogram("zmqps_lead_steps", "steps a push was ahead of the slowest other worker",
                                buckets=STALENESS_BUCKETS, registry=r)
        self.p_ckpt_step = Gauge("zmqps_checkpoint_step", "step of the newest checkpoint on disk", registry=r)
        self.p_ckpt_time = Gauge("zmqps_checkpoint_timestamp_seconds", "when the newest checkpoint on disk "
                                 "was written (Unix time)", registry=r)
        self.p_ckpt_seconds = Histogram("zmqps_checkpoint_seconds", "time from a checkpoint's cut to its file "
                                        "on disk", buckets=LATENCY_BUCKETS, registry=r)
        self.p_ckpt_failed = Counter("zmqps_checkpoint_failures", "checkpoint writes that failed", registry=r)
        self.p_ckpt_kept = Counter("zmqps_checkpoint_kept_bytes", "bytes of θ and optimizer slots copied to keep "
                                   "a checkpoint being written exact while training went on", registry=r)
        Info("zmqps", "server configuration", registry=r).info(
            {"sync": cfg.sync, "staleness": str(cfg.staleness), "optimizer": cfg.optimizer, "lr": str(cfg.lr)})
        r.register(_WorkerCollector(workers))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.url = ""
        self._httpd: Any = None
        self._log: IO[str] | None = None
        # plain numbers for the status line and PING
        self.staleness = Tally[int]()
        self.max_lead = 0
        self.pushes = self.updates = 0
        self.samples = self.bytes_in = self.bytes_out = 0.0
        self.push_bytes = self.push_dense_bytes = 0
        self._unrecorded: dict[int, tuple[int, int]] = {}  # rank -> push bytes since its last push record
        self._pending_samples = 0.0
        self._last: tuple[float, int, float, float, float] = (time.monotonic(), 0, 0.0, 0.0, 0.0)

    # ------------------------------------------------------------------ outputs
    def start(self) -> None:
        """Open the JSONL log and start the HTTP endpoint (on ``--metrics-bind``), as configured."""
        host = self.cfg.metrics_bind
        if self.cfg.metrics_log:
            self._log = open(self.cfg.metrics_log, "a", buffering=1, encoding="utf-8")
            self._write({"ev": "start", "sync": self.cfg.sync, "staleness": self.cfg.staleness,
                         "workers": self.cfg.workers, "optimizer": self.cfg.optimizer, "lr": self.cfg.lr})
        if self.cfg.metrics_port is not None:
            self._httpd, _thread = start_http_server(self.cfg.metrics_port, host, self.registry)
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            self.url = f"http://{shown}:{self._httpd.server_port}/metrics"
            log.info("Prometheus metrics on %s", self.url)
            if not _loopback(host):
                log.warning("the metrics endpoint listens on %s: anyone who can reach it reads the job's metrics "
                            "(steps, loss, ranks)%s; --metrics-bind 127.0.0.1 keeps it on this host", host or "*",
                            ", unauthenticated: CURVE protects the training socket only"
                            if self.cfg.curve_secret_key else "")

    def close(self, version: int | None = None, loss: float | None = None) -> None:
        """Write the ``end`` record, close the log and stop the HTTP endpoint."""
        if self._log is not None:
            self._write({"ev": "end", "version": version, "loss": loss, "push_bytes": self.push_bytes,
                         "push_dense_bytes": self.push_dense_bytes, "bytes_in": self.bytes_in,
                         "bytes_out": self.bytes_out})
            self._log.close()
            self._log = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"t": round(time.time(), 6), **record}) + "\n")

    # ------------------------------------------------------------------ events
    def push(self, rank: int, step: int, staleness: int, lead: int, samples: float, loss: float | None) -> None:
        """A push of ``step`` by ``rank`` is about to be applied."""
        self.pushes += 1
        self.samples += samples
        self._pending_samples += samples
        self.staleness[staleness] += 1
        self.max_lead = max(self.max_lead, lead)
        self.p_pushes.labels(str(rank)).inc()
        self.p_samples.inc(samples)
        self.p_stale.observe(staleness)
        self.p_lead.observe(lead)
        wire, dense = self._unrecorded.pop(rank, (0, 0))
        self._write({"ev": "push", "rank": rank, "step": step, "staleness": staleness, "lead": lead,
                     "samples": samples, "loss": loss, "bytes": wire, "dense_bytes": dense})

    def push_frames(self, rank: int, wire: int, dense: int) -> None:
        """A push from ``rank`` carried ``wire`` bytes of tensor frames standing for ``dense`` bytes
        of dense tensors (equal without compression); the JSONL's next ``push`` record of ``rank``
        shows them (summed over its bucket pushes), as ``bytes`` and ``dense_bytes``."""
        self.push_bytes += wire
        self.push_dense_bytes += dense
        self.p_push_bytes.labels(str(rank)).inc(wire)
        self.p_push_dense.labels(str(rank)).inc(dense)
        w, d = self._unrecorded.get(rank, (0, 0))
        self._unrecorded[rank] = (w + wire, d + dense)

    def nonfinite(self, rank: int, step: int) -> None:
        """``rank``'s push of ``step`` held NaN or infinity and was left out (``--nonfinite skip``)."""
        self.p_nonfinite.labels(str(rank)).inc()
        self._write({"ev": "nonfinite", "rank": rank, "step": step})

    def update(self, version: int, loss: float | None) -> None:
        """An optimizer update made θ's version ``version``."""
        self.updates += 1
        self.p_updates.inc()
        self.p_version.set(version)
        if loss is not None:
            self.p_loss.set(loss)
        self._write({"ev": "update", "version": version, "samples": self._pending_samples, "loss": loss})
        self._pending_samples = 0.0

    def checkpoint(self, step: int, seconds: float, ok: bool, kept_bytes: int = 0) -> None:
        """A checkpoint of ``step`` reached the disk (``ok``) or failed, ``seconds`` after its cut."""
        if ok:
            self.p_ckpt_step.set(step)
            self.p_ckpt_time.set(time.time())
            self.p_ckpt_seconds.observe(seconds)
        else:
            self.p_ckpt_failed.inc()
        self.p_ckpt_kept.inc(kept_bytes)
        self._write({"ev": "checkpoint", "step": step, "seconds": round(seconds, 6), "ok": ok,
                     "kept_bytes": kept_bytes})

    def resumed(self, step: int, written_at: float) -> None:
        """The server resumed from the checkpoint of ``step``, written at ``written_at`` (Unix time)."""
        self.p_ckpt_step.set(step)
        self.p_ckpt_time.set(written_at)

    def step(self, slowest_clock: int) -> None:
        """The slowest live worker's clock."""
        self.p_step.set(slowest_clock)

    def request(self, op: str, seconds: float) -> None:
        """A request of ``op`` was answered ``seconds`` after it arrived."""
        self.p_latency.labels(op).observe(seconds)

    def received(self, nbytes: int) -> None:
        """Bytes of one received message."""
        self.bytes_in += nbytes
        self.p_in.inc(nbytes)

    def sent(self, nbytes: int) -> None:
        """Bytes of one sent message."""
        self.bytes_out += nbytes
        self.p_out.inc(nbytes)

    # ------------------------------------------------------------------ summaries
    def staleness_summary(self) -> tuple[float, int]:
        """Mean and max staleness of every applied gradient so far."""
        n = sum(self.staleness.values())
        if not n:
            return 0.0, 0
        return sum(s * c for s, c in self.staleness.items()) / n, max(self.staleness)

    def ping_fields(self) -> dict[str, Any]:
        """Fields added to PING replies: the staleness distribution, max lead, metrics URL."""
        return {"sync": self.cfg.sync, "staleness": [[s, c] for s, c in sorted(self.staleness.items())],
                "max_lead": self.max_lead, "pushes": self.pushes, "updates": self.updates,
                "metrics_url": self.url}

    def status(self) -> str:
        """Rates since the previous call, for the one-line status."""
        now = time.monotonic()
        t, updates, samples, bin_, bout = self._last
        dt = max(now - t, 1e-9)
        self._last = (now, self.updates, self.samples, self.bytes_in, self.bytes_out)
        mean, top = self.staleness_summary()
        return (f"{(self.updates - updates) / dt:.1f} updates/s, {(self.samples - samples) / dt:.0f} samples/s, "
                f"staleness mean {mean:.2f} max {top}, lead max {self.max_lead}, "
                f"in {(self.bytes_in - bin_) / dt / 1e6:.2f} MB/s, out {(self.bytes_out - bout) / dt / 1e6:.2f} MB/s")


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
