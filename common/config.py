"""Configuration of every role, in one place.

Each role has one frozen dataclass (:class:`ServerConfig`, :class:`WorkerConfig`,
:class:`LaunchConfig`). Every field is an option described once in :data:`OPTIONS`: its
command-line flag, its ``PS_*`` environment variable, its help text and allowed values.
Precedence: command line > ``PS_*`` environment > ``--config FILE`` (TOML, the same keys as
the options, e.g. ``batch_size = 64`` or ``batch-size = 64``) > the dataclass default. This
module is the only place that reads the environment or a config file; a ``PS_*`` variable or
a config key that no role knows fails at start, naming it.

The choices of ``--optimizer``, ``--sync``, ``--schedule`` and ``--loss`` and their help come
from :mod:`common.names`. :class:`LaunchConfig` is composed, not copied: the job's fields, the
launcher's own, and every server option (:func:`launch_config`), so a new server option is one
:data:`OPTIONS` entry and one :class:`ServerConfig` field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

from common.errors import ConfigError
from common.faults import parse_fault
from common.names import Choice, Loss, Optimizer, PipelineSchedule, SyncModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "PS_"


@dataclass(frozen=True)
class Option:
    """One user-facing option: flag, value type, help, allowed values and help group.

    An option that picks one of a kind of names (``--optimizer``, ``--sync``, ``--schedule``,
    ``--loss``) gives ``names`` (a :class:`common.names.Choice`) instead of ``choices``: its
    choices and the description of each come from there.
    """

    flag: str
    kind: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    group: str = "general"
    names: type[Choice] | None = None

    def __post_init__(self) -> None:
        if self.names is not None:
            object.__setattr__(self, "choices", self.names.names())

    @property
    def text(self) -> str:
        """The help as ``--help`` and the README show it: with each name's description, if any."""
        return self.help if self.names is None else f"{self.help}: {self.names.describe()}"

    @property
    def env(self) -> str:
        """The ``PS_*`` environment variable for this option."""
        return ENV_PREFIX + self.flag.lstrip("-").upper().replace("-", "_")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


OPTIONS: dict[str, Option] = {
    # server
    "bind": Option("--bind", str, "endpoint the server binds (port 0 lets the OS choose)", group="server"),
    "workers": Option("--workers", int, "number of workers K", group="server"),
    "optimizer": Option("--optimizer", str, "torch.optim optimizer the server applies", names=Optimizer,
                        group="optimizer"),
    "lr": Option("--lr", float, "learning rate", group="optimizer"),
    "clip_grad_norm": Option("--clip-grad-norm", float, "clip the averaged gradient to this total 2-norm "
                             "before each update, as torch.nn.utils.clip_grad_norm_ does after DDP's "
                             "allreduce (bsp: over the whole model; async/ssp: over each push; needs one "
                             "server shard)", group="optimizer"),
    "momentum": Option("--momentum", float, "momentum", group="optimizer"),
    "weight_decay": Option("--weight-decay", float, "weight decay", group="optimizer"),
    "sync": Option("--sync", str, "consistency model", names=SyncModel, group="consistency"),
    "staleness": Option("--staleness", int, "SSP staleness bound S, in steps (clocks)", group="consistency"),
    "checkpoint_dir": Option("--checkpoint-dir", str, "directory for checkpoints and final.safetensors",
                             group="checkpoints"),
    "resume": Option("--resume", str, "a job already in --checkpoint-dir: auto resumes an unfinished one (as "
                     "after a crash) and refuses to start on a finished one; always resumes either (a finished "
                     "job trains further when the workers get more --epochs); never moves its files into "
                     "previous-TIME/ inside the folder and starts a new job", ("auto", "always", "never"),
                     group="checkpoints"),
    "checkpoint_every": Option("--checkpoint-every", int, "checkpoint every N steps, written in the background "
                               "while training goes on (0: only at the end)",
                               group="checkpoints"),
    "ready_file": Option("--ready-file", str, "write the bound endpoint to this file once listening",
                         group="server"),
    "max_message_mb": Option("--max-message-mb", int, "largest frame accepted, in MiB (ZMQ_MAXMSGSIZE)",
                             group="server"),
    "metrics_port": Option("--metrics-port", int, "serve Prometheus metrics over HTTP on this port "
                           "(0: the OS picks; the URL is logged and in PING replies)", group="metrics"),
    "metrics_bind": Option("--metrics-bind", str, "address the Prometheus endpoint listens on: 127.0.0.1 "
                           "keeps it on this host; 0.0.0.0 lets other hosts scrape it, unauthenticated and "
                           "unencrypted even when CURVE is on", group="metrics"),
    "metrics_log": Option("--metrics-log", str, "append one JSON line per applied update to this file "
                          "(ps-plot turns it into a PNG)", group="metrics"),
    "status_every": Option("--status-every", float, "seconds between the server's one-line status logs",
                           group="metrics"),
    # worker
    "server": Option("--server", str, "server endpoint, e.g. tcp://HOST:5555", group="worker"),
    "rank": Option("--rank", int, "this worker's rank k (data mode: leave it out and the server assigns one)",
                   group="worker"),
    "worker_id": Option("--worker-id", str, "id the server keys an assigned rank by, stable across restarts",
                        group="worker"),
    "world_size": Option("--world-size", int, "number of workers K", group="worker"),
    "mode": Option("--mode", str, "data parallel or pipeline stages", ("data", "pipeline"), group="worker"),
    "model": Option("--model", str, "MODULE:FACTORY returning an nn.Module",
                    group="job"),
    "data": Option("--data", str, "MODULE:FACTORY returning a map-style dataset of (x, y)",
                   group="job"),
    "loss": Option("--loss", str, "loss function", names=Loss, group="job"),
    "epochs": Option("--epochs", int, "epochs", group="job"),
    "batch_size": Option("--batch-size", int, "global batch size B (each worker uses B/K rows)", group="job"),
    "no_shuffle": Option("--no-shuffle", _bool, "keep each shard in order", group="job"),
    "seed": Option("--seed", int, "seed for the model and the data set", group="job"),
    "device": Option("--device", str, "auto, cpu, cuda or cuda:N", group="job"),
    "timeout": Option("--timeout", float, "seconds a call may go without any sign of life from the server "
                      "(it retries and reconnects meanwhile) before it fails", group="worker"),
    "progress": Option("--progress", str, "progress bar: auto (rank 0 on a terminal), on, off",
                       ("auto", "on", "off"), group="worker"),
    # performance (server and worker)
    "shm": Option("--shm", str, "same-host shared-memory fast path for tensors (bsp only; off: always frames)",
                  ("auto", "off"), group="performance"),
    "io_threads": Option("--io-threads", int, "ZeroMQ I/O threads", group="performance"),
    "chunk_mb": Option("--chunk-mb", float, "split tensors into pieces (server keys, frames) of at most this "
                       "many MiB (0: never)", group="performance"),
    "bucket_mb": Option("--bucket-mb", float, "push gradients in buckets of about this many MiB as backward "
                        "produces them (0: one push after backward)", group="performance"),
    "wire_dtype": Option("--wire-dtype", str, "dtype of floating-point gradients on the wire (auto: as computed)",
                         ("auto", "float16", "bfloat16"), group="performance"),
    # pipeline
    "stages": Option("--stages", int, "pipeline: number of stages P", group="pipeline"),
    "replicas": Option("--replicas", int, "pipeline: replicas R of every stage; ps-launch starts P x R "
                       "stage workers (pipeline x data parallel)", group="pipeline"),
    "partition": Option("--partition", str, "pipeline: layer ranges a:b,b:c,... of the nn.Sequential, or auto "
                        "(balance measured forward+backward time) or params (balance parameter count)",
                        group="pipeline"),
    "microbatches": Option("--microbatches", int, "pipeline: microbatches M each batch is split into",
                           group="pipeline"),
    "schedule": Option("--schedule", str, "pipeline schedule", names=PipelineSchedule, group="pipeline"),
    "peer_bind": Option("--peer-bind", str, "pipeline: endpoint this stage binds for its neighbours "
                        "(port 0 lets the OS choose)", group="pipeline"),
    "peer_advertise": Option("--peer-advertise", str, "pipeline: host name neighbours dial when --peer-bind "
                             "is a wildcard address", group="pipeline"),
    "peer_prev": Option("--peer-prev", str, "pipeline: endpoint of the previous stage",
                        group="pipeline"),
    "peer_next": Option("--peer-next", str, "pipeline: endpoint of the next stage",
                        group="pipeline"),
    "stall": Option("--stall", str, "inject jitter: before each step, sleep SECONDS with probability P "
                    "(P:SECONDS; the draw depends on seed, rank and step)", group="testing"),
    # launcher
    "example": Option("--example", str, "run a bundled example job (its model, data and hyper-parameters "
                      "become the defaults)", ("digits",), group="job"),
    # faults and recovery
    "on_worker_loss": Option("--on-worker-loss", str, "bsp: when a worker's lease lapses, hold the step until "
                             "its rank returns (wait; the job fails after --rejoin-deadline) or continue with "
                             "the live workers (shrink)", ("wait", "shrink"), group="faults"),
    "nonfinite": Option("--nonfinite", str, "a pushed gradient with NaN or an infinity: apply it as torch.optim "
                        "would (apply), leave that push out of the step's average (skip; bsp only), or refuse it "
                        "with an error that names the rank and step (fail)", ("apply", "skip", "fail"),
                        group="faults"),
    "rejoin_deadline": Option("--rejoin-deadline", float, "seconds a lost (or never registered) worker has to "
                              "come back before the job fails", group="faults"),
    "lease": Option("--lease", float, "seconds without a message or heartbeat after which a worker is lost",
                    group="faults"),
    "heartbeat": Option("--heartbeat", float, "seconds between this worker's heartbeats to the server (0: none)",
                        group="faults"),
    "fault": Option("--fault", str, "testing: stop or kill this process at a point of a step, "
                    "ACTION:POINT:STEP such as stop:after-push:7 (see common/faults.py)", group="testing"),
    # security
    "curve_secret_key": Option("--curve-secret-key", str, "CURVE: this process's certificate "
                               "(NAME.key_secret from ps-keygen)", group="security"),
    "curve_authorized_keys": Option("--curve-authorized-keys", str, "CURVE: directory of the public keys (*.key) "
                                    "allowed to connect (workers: to a stage's peer inbox)",
                                    group="security"),
    "curve_server_key": Option("--curve-server-key", str, "CURVE: the server's public key (SERVER.key)",
                               group="security"),
    # common
    "log_level": Option("--log-level", str, "logging level",
                        ("debug", "info", "warning", "error"), group="general"),
    # every role; read by parse_config itself, not a dataclass field
    "config": Option("--config", str, "TOML file with option values (same keys as the options)",
                     group="general"),
}
CONFIG_ONLY_AT_PARSE = frozenset({"config"})


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of ``ps-server``."""

    bind: str = "tcp://0.0.0.0:5555"
    workers: int | None = None
    optimizer: str = Optimizer.SGD.value
    lr: float = 0.01
    momentum: float | None = None
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    sync: str = SyncModel.BSP.value
    staleness: int = 0
    checkpoint_dir: str = "checkpoints"
    resume: str = "auto"
    checkpoint_every: int = 0
    ready_file: str | None = None
    max_message_mb: int = 4096
    shm: str = "auto"
    io_threads: int = 1
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    metrics_log: str | None = None
    status_every: float = 10.0
    on_worker_loss: str = "wait"
    nonfinite: str = "apply"
    rejoin_deadline: float = 300.0
    lease: float = 5.0
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None
    fault: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        _positive("io_threads", self.io_threads)
        _check_metrics(self.metrics_port, self.status_every)
        _positive("lease", self.lease)
        _positive("rejoin_deadline", self.rejoin_deadline)
        _check_fault(self.fault)
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ConfigError("CURVE needs both --curve-secret-key and --curve-authorized-keys")
        if self.workers is None:
            raise ConfigError("--workers is required (or PS_WORKERS)")
        _positive("workers", self.workers)
        _nonneg("lr", self.lr)
        _nonneg("weight_decay", self.weight_decay)
        _nonneg("staleness", self.staleness)
        _nonneg("checkpoint_every", self.checkpoint_every)
        _positive("max_message_mb", self.max_message_mb)
        if self.momentum is not None:
            _nonneg("momentum", self.momentum)
        if self.clip_grad_norm is not None:
            _positive("clip_grad_norm", self.clip_grad_norm)
        if self.nonfinite == "skip" and self.sync != SyncModel.BSP:
            raise ConfigError(f"--nonfinite skip leaves a push out of a step's average: it needs --sync bsp, "
                              f"not {self.sync} (use --nonfinite fail)")


@dataclass(frozen=True)
class JobFields:
    """Options that describe the training job (shared by workers and the launcher)."""

    mode: str = "data"
    model: str | None = None
    data: str | None = None
    loss: str = Loss.MSE.value
    epochs: int = 10
    batch_size: int = 100
    no_shuffle: bool = False
    seed: int = 0
    device: str = "auto"
    timeout: float = 60.0
    progress: str = "auto"
    stages: int | None = None
    partition: str = "auto"
    microbatches: int = 4
    schedule: str = PipelineSchedule.ONE_F_ONE_B.value
    stall: str | None = None
    shm: str = "auto"
    io_threads: int = 1
    chunk_mb: float = 1.0
    bucket_mb: float = 16.0
    wire_dtype: str = "auto"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.stall is not None:
            parse_stall(self.stall)
        _positive("io_threads", self.io_threads)
        _nonneg("chunk_mb", self.chunk_mb)
        _nonneg("bucket_mb", self.bucket_mb)
        _positive("epochs", self.epochs)
        _positive("microbatches", self.microbatches)
        if self.stages is not None:
            _positive("stages", self.stages)
        ranges = _partition_ranges(self.partition)
        if ranges and self.stages is not None and self.stages != len(ranges):
            raise ConfigError(f"--stages {self.stages} but --partition gives {len(ranges)} ranges")
        _positive("batch_size", self.batch_size)
        _positive("timeout", self.timeout)
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")


@dataclass(frozen=True)
class WorkerConfig(JobFields):
    """Configuration of ``ps-worker``."""

    server: str = "tcp://127.0.0.1:5555"
    rank: int | None = None
    world_size: int | None = None
    peer_bind: str = "tcp://127.0.0.1:0"
    peer_advertise: str | None = None
    peer_prev: str | None = None
    peer_next: str | None = None
    worker_id: str | None = None
    heartbeat: float = 1.0
    curve_server_key: str | None = None
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None
    fault: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _nonneg("heartbeat", self.heartbeat)
        _check_fault(self.fault)
        if (self.curve_server_key is None) != (self.curve_secret_key is None):
            raise ConfigError("CURVE needs both --curve-server-key and --curve-secret-key")
        if self.curve_authorized_keys is not None and self.curve_server_key is None:
            raise ConfigError("--curve-authorized-keys on a worker needs CURVE on (--curve-server-key)")
        if self.world_size is None:
            raise ConfigError("--world-size is required (or PS_WORLD_SIZE)")
        _positive("world_size", self.world_size)
        if self.rank is None and self.mode == "pipeline":
            raise ConfigError("--rank is required in pipeline mode (or PS_RANK)")
        if self.worker_id is not None and not 0 < len(self.worker_id) <= 256:
            raise ConfigError(f"--worker-id must have 1 to 256 characters, got {self.worker_id!r}")
        if self.rank is not None and not 0 <= self.rank < self.world_size:
            raise ConfigError(f"--rank must be in [0, {self.world_size}), got {self.rank}")
        shards = self.world_size
        if self.mode == "pipeline":
            _resolve_stages(self, self.world_size)
            assert self.stages is not None
            if self.world_size % self.stages:
                raise ConfigError(f"--world-size {self.world_size} is not a multiple of --stages {self.stages} "
                                  f"(pipeline: world size = stages x replicas)")
            shards = self.world_size // self.stages
        if self.batch_size < shards:
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than the {shards} "
                              f"{'replicas' if self.mode == 'pipeline' else 'workers'}")


LAUNCHER_OMITS: dict[str, str] = {
    "bind": "the launcher binds tcp://127.0.0.1:0 (the OS picks the port) and gives the workers that endpoint",
    "ready_file": "the launcher's own: the server writes its endpoint there for the launcher",
    "max_message_mb": "a launched server hears only the launcher's own workers; ps-server's default serves them",
    "curve_secret_key": "a launched job runs on one host, without CURVE",
    "curve_authorized_keys": "a launched job runs on one host, without CURVE",
    "fault": "testing: given to one ps-server or ps-worker directly",
}
"""The :class:`ServerConfig` fields ``ps-launch`` does not offer, each with the reason.

Every other server option is an option of ``ps-launch`` too, with the server's default, and
reaches the server it starts (:func:`launch_config`): a new server option needs no edit here
or in ``worker/launch.py``. The launcher's own fields (:class:`LaunchFields`) take precedence
over a server field of the same name (``workers``, ``checkpoint_dir``: other defaults).
"""


@dataclass(frozen=True)
class LaunchFields(JobFields):
    """What ``ps-launch`` adds to the job: K, the replicas, its checkpoint folder, an example.

    Not a role by itself: :func:`launch_config` adds the server's options, giving
    :class:`LaunchConfig`. In pipeline mode the launcher starts ``stages x replicas`` workers;
    ``--workers`` may be left out (it is derived) or must equal that product.
    """

    SERVER: ClassVar[type]
    """The server's configuration class, whose options this launcher offers and passes on."""

    workers: int | None = None
    replicas: int = 1
    checkpoint_dir: str | None = None
    example: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("replicas", self.replicas)
        shards = self.workers
        if self.mode == "pipeline":
            _resolve_stages(self, 2)
            assert self.stages is not None
            world = self.stages * self.replicas
            if self.workers is not None and self.workers != world:
                raise ConfigError(f"--workers {self.workers} != --stages {self.stages} x --replicas "
                                  f"{self.replicas} (leave --workers out in pipeline mode)")
            object.__setattr__(self, "workers", world)
            shards = self.replicas
        elif self.workers is None:
            object.__setattr__(self, "workers", 2)
            shards = 2
        assert self.workers is not None and shards is not None
        _positive("workers", self.workers)
        if self.batch_size < shards:
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than the {shards} "
                              f"{'replicas' if self.mode == 'pipeline' else 'workers'}")
        self.server_config()  # the server's own checks (--lr, --lease, --nonfinite with --sync, ...), now

    @classmethod
    def server_options(cls) -> tuple[str, ...]:
        """The server's fields this launcher passes on: every one but :data:`LAUNCHER_OMITS`."""
        return tuple(f.name for f in dataclasses.fields(cls.SERVER) if f.name not in LAUNCHER_OMITS)

    def server_config(self, **sets: Any) -> Any:
        """The configuration of the server this launch starts: its options here, then ``sets``.

        Raises:
            ConfigError: the server would refuse these values.
        """
        values = {n: getattr(self, n) for n in self.server_options() if getattr(self, n) is not None}
        return self.SERVER(**{**values, **sets})


def launch_config(server: type, name: str = "LaunchConfig") -> type[LaunchFields]:
    """The configuration class of a launcher of ``server``: :class:`LaunchFields` + the server's options.

    Each field of ``server`` that :class:`LaunchFields` does not declare and
    :data:`LAUNCHER_OMITS` does not list becomes a field of the class, with the same type and
    default; so ``--help``, ``PS_*`` variables and config keys of the launcher follow the server's.
    """
    own = {f.name for f in dataclasses.fields(LaunchFields)}
    stale = set(LAUNCHER_OMITS) - {f.name for f in dataclasses.fields(server)}
    if stale:
        raise TypeError(f"LAUNCHER_OMITS names {sorted(stale)}, which {server.__name__} does not have")
    added = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                        metadata=f.metadata)) for f in dataclasses.fields(server)
             if f.name not in own and f.name not in LAUNCHER_OMITS]
    doc = (f"Configuration of ``ps-launch``: the job, the launcher's own options and every option of "
           f"{server.__name__} but {', '.join(LAUNCHER_OMITS)} (generated by :func:`launch_config`).")
    return dataclasses.make_dataclass(name, added, bases=(LaunchFields,), frozen=True,
                                      namespace={"SERVER": server, "__doc__": doc, "__module__": __name__})


LaunchConfig = launch_config(ServerConfig)


_RANGES = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


def _partition_ranges(text: str) -> list[tuple[int, int]]:
    """The ranges of an explicit ``--partition`` (empty for ``auto``/``params``); checks the syntax.

    Ranges must be contiguous from layer 0 and non-empty; whether they end at the model's last
    layer is checked once the model is built.
    """
    if text in ("auto", "params"):
        return []
    if not _RANGES.match(text.replace(" ", "")):
        raise ConfigError(f"--partition must be auto, params or ranges like 0:3,3:5,5:7; got {text!r}")
    ranges = [(int(a), int(b)) for a, b in (r.split(":") for r in text.replace(" ", "").split(","))]
    expect = 0
    for a, b in ranges:
        if a != expect or b <= a:
            raise ConfigError(f"--partition {text!r}: ranges must be non-empty and contiguous from layer 0 "
                              f"(a range starts where the previous one ends)")
        expect = b
    return ranges


def _resolve_stages(cfg: Any, default: int) -> None:
    """Fill in ``stages`` of a frozen config: the number of explicit ranges, else ``default``."""
    if cfg.stages is None:
        ranges = _partition_ranges(cfg.partition)
        object.__setattr__(cfg, "stages", len(ranges) if ranges else default)


@dataclass(frozen=True)
class PingConfig:
    """Configuration of ``ps-ping`` (a health probe: one PING to the server)."""

    server: str = "tcp://127.0.0.1:5555"
    timeout: float = 5.0
    curve_server_key: str | None = None
    curve_secret_key: str | None = None
    log_level: str = "warning"

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        if (self.curve_server_key is None) != (self.curve_secret_key is None):
            raise ConfigError("CURVE needs both --curve-server-key and --curve-secret-key")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _nonneg(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {value}")


def _check_fault(spec: str | None) -> None:
    if spec is not None:
        parse_fault(spec)  # raises ConfigError


def _check_metrics(port: int | None, status_every: float) -> None:
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be in [0, 65535], got {port}")
    _positive("status_every", status_every)


def parse_stall(text: str) -> tuple[float, float]:
    """``P:SECONDS`` of ``--stall`` as (probability, seconds).

    Raises:
        ConfigError: not two numbers, P outside [0, 1] or negative SECONDS.
    """
    prob, sep, secs = text.partition(":")
    try:
        p, s = float(prob), float(secs)
    except ValueError:
        p = s = float("nan")
    if not sep or not (0.0 <= p <= 1.0) or not (s >= 0.0):
        raise ConfigError(f"--stall must be P:SECONDS with 0 <= P <= 1 and SECONDS >= 0, got {text!r}")
    return p, s


C = TypeVar("C")

KNOWN_ENV: frozenset[str] = frozenset(opt.env for opt in OPTIONS.values())

NONE_MEANS: dict[str, str] = {
    "workers": "required", "world_size": "required", "rank": "assigned by the server (data mode)",
    "model": "nn.Linear(10, 1)", "data": "1000 random samples", "momentum": "0 for sgd, 0.9 for momentum",
    "clip_grad_norm": "off", "metrics_port": "off", "metrics_log": "off", "ready_file": "none",
    "stages": "the number of --partition ranges, else the world size", "stall": "off", "fault": "off",
    "worker_id": "HOSTNAME-PID", "peer_advertise": "the host of --peer-bind", "peer_prev": "from the server",
    "peer_next": "from the server", "example": "none", "curve_secret_key": "off (no CURVE)",
    "curve_authorized_keys": "off; workers: the directory of --curve-server-key",
    "curve_server_key": "off (no CURVE)",
}
"""What an option left at None means, as ``--help`` and the README's table show its default."""

_NONE_MEANS_BY_ROLE: dict[tuple[str, str], str] = {
    ("LaunchConfig", "workers"): "2 (pipeline: stages x replicas)",
    ("LaunchConfig", "checkpoint_dir"): "runs/launch-TIME",
    ("LaunchConfig", "metrics_log"): "metrics.jsonl in the checkpoint directory",
    ("LaunchConfig", "stages"): "the number of --partition ranges, else 2",
}


def default_text(cls: type, name: str) -> str:
    """The default of option ``name`` in role ``cls`` as a person reads it (never ``None``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is dataclasses.MISSING or f.default is None:
        return _NONE_MEANS_BY_ROLE.get((cls.__name__, name), NONE_MEANS.get(name, "none"))
    return str(f.default)


START_HERE = "start here"
"""The help group listed first: the options a first run of each program needs."""

ESSENTIALS: dict[str, tuple[str, ...]] = {
    "ServerConfig": ("bind", "workers", "checkpoint_dir", "resume", "optimizer", "lr"),
    "WorkerConfig": ("server", "world_size", "rank", "model", "data", "loss", "epochs", "batch_size"),
    "LaunchConfig": ("workers", "example", "model", "data", "loss", "epochs", "batch_size", "optimizer", "lr",
                     "checkpoint_dir"),
}
GROUP_ORDER = ("job", "worker", "server", "optimizer", "consistency", "checkpoints", "pipeline", "metrics",
               "faults", "performance", "security", "general", "testing")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for ``cls``: one flag per field, grouped, with env names in help.

    The help starts with a short usage line and the role's :data:`ESSENTIALS` (group
    ``start here``); every other option follows under its group, in :data:`GROUP_ORDER`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, usage=f"{prog} [OPTIONS]",
                                     argument_default=argparse.SUPPRESS,
                                     epilog="Every option can also be set by the PS_* variable shown, or as "
                                            "a key of a TOML file given by --config (e.g. batch_size = 64). "
                                            "Precedence: command line > environment > config file > default.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    first = [n for n in ESSENTIALS.get(cls.__name__, ()) if n in fields]
    rest = sorted((n for n in fields if n not in first),
                  key=lambda n: GROUP_ORDER.index(OPTIONS[n].group) if OPTIONS[n].group in GROUP_ORDER
                  else len(GROUP_ORDER))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in [*first, *rest]:
        f = fields[name]
        opt = OPTIONS[f.name]
        title = START_HERE if name in first else opt.group
        group = groups.setdefault(title, parser.add_argument_group(title))
        text = f"{opt.text} [{opt.env}; default: {default_text(cls, f.name)}]"
        if opt.kind is _bool:
            group.add_argument(opt.flag, dest=f.name, action="store_const", const=True, help=text)
        else:
            group.add_argument(opt.flag, dest=f.name, type=opt.kind, choices=opt.choices, help=text,
                               metavar=None if opt.choices else f.name.upper())
    cfg_opt = OPTIONS["config"]
    groups.setdefault(cfg_opt.group, parser.add_argument_group(cfg_opt.group)).add_argument(
        cfg_opt.flag, dest="config", metavar="FILE", help=f"{cfg_opt.help} [{cfg_opt.env}]")
    return parser


def check_env(environ: Mapping[str, str]) -> None:
    """Fail on a ``PS_*`` variable that no role knows (a typo would otherwise be ignored)."""
    known = {opt.env for opt in OPTIONS.values()}  # KNOWN_ENV, and any option added since
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")


def _toml_value(opt: Option, value: Any) -> Any:
    """A TOML value checked against the option's type and choices."""
    if opt.kind is _bool:
        ok = isinstance(value, bool)
    elif opt.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif opt.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {_bool: "a boolean", int: "an integer", float: "a number"}.get(opt.kind, "a string")
        raise ValueError(f"must be {want}, got {type(value).__name__} {value!r}")
    if opt.choices and value not in opt.choices:
        raise ValueError(f"must be one of {', '.join(opt.choices)}, got {value!r}")
    return value


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file into ``{field name: value}``.

    Keys are option names with ``_`` or ``-`` (``batch_size`` or ``batch-size``); a key that
    belongs to another role is accepted (one file can serve a whole job) and ignored there.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown (named), or a value
            has the wrong type or is not an allowed choice.
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        opt = OPTIONS.get(name)
        if opt is None or name in CONFIG_ONLY_AT_PARSE:
            known = ", ".join(sorted(n for n in OPTIONS if n not in CONFIG_ONLY_AT_PARSE))
            raise ConfigError(f"--config {path}: unknown key {key!r}; known keys: {known}")
        try:
            out[name] = _toml_value(opt, value)
        except ValueError as e:
            raise ConfigError(f"--config {path}: {key} {e}") from None
    return out


def parse_config(cls: type[C], argv: Sequence[str] | None, prog: str, description: str = "",
                 environ: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> C:
    """Parse ``argv``, ``environ`` and ``--config`` into ``cls``.

    Precedence: command line > environment > config file > ``defaults`` (e.g. an example's
    presets) > the dataclass default.

    Raises:
        ConfigError: a bad value, unknown ``PS_*`` variable or config key (argparse exits 2 on
            a bad flag).
    """
    environ = os.environ if environ is None else environ
    check_env(environ)
    ns = build_parser(cls, prog, description).parse_args(argv)
    path = getattr(ns, "config", None) or environ.get(OPTIONS["config"].env) or None
    from_file = load_config_file(path) if path else {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        opt = OPTIONS[f.name]
        if hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
        elif opt.env in environ:
            raw = environ[opt.env]
            try:
                value = opt.kind(raw)
            except ValueError as e:
                raise ConfigError(f"{opt.env}={raw!r}: {e}") from None
            if opt.choices and value not in opt.choices:
                raise ConfigError(f"{opt.env}={raw!r}: must be one of {', '.join(opt.choices)}")
            values[f.name] = value
        elif f.name in from_file:
            values[f.name] = from_file[f.name]
        elif defaults and f.name in defaults:
            values[f.name] = defaults[f.name]
    return cls(**values)


def to_argv(cfg: Any, names: Sequence[str] | None = None) -> list[str]:
    """The command-line flags that reproduce ``cfg``'s non-default fields (for launchers)."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        if names is not None and f.name not in names:
            continue
        value = getattr(cfg, f.name)
        if value is None or f.name not in OPTIONS:
            continue
        opt = OPTIONS[f.name]
        if opt.kind is _bool:
            if value:
                out.append(opt.flag)
        else:
            out += [opt.flag, str(value)]
    return out
