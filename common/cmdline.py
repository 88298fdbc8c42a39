"""Reading a role's configuration: the command line, ``PS_*`` variables and ``--config`` files.

This module is the only place that reads the environment or a config file. Precedence:
command line > ``PS_*`` environment > ``--config FILE`` (TOML, the same keys as the options)
> presets (an example's) > the dataclass default. A ``PS_*`` variable or a config key that no
role knows fails at start, naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from common.errors import ConfigError
from common.options import CONFIG_ONLY_AT_PARSE, ENV_PREFIX, OPTIONS, Option, _bool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

C = TypeVar("C")


NONE_MEANS: dict[str, str] = {
    "workers": "required", "world_size": "required", "rank": "assigned by the server (data mode)",
    "model": "nn.Linear(10, 1)", "data": "1000 random samples", "momentum": "0 for sgd, 0.9 for momentum",
    "clip_grad_norm": "off", "metrics_port": "off", "metrics_log": "off", "ready_file": "none",
    "stages": "the number of --partition ranges, else the world size", "stall": "off", "fault": "off",
    "worker_id": "HOSTNAME-PID", "peer_advertise": "the host of --peer-bind", "peer_prev": "from the server",
    "peer_next": "from the server", "example": "none", "curve_secret_key": "off (no CURVE)",
    "curve_authorized_keys": "off; workers: the directory of --curve-server-key",
    "curve_server_key": "off (no CURVE)", "eval_data": "none (an example's: its held-out rows)",
    "eval_log": "off",
}
"""What an option left at None means, as ``--help`` and the README's table show its default."""

_NONE_MEANS_BY_ROLE: dict[tuple[str, str], str] = {
    ("LaunchConfig", "workers"): "2 (pipeline: stages x replicas)",
    ("LaunchConfig", "checkpoint_dir"): "runs/launch-TIME",
    ("LaunchConfig", "metrics_log"): "metrics.jsonl in the checkpoint directory",
    ("LaunchConfig", "stages"): "the number of --partition ranges, else 2",
    ("LaunchConfig", "eval_log"): "eval.jsonl in the checkpoint directory (with --eval-every)",
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
