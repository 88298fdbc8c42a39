"""When a call of a client ends in registering again.

A server that no longer knows this worker's rank (it restarted, or dropped the rank after
its lease lapsed) answers NOT_REGISTERED. A shared-memory push that names a segment the
server did not give this rank is refused with STALE_SEGMENT: this worker acted on the answer
of a server that has since restarted ([Note: one segment per registration] in
``ps/fastpath.py``). In both cases nothing was applied, and registering again (which names
the right segment) lets the job go on: the client re-registers with every shard, re-INITs,
and the call returns θ at the server's version ([Note: rewinding] in ``worker.client``).
"""

from __future__ import annotations

import torch

from common.errors import ErrorCode, RemoteError


class Rejoined(Exception):
    """Internal to the client: the call ended in registering again; θ is at the server's version."""

    def __init__(self, theta: dict[str, torch.Tensor]) -> None:
        super().__init__("rejoined")
        self.theta = theta


def rejoin_reason(e: RemoteError) -> str | None:
    """Why ``e`` means this worker must register again, for the log; None when it does not."""
    if e.code == ErrorCode.NOT_REGISTERED:
        return "the server no longer knows this rank (it restarted, or dropped it)"
    if e.code == ErrorCode.STALE_SEGMENT:
        return f"the server refused its segment ({e.remote_message})"
    return None
