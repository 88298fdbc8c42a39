"""Fault schedules: everything a nemesis run does, drawn from one seed, printable in one line.

``Schedule.generate(seed)`` is a pure function of the seed (``random.Random(seed)``, nothing
else): the same seed always gives the same plan, on any machine. The plan chooses

* the **mode** - ``MODES[seed % len(MODES)]``, so any run of ``len(MODES)`` consecutive seeds
  covers every mode: data-parallel bsp with ``--shm auto`` and with ``--shm off``, ``--sync
  async``, ``--sync ssp --staleness 1``, pipeline gpipe, pipeline 1f1b, pipeline with 2
  replicas, two server shards, CURVE, and the local-steps rules ``--sync diloco`` and ``--sync
  diloco-async`` (H = ``--inner-steps`` 2-4, so a job has many rounds and a fault lands inside a
  round, just before a push or just after one);
* the **job** - K, the model (:data:`DATA_MODELS`: the float64 test models, one whose
  backward pauses between gradient buckets, one with a head no loss reaches), optimizer,
  weight decay, epochs, buckets, ``--checkpoint-every``, and a per-step stall (``--stall
  1:SECONDS``) that stretches the job so that faults land while it trains; for the local-steps
  rules also H, the inner optimizer (``--optimizer``: sgd, momentum, adam, adamw), ``--outer-lr``,
  ``--outer-momentum`` and, under diloco, ``--outer-delay`` 0 or 1 (overlapped rounds); under
  diloco-async the last rank stalls twice as long as rank 0 (:func:`stall_of`), so the workers
  go at different paces, the case that rule is for;
* the **start order** - the server first (the workers 0-1 s later), the workers first (the
  server 0-2 s later), one worker seconds late, or the server killed -9 and restarted on the
  same endpoint (same checkpoint directory) before any worker arrives;
* **process faults** at times after the start (seconds): ``kill`` (SIGKILL, then the
  supervisor restarts it with the same command line after ``gap`` seconds, as systemd's
  ``Restart=on-failure`` would) and ``stop`` (SIGSTOP for ``gap`` seconds, then SIGCONT);
* the **proxy's** fault rates (:class:`tests.nemesis.proxy.ProxyRates`), or none for CURVE.

[Note: what is excluded] Only faults zmqps claims to survive are drawn (README "Faults and
recovery", docs/ARCHITECTURE.md "6. Exactly once, and what each failure does"):

* a killed server needs a checkpoint to resume from: runs that kill it use
  ``--checkpoint-every`` 1-3; a killed worker needs its lease to lapse before its restart takes
  the rank: every run uses ``--lease 1.5`` and ``--heartbeat 0.3``;
* pipeline: a killed stage, or a server restarted from an older checkpoint, makes every stage
  stop with an error ([Note: stages restart together] in ``worker/pipeline/runtime.py``): its
  neighbours time out (``--timeout`` is short for stages, :data:`tests.nemesis.jobs.STAGE_TIMEOUT_S`)
  and the supervisor starts them all again, at the server's step; stages and the server are
  killed like any process;
* two shards: a shard restarted alone comes back at an older step than its sibling; the workers
  ask the sibling back to the newest step both can restore ([Note: shards rewind together] in
  ``ps/server.py``), so shard servers are killed like any process;
* SIGSTOP lasts at most 3 s: under the ZMTP heartbeat timeout (5 s), the worker ``--timeout``
  and the pipeline neighbour timeout, so a stop is a slow process, not a lost connection;
* CURVE traffic cannot be read or replayed by a proxy: CURVE runs get process faults and start
  orders only;
* the proxy never drops a message (clients resend only after a reconnect or a restart);
* diloco, diloco-async: every worker runs with its own ``--state-dir`` (README "Slow links:
  local steps"): the inner optimizer is state only the worker has, and without its round files
  a restarted worker starts a fresh one, which is no longer the uninterrupted run's math (the
  worker says so; the nemesis fails a local-steps run whose worker log says it, see
  :func:`tests.nemesis.jobs.check_round_files`). With it, both rules claim every fault above:
  kill -9 of a worker (before, during or after a push) or of the server, SIGSTOP, every start
  order and the proxy, so nothing else is excluded for them. They run with one server and
  without CURVE (shards and CURVE are modes of their own, on bsp).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from tests.nemesis.proxy import ProxyRates

MODES = ("bsp-shm", "bsp-frames", "async", "ssp", "gpipe", "1f1b", "pipe-replicas", "shards", "curve",
         "diloco", "diloco-async")
DATA_MODES = ("bsp-shm", "bsp-frames", "async", "ssp", "shards", "curve")
PIPE_MODES = ("gpipe", "1f1b", "pipe-replicas")
LOCAL_MODES = ("diloco", "diloco-async")
"""The local-steps modes: ``--sync`` is the mode's name, workers keep round files in ``--state-dir``."""
EXACT_MODES = ("bsp-shm", "bsp-frames", "gpipe", "1f1b", "pipe-replicas", "shards", "curve", "diloco")
"""Modes whose final θ is compared with the single-process reference (bsp and pipeline:
:mod:`tests.reference`, :mod:`tests.reference_pipeline`; diloco: :mod:`tests.reference_diloco`).
async, ssp and diloco-async are not deterministic: their runs check exactly-once counts instead."""
INNER_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
"""The local-steps rules' inner optimizers drawn (each one's state lives in the round files)."""

DATA_MODELS = ("tests.jobs:linear64", "tests.jobs:mlp64", "tests.nemesis.models:slow_mlp64",
               "tests.nemesis.models:spare_mlp64")
"""Data-parallel models: the float64 test models, one whose backward pauses between buckets
(drawn twice as often: a kill lands in that pause only some of the time) and one with a head
no loss reaches (:mod:`tests.nemesis.models`)."""
SLOW_BACKWARD_S = 0.06
"""The pause in :func:`tests.nemesis.models.slow_mlp64`'s backward, in the workers."""
SLOW_STAGE_S = 0.015
"""The pause in the slow pipeline models' backward, per microbatch."""

STRAGGLER = 2.0
"""Under diloco-async the last rank's stall is this many times rank 0's (:func:`stall_of`)."""

STARTS = ("server-first", "workers-first", "late-worker", "server-restart")
MAX_STOP_S = 3.0


@dataclass(frozen=True)
class Fault:
    """One process fault: at ``at`` seconds after the start, ``kind`` (kill, stop) ``target``.

    ``gap``: for ``kill`` the supervisor's restart delay, for ``stop`` how long it stays stopped.
    ``target`` is a process slot: ``server``, ``server1`` (second shard), ``worker 0``...
    """

    at: float
    kind: str
    target: str
    gap: float

    def text(self) -> str:
        """E.g. ``1.20s kill worker 1 (restart +0.40s)``."""
        what = f"restart +{self.gap:.2f}s" if self.kind == "kill" else f"for {self.gap:.2f}s"
        return f"{self.at:.2f}s {self.kind} {self.target} ({what})"


@dataclass(frozen=True)
class Job:
    """What is trained and how (the options a run's command lines are built from)."""

    model: str
    data: str
    loss: str
    optimizer: str
    lr: float
    epochs: int
    batch: int
    stall: float
    bucket_mb: float
    checkpoint_every: int
    seed: int = 0
    weight_decay: float = 0.0
    stages: int = 0
    replicas: int = 0
    microbatches: int = 0
    partition: str = ""
    inner_steps: int = 0
    """H of the local-steps rules (0: not one of them)."""
    outer_lr: float = 0.0
    outer_momentum: float = 0.0
    outer_delay: int = 0
    """diloco: ``--outer-delay`` (1: overlapped rounds, ``worker.overlap``)."""

    def text(self) -> str:
        """A compact form for the one-liner."""
        name = self.model.split(":")[1]
        optimizer = self.optimizer + (f"+wd{self.weight_decay:g}" if self.weight_decay else "")
        parts = [name, optimizer, f"e{self.epochs}", f"b{self.batch}", f"ckpt{self.checkpoint_every}",
                 f"torchseed{self.seed}"]
        if self.stages:
            parts += [f"P{self.stages}", f"R{self.replicas}", f"M{self.microbatches}"]
        elif self.inner_steps:
            parts += [f"H{self.inner_steps}", f"outer{self.outer_lr:g}m{self.outer_momentum:g}"
                      + (f"d{self.outer_delay}" if self.outer_delay else ""),
                      f"stall{self.stall:.2f}"]
        else:
            parts += [f"stall{self.stall:.2f}", f"bucket{self.bucket_mb:g}"]
        return "/".join(parts)


@dataclass(frozen=True)
class Schedule:
    """One nemesis run, fully determined by its seed (see the module doc)."""

    seed: int
    mode: str
    workers: int
    job: Job
    start: str
    start_gap: float
    late_rank: int
    faults: tuple[Fault, ...]
    proxy: ProxyRates | None
    expected_s: float = field(default=0.0)
    """Roughly how long the job trains without faults (fault times are drawn below it)."""

    # ------------------------------------------------------------------ derived
    @property
    def shards(self) -> int:
        """Server processes (shards) in the run."""
        return 2 if self.mode == "shards" else 1

    @property
    def sync(self) -> str:
        """``--sync`` of the run."""
        return self.mode if self.mode in ("async", "ssp", *LOCAL_MODES) else "bsp"

    @property
    def pipeline(self) -> bool:
        """Whether the workers are pipeline stages."""
        return self.mode in PIPE_MODES

    @property
    def local_steps(self) -> bool:
        """Whether the workers take local steps (``--sync diloco`` or ``diloco-async``)."""
        return self.mode in LOCAL_MODES

    @property
    def exact(self) -> bool:
        """Whether θ is compared with the reference (else exactly-once counts are checked)."""
        return self.mode in EXACT_MODES

    def text(self) -> str:
        """The plan on one line."""
        start = f"{self.start}+{self.start_gap:.2f}s"
        if self.start == "late-worker":
            start = f"late-worker(worker {self.late_rank})+{self.start_gap:.2f}s"
        faults = "; ".join(f.text() for f in self.faults) or "none"
        net = self.proxy.text() if self.proxy is not None else "no-proxy"
        return (f"mode={self.mode} K={self.workers} job={self.job.text()} start={start} "
                f"faults=[{faults}] net={net}")

    # ------------------------------------------------------------------ generation
    @classmethod
    def generate(cls, seed: int) -> "Schedule":
        """The schedule of ``seed`` (a pure function of it)."""
        rng = random.Random(seed)
        mode = MODES[seed % len(MODES)]
        job, workers, expected = _job(rng, mode)
        start = rng.choice(STARTS)
        late_rank = rng.randrange(workers)
        start_gap = {"server-first": rng.uniform(0.0, 1.0), "workers-first": rng.uniform(0.0, 2.0),
                     "late-worker": rng.uniform(2.0, 5.0), "server-restart": rng.uniform(0.1, 1.0)}[start]
        faults = _faults(rng, mode, workers, expected)
        if any(f.kind == "kill" and f.target.startswith("server") for f in faults) and job.checkpoint_every == 0:
            job = replace(job, checkpoint_every=rng.randint(1, 3))
        proxy = None if mode == "curve" else _rates(rng)
        return cls(seed, mode, workers, job, start, start_gap, late_rank, faults, proxy, expected)


def _job(rng: random.Random, mode: str) -> tuple[Job, int, float]:
    """The job of ``mode``: (job, K, expected seconds of training)."""
    if mode in PIPE_MODES:
        replicas = 2 if mode == "pipe-replicas" else 1
        stages = 2 if replicas == 2 else rng.choice((2, 3))
        model, partition = (("tests.nemesis.models:slow_seed_pipe64", "0:2,2:3") if stages == 2
                            else ("tests.nemesis.models:slow_tuple_pipe64", "0:4,4:6,6:7"))
        epochs = rng.randint(6, 10)
        micro = rng.choice((1, 2, 4))
        job = Job(model=model, data="tests.pipeline_jobs:data246", loss="mse",
                  optimizer=rng.choice(("sgd", "momentum")), lr=0.05, epochs=epochs, batch=60, stall=0.0,
                  bucket_mb=0.0, checkpoint_every=rng.choice((0, 1, 2)), stages=stages, replicas=replicas,
                  microbatches=micro, partition=partition, seed=rng.randrange(1000))
        steps = epochs * (5 if replicas == 1 else 3)  # 246 rows in batches of 60 (per replica: 123 rows, 30)
        return job, stages * replicas, steps * (micro * SLOW_STAGE_S + 0.01) + 0.5
    if mode in LOCAL_MODES:
        return _local_job(rng, mode)
    workers = 2 if mode == "shards" else rng.choice((2, 3))
    model = rng.choices(DATA_MODELS, weights=(1, 1, 2, 1))[0]
    data, loss, rows = (("tests.jobs:data64", "mse", 1000) if model == "tests.jobs:linear64"
                        else ("tests.jobs:class_data64", "cross_entropy", 600))
    # 10 steps an epoch with K = 2; with K = 3, 11 steps whose last batch is short but never empty
    batch = rows // 10 if workers == 2 else {1000: 99, 600: 57}[rows]
    optimizer = rng.choice(("sgd", "momentum", "adam"))
    epochs = rng.randint(1, 2)
    stall = rng.choice((0.05, 0.1, 0.15))
    bucket = rng.choice((16.0, 0.0, 0.0003)) if mode != "async" and mode != "ssp" else 16.0
    if model == "tests.nemesis.models:slow_mlp64" and mode not in ("async", "ssp"):
        bucket = 0.0003  # the pause in backward is between buckets only when there are several
    job = Job(model=model, data=data, loss=loss, optimizer=optimizer, lr=0.01, epochs=epochs, batch=batch,
              stall=stall, bucket_mb=bucket, checkpoint_every=rng.choice((0, 1, 3)), seed=rng.randrange(1000),
              weight_decay=rng.choice((0.0, 0.0, 0.01)))
    steps = epochs * (10 if workers == 2 else 11)
    pause = SLOW_BACKWARD_S if model.endswith(":slow_mlp64") else 0.0
    return job, workers, steps * (stall + pause + 0.03) + 0.5


def _local_job(rng: random.Random, mode: str) -> tuple[Job, int, float]:
    """A diloco or diloco-async job: (job, K, expected seconds of training).

    H is 2-4 and the job 2-3 epochs (20-33 inner steps: 5-17 rounds), so faults land in every
    part of a round; ``--stall`` is paid before every inner step (the model is tiny, a round would
    otherwise take milliseconds). Under diloco-async the workers go at different paces
    (:data:`STRAGGLER`), the case that rule is for.
    """
    workers = rng.choice((2, 3))
    model = rng.choices(DATA_MODELS, weights=(1, 1, 2, 1))[0]
    data, loss, rows = (("tests.jobs:data64", "mse", 1000) if model == "tests.jobs:linear64"
                        else ("tests.jobs:class_data64", "cross_entropy", 600))
    batch = rows // 10 if workers == 2 else {1000: 99, 600: 57}[rows]
    epochs = rng.randint(2, 3)
    stall = rng.choice((0.02, 0.04, 0.06))
    job = Job(model=model, data=data, loss=loss, optimizer=rng.choice(INNER_OPTIMIZERS), lr=0.01, epochs=epochs,
              batch=batch, stall=stall, bucket_mb=16.0, checkpoint_every=rng.choice((0, 1, 2, 3)),
              seed=rng.randrange(1000), weight_decay=rng.choice((0.0, 0.0, 0.01)),
              inner_steps=rng.choice((2, 3, 4)), outer_lr=rng.choice((0.7, 1.0)),
              outer_momentum=rng.choice((0.0, 0.5, 0.9)), outer_delay=rng.choice((0, 1)) if mode == "diloco" else 0)
    steps = epochs * (10 if workers == 2 else 11)
    pause = SLOW_BACKWARD_S if model.endswith(":slow_mlp64") else 0.0
    slowest = stall * (STRAGGLER if mode == "diloco-async" else 1.0)
    return job, workers, steps * (slowest + pause + 0.01) + 0.5


def stall_of(s: "Schedule", rank: int) -> float:
    """``--stall 1:SECONDS`` of ``rank``: the job's, except under diloco-async, where rank k's is
    (1 + (STRAGGLER − 1)·k/(K − 1)) times it: rank 0 goes at full pace, the last rank at 1/STRAGGLER
    of it, so a fast worker pushes several rounds between two of a slow one's (and between two
    checkpoints: [Note: round files] in ``worker.roundstate``)."""
    if s.mode != "diloco-async":
        return s.job.stall
    return s.job.stall * (1.0 + (STRAGGLER - 1.0) * rank / max(1, s.workers - 1))


def _targets(mode: str, workers: int) -> tuple[list[str], list[str]]:
    """(processes that may be killed once training runs, processes that may be stopped)."""
    ranks = [f"worker {k}" for k in range(workers)]
    servers = ["server", "server1"] if mode == "shards" else ["server"]
    return servers + ranks, servers + ranks


def _faults(rng: random.Random, mode: str, workers: int, expected: float) -> tuple[Fault, ...]:
    """0-3 process faults during training, never overlapping on one process."""
    killable, stoppable = _targets(mode, workers)
    busy: dict[str, float] = {}
    out = []
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        kind = "kill" if killable and rng.random() < 0.5 else "stop"
        target = rng.choice(killable if kind == "kill" else stoppable)
        at = round(rng.uniform(0.2, max(0.4, expected)), 2)
        gap = round(rng.uniform(0.1, 1.0) if kind == "kill" else rng.uniform(0.5, MAX_STOP_S), 2)
        if at < busy.get(target, 0.0):
            continue  # that process is still down or stopped from an earlier fault: draw no other
        busy[target] = at + gap + 2.0
        out.append(Fault(at, kind, target, gap))
    return tuple(sorted(out, key=lambda f: f.at))


def _rates(rng: random.Random) -> ProxyRates:
    """The proxy's fault rates: a clean network one time in five."""
    if rng.random() < 0.2:
        return ProxyRates()
    return ProxyRates(duplicate=round(rng.uniform(0.0, 0.08), 3), delay=round(rng.uniform(0.0, 0.15), 3),
                      reorder=round(rng.uniform(0.0, 0.5), 2), delay_ms=(2.0, round(rng.uniform(20.0, 300.0))))


def parse_seeds(text: str) -> list[int]:
    """``0-299``, ``5``, ``1,4,9-12`` -> the seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds
