"""Configuration of every role, in one place.

Each role has one frozen dataclass (:class:`ServerConfig`, :class:`WorkerConfig`,
:class:`LaunchConfig`). Every field is an option described once in :data:`OPTIONS`: its
command-line flag, its ``PS_*`` environment variable, its help text and allowed values.
Precedence: command line > environment > the dataclass default. This module is the only
place that reads the environment; a ``PS_*`` variable that no role knows fails at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

from common.errors import ConfigError

ENV_PREFIX = "PS_"


@dataclass(frozen=True)
class Option:
    """One user-facing option: flag, value type, help, allowed values and help group."""

    flag: str
    kind: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    group: str = "general"

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
    "optimizer": Option("--optimizer", str, "torch.optim optimizer the server applies",
                        ("sgd", "momentum", "adam"), group="optimizer"),
    "lr": Option("--lr", float, "learning rate", group="optimizer"),
    "momentum": Option("--momentum", float, "momentum (default 0 for sgd, 0.9 for momentum)", group="optimizer"),
    "weight_decay": Option("--weight-decay", float, "weight decay", group="optimizer"),
    "sync": Option("--sync", str, "consistency model", ("bsp", "async", "ssp"), group="consistency"),
    "staleness": Option("--staleness", int, "SSP staleness bound S", group="consistency"),
    "checkpoint_dir": Option("--checkpoint-dir", str, "directory for checkpoints and final.safetensors",
                             group="checkpoints"),
    "checkpoint_every": Option("--checkpoint-every", int, "checkpoint every N steps (0: only at the end)",
                               group="checkpoints"),
    "ready_file": Option("--ready-file", str, "write the bound endpoint to this file once listening",
                         group="server"),
    "max_message_mb": Option("--max-message-mb", int, "largest frame accepted, in MiB (ZMQ_MAXMSGSIZE)",
                             group="server"),
    # worker
    "server": Option("--server", str, "server endpoint, e.g. tcp://HOST:5555", group="worker"),
    "rank": Option("--rank", int, "this worker's rank k", group="worker"),
    "world_size": Option("--world-size", int, "number of workers K", group="worker"),
    "mode": Option("--mode", str, "data parallel or pipeline stages", ("data", "pipeline"), group="worker"),
    "model": Option("--model", str, "MODULE:FACTORY returning an nn.Module (default: nn.Linear(10, 1))",
                    group="job"),
    "data": Option("--data", str, "MODULE:FACTORY returning a map-style dataset of (x, y) "
                   "(default: 1000 random samples)", group="job"),
    "loss": Option("--loss", str, "loss function", ("mse", "cross_entropy"), group="job"),
    "epochs": Option("--epochs", int, "epochs", group="job"),
    "batch_size": Option("--batch-size", int, "global batch size B (each worker uses B/K rows)", group="job"),
    "no_shuffle": Option("--no-shuffle", _bool, "keep each shard in order", group="job"),
    "seed": Option("--seed", int, "seed for the model and the data set", group="job"),
    "device": Option("--device", str, "auto, cpu, cuda or cuda:N", group="job"),
    "timeout": Option("--timeout", float, "seconds any one call may block before it fails", group="worker"),
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
    # common
    "log_level": Option("--log-level", str, "logging level",
                        ("debug", "info", "warning", "error"), group="general"),
}


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of ``ps-server``."""

    bind: str = "tcp://0.0.0.0:5555"
    workers: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float | None = None
    weight_decay: float = 0.0
    sync: str = "bsp"
    staleness: int = 0
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 0
    ready_file: str | None = None
    max_message_mb: int = 4096
    shm: str = "auto"
    io_threads: int = 1
    log_level: str = "info"

    def __post_init__(self) -> None:
        _positive("io_threads", self.io_threads)
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


@dataclass(frozen=True)
class JobFields:
    """Options that describe the training job (shared by workers and the launcher)."""

    mode: str = "data"
    model: str | None = None
    data: str | None = None
    loss: str = "mse"
    epochs: int = 10
    batch_size: int = 100
    no_shuffle: bool = False
    seed: int = 0
    device: str = "auto"
    timeout: float = 60.0
    progress: str = "auto"
    shm: str = "auto"
    io_threads: int = 1
    chunk_mb: float = 1.0
    bucket_mb: float = 16.0
    wire_dtype: str = "auto"
    log_level: str = "info"

    def __post_init__(self) -> None:
        _positive("io_threads", self.io_threads)
        _nonneg("chunk_mb", self.chunk_mb)
        _nonneg("bucket_mb", self.bucket_mb)
        _positive("epochs", self.epochs)
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.world_size is None:
            raise ConfigError("--world-size is required (or PS_WORLD_SIZE)")
        _positive("world_size", self.world_size)
        if self.rank is None:
            raise ConfigError("--rank is required (or PS_RANK)")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"--rank must be in [0, {self.world_size}), got {self.rank}")
        if self.batch_size < self.world_size:
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than the {self.world_size} workers")


@dataclass(frozen=True)
class LaunchConfig(JobFields):
    """Configuration of ``ps-launch``: the job plus the server's optimizer and checkpoints."""

    workers: int = 2
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float | None = None
    weight_decay: float = 0.0
    sync: str = "bsp"
    staleness: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("workers", self.workers)
        if self.batch_size < self.workers:
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than the {self.workers} workers")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _nonneg(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {value}")


C = TypeVar("C")

KNOWN_ENV: frozenset[str] = frozenset(opt.env for opt in OPTIONS.values())


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for ``cls``: one flag per field, grouped, with env names in help."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS,
                                     epilog="Every option can also be set by the PS_* variable shown; "
                                            "the command line wins over the environment.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        opt = OPTIONS[f.name]
        group = groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{opt.help} [{opt.env}; default: {default}]"
        if opt.kind is _bool:
            group.add_argument(opt.flag, dest=f.name, action="store_const", const=True, help=text)
        else:
            group.add_argument(opt.flag, dest=f.name, type=opt.kind, choices=opt.choices, help=text,
                               metavar=None if opt.choices else f.name.upper())
    return parser


def check_env(environ: Mapping[str, str]) -> None:
    """Fail on a ``PS_*`` variable that no role knows (a typo would otherwise be ignored)."""
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in KNOWN_ENV)
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(KNOWN_ENV))}")


def parse_config(cls: type[C], argv: Sequence[str] | None, prog: str, description: str = "",
                 environ: Mapping[str, str] | None = None) -> C:
    """Parse ``argv`` and ``environ`` into ``cls`` (command line > environment > default).

    Raises:
        ConfigError: a bad value or unknown ``PS_*`` variable (argparse exits 2 on a bad flag).
    """
    environ = os.environ if environ is None else environ
    check_env(environ)
    ns = build_parser(cls, prog, description).parse_args(argv)
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
