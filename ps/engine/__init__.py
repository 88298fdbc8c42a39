"""Training rules: how a push is accepted, reduced and applied, and when a parked request is answered.

Each rule (``--sync``) is one :class:`ps.engine.base.StepEngine` subclass in a module of its own,
registered by name with :func:`register`: ``bsp`` (``ps.engine.bsp``), ``async`` and ``ssp``
(``ps.engine.onarrival``), ``diloco`` and ``diloco-async`` (``ps.engine.diloco``). Adding a rule
is one new module with its ``@register``, and its name in ``common.names.SyncModel`` to offer it
as ``--sync`` (checked against each other at import); the server, the membership, the store and
the checkpoints do not change (a rule with its own optimizer overrides ``build_optimizer``).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from common.names import SyncModel, implementations
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


def rule_of(name: str) -> type[StepEngine]:
    """The rule registered as ``name`` (``--sync``)."""
    rule = RULES.get(name)
    if rule is None:
        raise ValueError(f"no training rule {name!r}; known: {', '.join(sorted(RULES))}")
    return rule


def make_engine(services: Services) -> StepEngine:
    """The engine of ``--sync`` (``services.cfg.sync``)."""
    return rule_of(services.cfg.sync)(services)


from ps.engine import bsp, diloco, onarrival  # noqa: E402,F401 - the built-in rules register themselves

BUILTIN_RULES = implementations(SyncModel, dict(RULES), __name__)
"""The rules ``--sync`` offers: exactly the names ``common.names.SyncModel`` declares (checked
here, at import). A rule registered later (a test's) is used by its name in code."""

__all__ = ["BUILTIN_RULES", "RULES", "Services", "StepEngine", "make_engine", "register", "rule_of"]
