"""Checks of one option's value, shared by the roles' configurations (``common.config``).

Each function raises :class:`common.errors.ConfigError` naming the option's flag and the value
it got, the way every configuration error reads; none looks at another option.
"""

from __future__ import annotations

from common.errors import ConfigError
from common.faults import parse_fault


def positive(name: str, value: float) -> None:
    """``--NAME`` (the field ``name``) must be above 0.

    Raises:
        ConfigError: ``value`` is 0 or less.
    """
    if value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def nonneg(name: str, value: float) -> None:
    """``--NAME`` (the field ``name``) must be 0 or more.

    Raises:
        ConfigError: ``value`` is negative.
    """
    if value < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {value}")


def check_fault(spec: str | None) -> None:
    """``--fault``, if given, names a known fault (``common.faults``).

    Raises:
        ConfigError: it does not.
    """
    if spec is not None:
        parse_fault(spec)


def check_metrics(port: int | None, status_every: float) -> None:
    """``--metrics-port`` is a port (0: the OS picks one) and ``--status-every`` is positive.

    Raises:
        ConfigError: either is out of range.
    """
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be in [0, 65535], got {port}")
    positive("status_every", status_every)


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
