"""Bundled example jobs for ``ps-launch --example NAME``.

Each example is a module with ``model()``, ``train_data()`` and ``test_data()`` factories,
``PRESETS`` (the option values it runs with unless the command line, environment or config
file say otherwise; ``eval_data`` is its ``test_data``, for ``--eval-every``) and
``evaluate(theta) -> dict`` (metrics of the final θ on held-out data).
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXAMPLES = {"digits": "worker.examples.digits", "charlm": "worker.examples.charlm"}


def load_example(name: str) -> ModuleType:
    """The example module for ``--example NAME``."""
    return importlib.import_module(EXAMPLES[name])
