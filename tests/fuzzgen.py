"""Garbage for the fuzz tests: hostile multipart messages, generated from a seed.

Hypothesis picks the seeds; each seed yields a batch of messages, so several thousand cases cost
a few hundred Hypothesis examples. The messages mix raw bytes, headers built from a small
grammar of the protocol's own field names and hostile values, and mutations of valid messages
(bit flips, truncation, wrong frame counts and sizes, lying tensor specs, extension types,
bytes, huge or negative numbers, deep nesting).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import msgpack
import torch

from common.compression import Encoded, pack
from common.protocol import Op
from common.wire import encode

FIELDS = ("rank", "step", "world_size", "params", "keys", "samples", "loss", "min_version", "role", "stage",
          "micro", "code", "message", "endpoint", "worker_id", "tensors", "plan", "total", "absent", "segment",
          "buffers", "aliases", "shards", "steps", "grads", "shm", "compressed")
DTYPES = ("float64", "float32", "bfloat16", "int8", "bool", "uint8", "complex64", "", 7)


def _value(rng: random.Random, depth: int = 0) -> Any:
    """One hostile header value (plain, huge, non-finite, nested, lying specs...)."""
    kind = rng.randrange(12 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-3, 3)
    if kind == 3:
        return rng.choice([2**63, -(2**63), 2**64 - 1, 10**12])
    if kind == 4:
        return rng.choice([0.5, float("nan"), float("inf"), -1e308, 1e308, 2.0**31 + 1])
    if kind == 5:
        return "x" * rng.randrange(0, 40)
    if kind == 6:
        return rng.choice(["weight", "bias", "register", "../../etc", "\u0000", "ψ" * 5])
    if kind == 7:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return {str(rng.randrange(5)): _value(rng, depth + 1) for _ in range(rng.randrange(3))}
    if kind == 9:
        return _specs(rng)
    if kind == 10:
        return [[_value(rng, depth + 1)] * rng.randrange(3)] * rng.randrange(3)
    return _nested(rng.randrange(20))


def _nested(depth: int) -> Any:
    x: Any = 1
    for _ in range(depth):
        x = [x]
    return x


def _specs(rng: random.Random) -> list[list[Any]]:
    return [[rng.choice(["weight", "bias", "w", "", "x" * 2000]), rng.choice(DTYPES),
             [rng.choice([0, 1, 10, -1, 2**40, 2**63 - 1, 2**62]) for _ in range(rng.randrange(4))]]
            for _ in range(rng.randrange(4))]


def _header(rng: random.Random) -> dict[str, Any]:
    h: dict[str, Any] = {"v": rng.choice([1, 1, 1, 0, 2, "1", None]),
                         "op": rng.choice([op.value for op in Op] + ["nope", 3, ""]),
                         "id": rng.choice([0, 1, rng.randrange(2**63), -1, 2**63, "7"])}
    for name in rng.sample(FIELDS, rng.randrange(len(FIELDS))):
        h[name] = _value(rng)
    if rng.random() < 0.3:
        h.pop(rng.choice(list(h)))
    return h


def _pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"  # never a valid msgpack byte


def valid_messages(theta: dict[str, torch.Tensor], ranks: Sequence[int]) -> list[list[bytes]]:
    """Well-formed messages of every kind about ``theta`` (the seeds of the mutations)."""
    specs = [[k, "float64", list(v.shape)] for k, v in theta.items()]
    first, *rest = theta  # a compressed push: the first tensor as top-2 values + int32 indices
    flat = theta[first].reshape(-1)
    top = Encoded("topk", {"values": flat[:2].clone(), "indices": torch.arange(min(2, flat.numel()), dtype=torch.int32)})
    compressed, ctensors = pack({k: theta[k] for k in rest}, {first: top})
    out = []
    for r in ranks:
        out += [encode(Op.REGISTER, {"rank": r, "world_size": len(ranks), "params": specs}),
                encode(Op.INIT, {"rank": r}, theta),
                encode(Op.PULL, {"rank": r, "step": 0}),
                encode(Op.PUSH, {"rank": r, "step": 0, "samples": 1.0}, theta),
                encode(Op.PUSH_PULL, {"rank": r, "step": 0, "keys": list(theta)}, theta),
                encode(Op.PUSH, {"rank": r, "step": 0, "compressed": compressed}, ctensors),
                encode(Op.DONE, {"rank": r}),
                encode(Op.PING, {"rank": r}),
                encode(Op.ACTIVATION, {"stage": 0, "step": 0, "micro": 0}, theta)]
    return [[bytes(memoryview(f)) for f in m] for m in out]


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    how = rng.randrange(9)
    i = rng.randrange(len(frames))
    if how == 0 and frames[i]:  # flip bits
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(b)
    elif how == 1:  # truncate a frame
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    elif how == 2:  # drop or add frames
        if rng.random() < 0.5 and len(frames) > 1:
            frames.pop(rng.randrange(1, len(frames)))
        else:
            frames.append(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
    elif how in (3, 4, 5):  # rewrite a header field
        try:
            h = msgpack.unpackb(frames[0], raw=False)
        except Exception:
            return frames
        if not isinstance(h, dict):  # an earlier mutation left a header that is no map
            return frames
        key = rng.choice([*FIELDS, "v", "op", "id", "extra"])
        h[key] = _value(rng)
        frames[0] = _pack(h)
    elif how == 6:  # an extension type, or raw bytes, inside the header
        try:
            h = msgpack.unpackb(frames[0], raw=False)
        except Exception:
            return frames
        if not isinstance(h, dict):
            return frames
        h[rng.choice(FIELDS)] = msgpack.ExtType(rng.randrange(128), b"\x00" * rng.randrange(9)) \
            if rng.random() < 0.5 else b"\x80\x04pickle"
        frames[0] = _pack(h)
    elif how == 7:  # a tensor frame of the wrong size
        if len(frames) > 1:
            j = rng.randrange(1, len(frames))
            frames[j] = frames[j] + b"\x00" * rng.choice([1, 7, 8]) if rng.random() < 0.5 else frames[j][:-1]
    else:  # NaN and infinity in the gradients: well-formed bytes, but not finite numbers
        if len(frames) > 1:
            j = rng.randrange(1, len(frames))
            frames[j] = torch.full((len(frames[j]) // 8,), float("nan"), dtype=torch.float64).numpy().tobytes()
    return frames


def messages(rng: random.Random, n: int, seeds: Sequence[list[bytes]]) -> Iterator[list[bytes]]:
    """``n`` hostile messages (each a non-empty list of frames)."""
    for _ in range(n):
        kind = rng.randrange(10)
        if kind == 0:
            yield [bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
                   for _ in range(rng.randint(1, 3))]
        elif kind < 4:
            body = [_pack(_header(rng))]
            yield body + [bytes(rng.randrange(256) for _ in range(rng.choice([0, 8, 88, 3])))
                          for _ in range(rng.randrange(3))]
        else:
            frames = rng.choice(seeds)
            for _ in range(rng.randint(1, 3)):
                frames = _mutate(rng, frames)
            yield frames
