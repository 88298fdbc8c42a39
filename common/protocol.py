"""Operations of the zmqps protocol and the header fields each one carries.

Every message is one ZeroMQ multipart message: frame 0 is a msgpack map (the header), then
one raw frame per tensor listed in the header's ``tensors`` entry. The header always has
``v`` (protocol version), ``op`` and ``id`` (the request id, echoed by the reply).

The schema below is the single description of every header; :mod:`common.wire` enforces it
on every decode, and it is checked once at import (:func:`_check_registry`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Op(str, Enum):
    """Message kinds. Requests go worker → server (or stage → stage); replies come back."""

    REGISTER = "register"  # a worker announces rank (or worker_id: the server assigns one), world size, params
    INIT = "init"  # a worker offers initial θ; rank 0's values win, everyone gets θ back
    PULL = "pull"  # fetch θ (optionally only some keys) ready for computing ``step``
    PUSH = "push"  # send the gradients of one step; acknowledged on arrival
    PUSH_PULL = "push_pull"  # push, then reply with θ once that step is applied (one round trip)
    DONE = "done"  # the worker finished training; the server exits when every worker has
    PING = "ping"  # liveness and status probe; never changes state
    ACTIVATION = "activation"  # pipeline: stage s sends activations of a microbatch to stage s+1
    GRADIENT = "gradient"  # pipeline: stage s+1 sends δ of a microbatch back to stage s
    ABORT = "abort"  # pipeline: a stage failed; its neighbours stop now instead of at their timeout
    REWIND = "rewind"  # a server shard goes back to a checkpointed step another shard restarted from
    REPLY = "reply"  # success answer to a request; fields depend on the request
    ERROR = "error"  # failure answer: ``code`` (an ErrorCode) and ``message``; nothing changed


# Field kinds understood by the validator ("num?": a number or nil).
INT, NUM, STR, BOOL, STRLIST, SPECS, ANY = "int", "num", "str", "bool", "strlist", "specs", "any"
NUM_OR_NIL = "num?"

# op -> (required fields, optional fields); each maps field name -> kind.
SCHEMA: dict[Op, tuple[dict[str, str], dict[str, str]]] = {
    Op.REGISTER: (
        {"world_size": INT, "params": SPECS},
        {"rank": INT, "role": STR, "stage": INT, "endpoint": STR, "worker_id": STR, "plan": STR, "shm": BOOL,
         "buckets": ANY, "buffers": STRLIST, "aliases": ANY, "shards": INT, "steps": INT},
    ),
    Op.INIT: ({"rank": INT}, {"shm": BOOL}),
    Op.PULL: ({"rank": INT}, {"keys": STRLIST, "step": INT, "shm": BOOL, "have": INT}),
    Op.PUSH: ({"rank": INT, "step": INT},
              {"samples": NUM, "loss": NUM, "grads": STRLIST, "total": NUM, "absent": STRLIST, "segment": STR,
               "compressed": ANY}),
    Op.PUSH_PULL: ({"rank": INT, "step": INT},
                   {"samples": NUM, "loss": NUM, "keys": STRLIST, "grads": STRLIST, "shm": BOOL, "total": NUM,
                    "absent": STRLIST, "segment": STR, "compressed": ANY, "have": INT}),
    Op.DONE: ({"rank": INT}, {"step": INT}),
    Op.PING: ({}, {"rank": INT}),
    Op.ACTIVATION: ({"stage": INT, "step": INT, "micro": INT}, {"rank": INT, "pack": STR}),
    Op.GRADIENT: ({"stage": INT, "step": INT, "micro": INT}, {"rank": INT, "pack": STR}),
    Op.ABORT: ({"stage": INT, "message": STR}, {"rank": INT, "step": INT, "micro": INT, "action": STR}),
    Op.REWIND: ({"rank": INT, "step": INT}, {}),
    Op.REPLY: ({}, {"*": ANY}),
    Op.ERROR: ({"code": INT, "message": STR}, {}),
}

# [Note: fast-path fields] REGISTER ``shm``: the worker asks for shared-memory segments (the
# reply names them; see common/shm.py). REGISTER ``buckets``: lists of the worker's keys it
# will push together (each becomes a server key group). PUSH ``grads``: the keys whose
# gradients are in the worker's segment (then no frames follow). PUSH ``total``: with
# ``grads`` only, the worker scaled them by samples / total already (total: the step's samples
# over every worker, as the worker's data plan says), so the server's reduction is a plain sum
# (ps/aggregate.py, [Note: pre-scaled]). PULL/PUSH_PULL ``shm``: reply with θ in the server's θ
# segment instead of frames.
#
# [Note: model fields] REGISTER ``buffers``: the registered keys that are buffers (BatchNorm's
# running statistics...), not parameters: the server keeps them in θ but outside its optimizer,
# and a push carries their *values*, not gradients (rank order decides: the lowest rank's, as
# DDP broadcasts rank 0's). REGISTER ``aliases``: ``[[alias, key], ...]``, other state_dict names
# of a registered tensor (tied weights), written beside it in ``final.safetensors``. REGISTER
# ``shards``: how many server shards the worker splits θ over. REGISTER ``steps``: how many
# steps the worker's plan runs in all (epochs x steps per epoch); the workers of a job must
# agree, or the ones that finish first would wait for the others' extra steps. PUSH ``absent``: keys of the
# pushed buckets this worker has nothing for - a parameter without a gradient (frozen, or not
# reached by the loss), a buffer its step did not change; a key absent on every worker is left
# alone by the optimizer, as torch.optim leaves a parameter whose ``grad`` is None. PUSH
# ``segment``: the token of the gradient segment the ``grads`` were written to; the server
# refuses a push naming any other segment than the one it gave this rank. PUSH ``compressed``:
# ``[[key, codec], ...]``, keys whose frames are a codec's parts named ``key::part``
# ([Note: compressed pushes] in common/compression/framing.py); frames only, never with ``grads``.

# [Note: local steps] REGISTER reply ``inner`` (``--sync diloco``/``diloco-async`` only): what the
# worker runs between two exchanges, ``{"steps": H, "optimizer", "lr", "momentum", "weight_decay",
# "checkpoint_every", "job"}`` (``job``: the job's id, kept in the server's checkpoints).
# A step (PUSH, PUSH_PULL, the version) is then one round of H local steps, and a push carries the
# worker's change θ_global − θ_local where other rules carry a gradient (worker/diloco.py).

# [Note: sparse pulls] PULL/PUSH_PULL ``have``: the version of θ the worker holds, unchanged, in
# the tensors the reply goes into. Where the server knows exactly which entries of a key the
# step from ``have`` to the reply's version changed (plain SGD changes only the entries of a
# nonzero averaged gradient, e.g. under --compress topk), and they are few, the reply lists the
# key in ``sparse`` and carries ``KEY::indices`` (int32/int64, increasing) and ``KEY::values``
# (the new values, exact) instead of the whole tensor (ps/store.py, worker/stepio.py).

_THETA = {"version": INT, "loss": NUM_OR_NIL}
_THETA_SHM = {"shm": BOOL, "sparse": STRLIST}
REPLIES: dict[Op, tuple[dict[str, str], dict[str, str]]] = {
    Op.REGISTER: ({"world_size": INT, "sync": STR, "initialized": BOOL, "rank": INT, "optimizer": STR, "lr": NUM,
                   "incarnation": STR, "lease_s": NUM, "hold_s": NUM, "buckets": BOOL},
                  {"clip_grad_norm": NUM_OR_NIL, "shm_grad": STR, "shm_grad_token": STR, "inner": ANY}),
    Op.INIT: ({**_THETA, "peers": ANY, "restorable": ANY, "formation": INT},
              {**_THETA_SHM, "shm_theta": STR, "shm_theta_token": STR, "shm_theta_size": INT, "shm_offsets": ANY}),
    Op.PULL: (_THETA, _THETA_SHM),
    Op.PUSH: ({"applied": BOOL, "version": INT}, {}),
    Op.PUSH_PULL: (_THETA, _THETA_SHM),
    Op.DONE: ({"version": INT}, {}),
    Op.PING: ({"version": INT, "registered": INT, "workers": INT, "loss": NUM_OR_NIL, "done": INT,
               "incarnation": STR, "formation": INT},
              {"sync": STR, "staleness": ANY, "max_lead": INT, "pushes": INT, "updates": INT, "metrics_url": ANY}),
    Op.REWIND: ({"version": INT}, {}),
}
"""The fields of the server's REPLY to each request: (required, optional), by the request's op.
The server checks its replies against this before they leave; a client checks a reply to its
call against it, so a renamed field is an error at once, not a silent default."""

RESERVED = frozenset({"v", "op", "id", "tensors"})
"""Header keys every message may carry besides its op's fields."""

OPS_BY_VALUE: dict[str, Op] = {op.value: op for op in Op}


def _check_registry() -> None:
    """Every op has a schema and no schema uses a reserved key or an unknown kind."""
    kinds = {INT, NUM, STR, BOOL, STRLIST, SPECS, ANY, NUM_OR_NIL}
    missing = set(Op) - set(SCHEMA)
    if missing:
        raise ImportError(f"protocol ops without a schema: {sorted(m.value for m in missing)}")
    for table in (SCHEMA, REPLIES):
        for op, (req, opt) in table.items():
            for name, kind in {**req, **opt}.items():
                if name in RESERVED or kind not in kinds:
                    raise ImportError(f"bad schema entry {op.value}.{name}: {kind}")


_check_registry()


def spec_list(specs: dict[str, tuple[str, tuple[int, ...]]]) -> list[list[Any]]:
    """Encode ``{name: (dtype, shape)}`` as the wire's SPECS field."""
    return [[name, dtype, list(shape)] for name, (dtype, shape) in specs.items()]
