"""θ from a server, checked whole before any of it is used: INIT, PULL and PUSH_PULL replies alike.

[Note: checked replies] A worker never takes a bad server reply as θ silently. Every reply
that carries θ (INIT at registration, ``PSClient.pull``, a step's PULL and PUSH_PULL) goes
through :func:`check_theta` before a single value is written anywhere, so a bad reply is a
:class:`common.errors.PSError` naming the key and the server, and leaves the parameters (or
the θ being assembled) as they were. The worker knows what to expect from its own layout
(:class:`worker.pieces.PieceMap`):

* exactly the keys it asked for (a request's ``keys``, else every key the shard owns), each
  once: whole, or (only when the request offered ``have``) as changed entries listed in
  ``sparse`` ([Note: sparse pulls] in ``common.protocol``), never both;
* no other frame: neither a key of another shard or of no one, nor a stray part;
* a whole piece of its registered dtype and its piece's shape. The server keeps θ in the
  dtypes the workers registered (``ps.registrar`` refuses a registration whose dtype differs
  from θ's, and INIT's offers must match it), so another dtype is a bad reply, not something
  to convert;
* changed entries that are a valid top-k encoding of the piece (the check a compressed push
  gets, :func:`common.compression.check`);
* θ in shared memory (a reply saying ``shm``, with no frames) only when the request asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from common.compression import TOPK, check
from common.compression.codecs import PARTS
from common.compression.framing import part_name
from common.errors import PSError
from common.wire import Message
from worker.pieces import PieceMap

__all__ = ["Theta", "asked_keys", "check_theta"]


@dataclass
class Theta:
    """θ of one reply, checked.

    Attributes:
        whole: piece key -> its θ (the reply's frame, of the piece's dtype and shape).
        changed: piece key -> (flat indices, new values) of the entries a step changed.
        shm: θ is in the shard's θ segment; the reply carries none.
    """

    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    changed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shm: bool = False


def asked_keys(pieces: PieceMap, shard: int, fields: Mapping[str, Any]) -> list[str]:
    """The keys a request with ``fields`` to shard ``shard`` gets θ of: its ``keys``, else every
    key the shard owns (the server answers with the keys the worker registered with it)."""
    keys = fields.get("keys")
    return list(keys) if keys is not None else pieces.keys_of(shard)


def check_theta(reply: Message, pieces: PieceMap, keys: Iterable[str], who: str, server: str, *,
                shm: bool = False, have: bool = False) -> Theta:
    """Check the θ that ``reply`` carries (see [Note: checked replies]) and return it.

    Args:
        reply: an INIT, PULL or PUSH_PULL reply.
        pieces: this worker's layout.
        keys: the piece keys the request asked θ of.
        who: how the error names this worker, e.g. ``worker 3``.
        server: the endpoint of the server that answered.
        shm: the request let θ come in the shard's θ segment.
        have: the request offered the version it holds: keys may come as changed entries.

    Raises:
        PSError: naming the first bad key and the server; nothing of the reply was used.
    """
    def bad(key: str, why: str) -> PSError:
        return PSError(f"{who}: the server at {server} sent bad θ of {key[:80]!r}: {why}")

    tensors = dict(reply.tensors)
    sparse = list(reply.fields.get("sparse") or ())
    wanted = dict.fromkeys(keys)
    if reply.fields.get("shm"):
        if not shm:
            first = next(iter(wanted), "")
            raise bad(first, "it says θ is in shared memory, but this worker asked for θ as frames")
        wanted = {}  # θ is in the segment: the reply carries none of it
    out = Theta(shm=bool(reply.fields.get("shm")))
    for key in sparse:
        if not have:
            raise bad(key, "it came as changed entries, but this worker asked for θ whole")
        if key in out.changed or key not in wanted or key in tensors:
            why = ("the key is listed twice" if key in out.changed else
                   "not a key of this worker" if key not in pieces.by_key else
                   "not a key this worker asked for" if key not in wanted else "the key is also sent whole")
            raise bad(key, f"its changed entries are bad: {why}")
        dtype, shape = pieces.spec(key)
        parts = {part: t for part in PARTS[TOPK] if (t := tensors.pop(part_name(key, part), None)) is not None}
        why = check(TOPK, parts, shape, dtype)  # the top-k layout, checked as a compressed push's
        if why is not None:
            raise bad(key, f"its changed entries are bad: {why}")
        out.changed[key] = (parts["indices"], parts["values"])
    for key, t in tensors.items():
        if key not in wanted:
            why = ("neither a key of this worker nor a part of a key the reply lists as changed"
                   if key not in pieces.by_key else "a key this worker did not ask this server for")
            raise bad(key, why)
        dtype, shape = pieces.spec(key)
        if t.dtype != dtype:
            raise bad(key, f"it is {t.dtype}, but the parameter is {dtype} (the server keeps θ as registered)")
        if tuple(t.shape) != shape:
            raise bad(key, f"it has the shape {list(t.shape)}, not {list(shape)}")
        out.whole[key] = t
    missing = [k for k in wanted if k not in out.whole and k not in out.changed]
    if missing:
        more = f" (and {len(missing) - 1} more key(s))" if len(missing) > 1 else ""
        raise bad(missing[0], f"the reply lacks it{more}")
    return out
