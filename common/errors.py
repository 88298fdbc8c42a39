"""Typed errors shared by the server and the workers.

One root (:class:`PSError`); subclasses mix in the builtin they most resemble, so callers
may catch either (``except TimeoutError`` catches :class:`PSTimeoutError`). An error reply
from the wire becomes an exception where it is received (:func:`error_from_reply`).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by ERROR replies."""

    BAD_MESSAGE = 1  # malformed frames or header: cannot be decoded at all
    BAD_VERSION = 2  # protocol version differs from the server's
    UNKNOWN_OP = 3  # op not in the protocol's closed list
    BAD_TENSOR = 4  # dtype unknown, shape invalid, or frame length != prod(shape) * itemsize
    TOO_LARGE = 5  # header or message over its size cap
    SCHEMA_MISMATCH = 6  # tensor names/shapes/dtypes differ from the registered parameters
    BAD_RANK = 7  # rank outside [0, world size) or world size differs from the server's
    NOT_REGISTERED = 8  # op needs a registered worker
    NOT_INITIALIZED = 9  # op needs θ, but rank 0 has not sent it yet
    BAD_STEP = 10  # push for a step that is neither current nor already applied
    INTERNAL = 11  # the server failed on a valid request (a bug); state unchanged
    SHUTTING_DOWN = 12  # the server is finishing and accepts no new work
    UNAUTHORIZED = 13  # the peer is not allowed to do this
    RANK_HELD = 14  # another live connection holds this rank; retry once its lease has expired
    WORKER_LOST = 15  # a worker was lost past --rejoin-deadline: the job has failed
    NONFINITE = 16  # a pushed gradient holds NaN or an infinity (--nonfinite fail): nothing applied
    STALE_SEGMENT = 17  # a push names a shared-memory segment that is not the one the server gave this rank
    WRITE_FAILED = 18  # the server could not write a checkpoint or final.safetensors: the job failed
    REFORMING = 19  # a pipeline stage restarted or moved: every stage starts again together (ps.membership)


class PSError(Exception):
    """Root of every zmqps error."""


class ConfigError(PSError, ValueError):
    """A configuration value (option, environment variable, file) is invalid."""


class ProtocolError(PSError, ValueError):
    """A message violates the wire protocol; carries the :class:`ErrorCode` to reply with."""

    def __init__(self, code: ErrorCode, message: str, req_id: int = 0) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.req_id = req_id  # the request's id when the header was readable, so the reply can be matched


class PSTimeoutError(PSError, TimeoutError):
    """A blocking call ran past its deadline; the message names the peer and the operation."""

    def __init__(self, peer: str, op: str, timeout_s: float, detail: str = "") -> None:
        msg = f"{op} to {peer} timed out after {timeout_s:g}s"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.peer = peer
        self.op = op
        self.timeout_s = timeout_s


class RemoteError(PSError, RuntimeError):
    """The peer answered a request with an ERROR reply."""

    def __init__(self, peer: str, op: str, code: ErrorCode | int, message: str) -> None:
        try:
            code = ErrorCode(code)
            name = code.name
        except ValueError:
            name = str(code)
        super().__init__(f"{op} to {peer} failed: {name}: {message}")
        self.peer = peer
        self.op = op
        self.code = code
        self.remote_message = message


class PSConnectionError(PSError, ConnectionError):
    """A peer could not be reached or refused the connection."""


class AuthenticationError(PSConnectionError):
    """The peer rejected our credentials (CURVE handshake failed)."""


class StageError(PSError, RuntimeError):
    """A pipeline stage could not carry out an action of its schedule.

    The message names the stage (and its rank), the step, the microbatch and the action in the
    schedule's printed form (``1F2``: stage 1, forward of microbatch 2).
    """

    def __init__(self, stage: int, rank: int, step: int, micro: int, action: str, message: str) -> None:
        Exception.__init__(self, f"stage {stage} (rank {rank}), step {step}, microbatch {micro}, "
                                 f"action {action}: {message}")
        self.stage = stage
        self.rank = rank
        self.step = step
        self.micro = micro
        self.action = action


class StageTimeoutError(StageError, PSTimeoutError):
    """A neighbour stage stayed silent past the deadline (it died, hangs, or was never started)."""

    def __init__(self, stage: int, rank: int, step: int, micro: int, action: str, message: str,
                 peer: str = "", timeout_s: float = 0.0) -> None:
        StageError.__init__(self, stage, rank, step, micro, action, message)
        self.peer = peer
        self.op = action
        self.timeout_s = timeout_s
