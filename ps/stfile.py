"""safetensors files written from, and read into, tensor memory with no whole-file copy.

[Note: streamed files] ``safetensors.torch.save_file`` needs each tensor whole, and its
``load`` of a file's bytes holds the file and the tensors at once; for θ kept as pieces
(``common.partition``) that costs a transient copy of θ at every final write, and twice the
checkpoint's size at every restart. The format is simple (an 8-byte little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then the bytes), so:

* :func:`write` takes each tensor as a list of *parts* along dim 0 and writes every part's
  bytes straight from its memory, in order: a tensor kept as pieces lands in the file as
  the whole tensor, and nothing is concatenated;
* :func:`read` lets ``safetensors.safe_open`` validate the file, then reads each tensor's
  byte range into a fresh tensor with ``readinto``: peak memory is the tensors themselves,
  all private memory (nothing stays mapped from a file that may later be pruned).

Files written here load with the safetensors library, and files it writes read here.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

import torch

from common.wire import tensor_buffer

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_OF = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library's own cap


def _shape_of(name: str, parts: Sequence[torch.Tensor]) -> list[int]:
    if not parts:
        raise ValueError(f"tensor {name!r} has no parts")
    first = parts[0]
    if len(parts) == 1:
        return list(first.shape)
    for p in parts:
        if p.dtype != first.dtype or p.dim() == 0 or tuple(p.shape[1:]) != tuple(first.shape[1:]):
            raise ValueError(f"tensor {name!r}: parts must share dtype and trailing shape to stack along dim 0")
    return [sum(int(p.shape[0]) for p in parts), *first.shape[1:]]


def header(tensors: Mapping[str, Sequence[torch.Tensor]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The file's first bytes (length and JSON header) for ``tensors`` written in their order.

    Each name's parts stack along dim 0 into one tensor. Raises ValueError for a dtype
    safetensors cannot name or parts that do not stack.
    """
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, parts in tensors.items():
        shape = _shape_of(name, parts)
        dtype = parts[0].dtype
        if dtype not in ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        nbytes = math.prod(shape) * parts[0].element_size()
        head[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as the library writes it
    return struct.pack("<Q", len(raw)) + raw


def write_parts(f: BinaryIO, parts: Sequence[torch.Tensor]) -> int:
    """One tensor's bytes, part after part, each from its own memory; returns the bytes written."""
    n = 0
    for p in parts:
        if p.numel():
            n += f.write(tensor_buffer(p))
    return n


def write(f: BinaryIO, tensors: Mapping[str, Sequence[torch.Tensor]],
          metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file to ``f``: each name's parts, stacked along dim 0, as one tensor.

    Returns the bytes written. Raises ValueError as :func:`header` does.
    """
    head = header(tensors, metadata)
    f.write(head)
    return len(head) + sum(write_parts(f, parts) for parts in tensors.values())


def write_file(path: str | Path, tensors: Mapping[str, Sequence[torch.Tensor]],
               metadata: Mapping[str, str] | None = None) -> int:
    """:func:`write` to a new file at ``path``."""
    with open(path, "wb") as f:
        return write(f, tensors, metadata)


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """A safetensors file's tensor entries (dtype, shape, byte range) and its ``__metadata__``,
    without reading any tensor.

    Raises ValueError (naming the file) when the header cannot be read.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    meta = header.pop("__metadata__", None)
    return header, dict(meta) if isinstance(meta, dict) else {}


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file and its ``__metadata__``.

    Raises ValueError (naming the file) when the file is not a valid safetensors file.
    """
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="pt") as sf:  # validates header, dtypes and byte ranges
            metadata = sf.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: header of {n} bytes")
        header = json.loads(f.read(n))
        start = 8 + n
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = _TORCH_OF.get(spec["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {spec['dtype']}, which zmqps does not use")
            t = torch.empty(spec["shape"], dtype=dtype)
            lo, hi = spec["data_offsets"]
            if hi - lo != t.numel() * t.element_size():
                raise ValueError(f"{path}: tensor {name!r} spans {hi - lo} bytes, its shape needs "
                                 f"{t.numel() * t.element_size()}")
            if t.numel():
                f.seek(start + lo)
                got = f.readinto(tensor_buffer(t))
                if got != hi - lo:
                    raise ValueError(f"{path}: tensor {name!r} is cut short ({got} of {hi - lo} bytes)")
            tensors[name] = t
    return tensors, dict(metadata)
