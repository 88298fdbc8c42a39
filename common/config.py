"""Configuration of every role, in one place.

Each role has one frozen dataclass (:class:`ServerConfig`, :class:`WorkerConfig`,
:class:`LaunchConfig`, :class:`PingConfig`) whose fields are options described once in
``common.options.OPTIONS`` (flag, ``PS_*`` variable, help, allowed values). ``common.cmdline``
reads them: command line > ``PS_*`` environment > ``--config FILE`` > the dataclass default;
it is the only module that reads the environment or a config file.

The choices of ``--optimizer``, ``--sync``, ``--schedule`` and ``--loss`` and their help come
from :mod:`common.names`. :class:`LaunchConfig` is composed, not copied: the job's fields, the
launcher's own, and every server option (:func:`launch_config`), so a new server option is one
:data:`OPTIONS` entry and one :class:`ServerConfig` field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from common import compression
from common.checks import check_fault, check_metrics, nonneg, parse_stall, positive
from common.errors import ConfigError
from common.names import Loss, Optimizer, PipelineSchedule, SyncModel
# the options and their reading live in their own modules; importers of common.config get them here too
from common.cmdline import (ESSENTIALS, NONE_MEANS, START_HERE, build_parser, check_env, default_text,  # noqa: F401
                            load_config_file, parse_config, to_argv)
from common.options import CONFIG_ONLY_AT_PARSE, ENV_PREFIX, KNOWN_ENV, OPTIONS, Option  # noqa: F401


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
    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_delay: int = 0
    checkpoint_dir: str = "checkpoints"
    resume: str = "auto"
    checkpoint_every: int = 0
    ready_file: str | None = None
    max_message_mb: int = 4096
    max_frame_mb: int = 64
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
        positive("io_threads", self.io_threads)
        check_metrics(self.metrics_port, self.status_every)
        positive("lease", self.lease)
        positive("rejoin_deadline", self.rejoin_deadline)
        check_fault(self.fault)
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ConfigError("CURVE needs both --curve-secret-key and --curve-authorized-keys")
        if self.workers is None:
            raise ConfigError("--workers is required (or PS_WORKERS)")
        positive("workers", self.workers)
        nonneg("lr", self.lr)
        nonneg("weight_decay", self.weight_decay)
        nonneg("staleness", self.staleness)
        positive("inner_steps", self.inner_steps)
        positive("outer_lr", self.outer_lr)
        nonneg("outer_momentum", self.outer_momentum)
        if self.outer_delay not in (0, 1):
            raise ConfigError(f"--outer-delay is 0 or 1 (rounds the outer step reaches the workers late), "
                              f"got {self.outer_delay}")
        if self.outer_delay and self.sync != SyncModel.DILOCO:
            raise ConfigError(f"--outer-delay 1 overlaps the rounds of --sync diloco, not of {self.sync}")
        nonneg("checkpoint_every", self.checkpoint_every)
        positive("max_message_mb", self.max_message_mb)
        positive("max_frame_mb", self.max_frame_mb)
        if self.momentum is not None:
            nonneg("momentum", self.momentum)
        if self.clip_grad_norm is not None:
            positive("clip_grad_norm", self.clip_grad_norm)
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
    compress: str = "none"
    eval_every: int = 0
    eval_data: str | None = None
    eval_rows: int = 4096
    eval_log: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        try:
            spec = compression.parse(self.compress)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if spec.enabled and self.mode == "pipeline":
            raise ConfigError("--compress is not supported in pipeline mode (use --compress none)")
        if spec.enabled and self.wire_dtype != "auto":
            raise ConfigError("--compress sends values in the gradient's dtype: use it without --wire-dtype")
        if self.stall is not None:
            parse_stall(self.stall)
        _check_eval(self)
        positive("io_threads", self.io_threads)
        nonneg("chunk_mb", self.chunk_mb)
        nonneg("bucket_mb", self.bucket_mb)
        positive("epochs", self.epochs)
        positive("microbatches", self.microbatches)
        if self.stages is not None:
            positive("stages", self.stages)
        ranges = _partition_ranges(self.partition)
        if ranges and self.stages is not None and self.stages != len(ranges):
            raise ConfigError(f"--stages {self.stages} but --partition gives {len(ranges)} ranges")
        positive("batch_size", self.batch_size)
        positive("timeout", self.timeout)
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
    state_dir: str | None = None
    curve_server_key: str | None = None
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None
    fault: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eval_data(self)
        nonneg("heartbeat", self.heartbeat)
        check_fault(self.fault)
        if (self.curve_server_key is None) != (self.curve_secret_key is None):
            raise ConfigError("CURVE needs both --curve-server-key and --curve-secret-key")
        if self.curve_authorized_keys is not None and self.curve_server_key is None:
            raise ConfigError("--curve-authorized-keys on a worker needs CURVE on (--curve-server-key)")
        if self.world_size is None:
            raise ConfigError("--world-size is required (or PS_WORLD_SIZE)")
        positive("world_size", self.world_size)
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
    "max_frame_mb": "a launched server hears only the launcher's own workers; ps-server's default serves them",
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
        positive("replicas", self.replicas)
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
        positive("workers", self.workers)
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
        positive("timeout", self.timeout)
        if (self.curve_server_key is None) != (self.curve_secret_key is None):
            raise ConfigError("CURVE needs both --curve-server-key and --curve-secret-key")


def _check_eval(cfg: JobFields) -> None:
    nonneg("eval_every", cfg.eval_every)
    nonneg("eval_rows", cfg.eval_rows)
    if cfg.eval_every and cfg.mode == "pipeline":
        raise ConfigError("--eval-every is for data mode; a pipeline stage holds only its own layers")


def check_eval_data(cfg: JobFields) -> None:
    """``--eval-every`` needs ``--eval-data``.

    Checked by :class:`WorkerConfig` and, once an example's presets are in, by ``ps-launch``
    (its first reading, which only learns ``--example``, has not seen the example's data yet).

    Raises:
        ConfigError: ``--eval-every`` is on and there is no held-out data set.
    """
    if cfg.eval_every and cfg.eval_data is None:
        raise ConfigError(f"--eval-every {cfg.eval_every} needs --eval-data MODULE:FACTORY (the held-out data set)")
