"""What crosses a stage boundary: a tensor, or a tuple/list/dict of tensors, as named tensors.

``nn.Sequential`` hands each layer's output to the next layer as one value, so a boundary
carries whatever the last layer of a stage returns. On the wire that value becomes named
tensors plus a ``pack`` tag that says how to rebuild it:

* ``tensor``: one tensor, named ``0``;
* ``tuple`` / ``list``: tensors named ``0``, ``1``, ... in order;
* ``dict``: tensors named by the dict's (string) keys.

Every tensor keeps its own dtype and shape (the wire header lists both), so shapes may change
from batch to batch. δ messages use the same names, for the floating-point tensors only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

PACKS = ("tensor", "tuple", "list", "dict")


class PackError(TypeError):
    """A stage boundary value is not a tensor or a flat tuple/list/dict of tensors."""


def flatten(value: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``(pack, named tensors)`` for a boundary value."""
    if isinstance(value, torch.Tensor):
        return "tensor", {"0": value}
    if isinstance(value, (tuple, list)):
        out = {}
        for i, v in enumerate(value):
            if not isinstance(v, torch.Tensor):
                raise PackError(f"element {i} of the {type(value).__name__} is a {type(v).__name__}, not a tensor")
            out[str(i)] = v
        if not out:
            raise PackError(f"an empty {type(value).__name__} cannot cross a stage boundary")
        return ("tuple" if isinstance(value, tuple) else "list"), out
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise PackError(f"dict key {k!r} is not a non-empty string")
            if not isinstance(v, torch.Tensor):
                raise PackError(f"dict entry {k!r} is a {type(v).__name__}, not a tensor")
            out[k] = v
        if not out:
            raise PackError("an empty dict cannot cross a stage boundary")
        return "dict", out
    raise PackError(f"a stage must output a tensor or a tuple/list/dict of tensors, not {type(value).__name__}")


def unflatten(pack: str, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the value :func:`flatten` took apart."""
    if pack == "tensor":
        if list(tensors) != ["0"]:
            raise PackError(f"pack 'tensor' needs exactly one tensor named '0', got {list(tensors)[:5]}")
        return tensors["0"]
    if pack in ("tuple", "list"):
        names = [str(i) for i in range(len(tensors))]
        if list(tensors) != names:
            raise PackError(f"pack {pack!r} needs tensors named 0..{len(tensors) - 1} in order, "
                            f"got {list(tensors)[:5]}")
        items = [tensors[n] for n in names]
        return tuple(items) if pack == "tuple" else items
    if pack == "dict":
        return dict(tensors)
    raise PackError(f"unknown pack {pack!r}; known: {', '.join(PACKS)}")


def differentiable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors among ``tensors``: the ones a δ message carries."""
    return {k: t for k, t in tensors.items() if t.is_floating_point()}


def describe(tensors: Mapping[str, torch.Tensor]) -> str:
    """``'0': float64[25, 5], '1': int64[25]`` - for error messages."""
    return ", ".join(f"{k!r}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for k, t in tensors.items())
