"""The closed list of tensor dtypes that may cross the wire.

Each dtype travels as its raw little-endian bytes; bfloat16 travels as its 2-byte pattern.
Names are the torch names without the ``torch.`` prefix.
"""

from __future__ import annotations

import sys

import torch

from common.errors import ErrorCode, ProtocolError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

_NAME_OF: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}

ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in WIRE_DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("zmqps puts raw little-endian tensor bytes on the wire; this host is big-endian")


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; raises :class:`ProtocolError` for one outside the list."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"dtype {dtype} cannot travel on the wire") from None


def torch_dtype(name: object) -> torch.dtype:
    """torch dtype of a wire name; raises :class:`ProtocolError` for an unknown name."""
    if not isinstance(name, str) or name not in WIRE_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"unknown dtype {name!r}; allowed: {sorted(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]
