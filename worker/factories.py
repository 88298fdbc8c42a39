"""Loading ``MODULE:FACTORY`` callables, and the seed's default model and data set."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from common.errors import ConfigError


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``MODULE:FACTORY`` and return the zero-argument callable it names.

    ``MODULE`` is looked up in the current directory first, as ``python -m`` would, so a user's
    own ``mymodel.py`` works the same under ``ps-worker``, ``ps-launch`` (both modes, whose
    children run as ``python -m worker``) and ``python -m worker``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:FACTORY, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{module_name!r} has no {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec!r} is not callable")
    return obj


def default_model() -> nn.Module:
    """The seed's model: ``nn.Linear(10, 1)``."""
    return nn.Linear(10, 1)


def default_pipeline_model() -> nn.Sequential:
    """The seed's model-parallel example: ``nn.Linear(10, 5)`` then ``nn.Linear(5, 1)``."""
    return nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 1))


def default_data() -> Dataset:
    """The seed's data: 1000 random samples, x ~ N(0, 1)^10, y ~ N(0, 1)."""
    return TensorDataset(torch.randn(1000, 10), torch.randn(1000, 1))


def build_model(spec: str | None, seed: int, default: Callable[[], nn.Module] = default_model) -> nn.Module:
    """``torch.manual_seed(seed)`` then the model factory (so every worker starts from the same θ)."""
    factory = load_factory(spec) if spec else default
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_data(spec: str | None, seed: int) -> Dataset:
    """``torch.manual_seed(seed)`` then the data factory (so every worker sees the same data)."""
    factory = load_factory(spec) if spec else default_data
    torch.manual_seed(seed)
    data = factory()
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ConfigError(f"data factory {spec!r} returned {type(data).__name__}, not a map-style dataset")
    return data
