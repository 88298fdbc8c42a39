"""Training rules: how a push is accepted, reduced and applied, and when a parked request is answered.

Each rule (``--sync``) is one :class:`ps.engine.base.StepEngine` subclass in a module of its own,
registered by name with :func:`register`: ``bsp`` (``ps.engine.bsp``), ``async`` and ``ssp``
(``ps.engine.onarrival``). Adding a rule is one new module and one ``@register``; the server,
the membership and the checkpoints do not change.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ps.engine.base import Services, StepEngine

E = TypeVar("E", bound=type[StepEngine])

RULES: dict[str, type[StepEngine]] = {}
"""Every training rule by its ``--sync`` name."""


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make a :class:`StepEngine` subclass the rule ``name``."""
    def add(cls: E) -> E:
        if name in RULES and RULES[name] is not cls:
            raise ValueError(f"training rule {name!r} is registered twice")
        cls.name = name
        RULES[name] = cls
        return cls
    return add


def make_engine(services: Services) -> StepEngine:
    """The engine of ``--sync`` (``services.cfg.sync``)."""
    from ps.engine import bsp, onarrival  # noqa: F401 - the built-in rules register themselves

    rule = RULES.get(services.cfg.sync)
    if rule is None:
        raise ValueError(f"no training rule {services.cfg.sync!r}; known: {', '.join(sorted(RULES))}")
    return rule(services)


__all__ = ["RULES", "Services", "StepEngine", "make_engine", "register"]
