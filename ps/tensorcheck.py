"""Whether a message's tensors are exactly the keys it must carry, each with θ's dtype and shape."""

from __future__ import annotations

from typing import AbstractSet, Iterable, Mapping

import torch

from common.dtypes import dtype_name, torch_dtype
from common.errors import ErrorCode, ProtocolError

NARROW = (torch.float16, torch.bfloat16)
"""Dtypes a floating-point gradient may travel in (``--wire-dtype``)."""


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Iterable[str], what: str,
                  specs: Mapping[str, tuple[str, tuple[int, ...]]], buffers: AbstractSet[str], of_theta: bool,
                  grads: bool = False, absent: AbstractSet[str] = frozenset()) -> None:
    """``tensors`` and ``absent`` together are exactly ``expected``, each with the dtype and shape of
    ``specs`` (θ's when ``of_theta``, else as registered); a gradient (``grads``) may travel in
    float16/bfloat16, a buffer's value may not.

    Raises:
        ProtocolError: SCHEMA_MISMATCH naming the first keys that differ.
    """
    expected = set(expected)
    if set(tensors) | absent != expected or absent & set(tensors):
        extra = sorted((set(tensors) | absent) - expected)[:5]
        missing = sorted(expected - set(tensors) - absent)[:5]
        both = sorted(absent & set(tensors))[:5]
        raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                            f"{what} must carry exactly the registered keys (or name them absent); unexpected "
                            f"{extra}, missing {missing}" + (f", both sent and absent {both}" if both else ""))
    for k, t in tensors.items():
        dtype, shape = specs[k]
        narrow = grads and k not in buffers and t.dtype in NARROW and torch_dtype(dtype).is_floating_point
        if (dtype_name(t.dtype) != dtype and not narrow) or tuple(t.shape) != tuple(shape):
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                                f"{what}: {k!r} is {dtype_name(t.dtype)}{list(t.shape)}, "
                                f"{'θ has' if of_theta else 'it was registered as'} {dtype}{list(shape)}")
