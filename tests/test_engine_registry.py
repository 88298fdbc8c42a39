"""A training rule is one module and one ``@register``: this test adds one and trains with it.

The toy rule applies each push on arrival, like ``async``, with its gradient scaled by a fixed
factor. Nothing outside this file changes: the server finds it by its ``--sync`` name, tells
the workers what it supports at REGISTER, and runs it over real sockets.
"""

from __future__ import annotations

import threading

import torch

from common.config import ServerConfig
from ps.engine import RULES, register
from ps.engine.onarrival import Async
from ps.engine.pushes import Push
from ps.server import Server
from worker.client import PSClient

FACTOR = 0.25


@register("toy-scaled")
class ScaledOnArrival(Async):
    """``async`` with every pushed gradient multiplied by :data:`FACTOR` first."""

    def apply(self, push: Push) -> None:
        push.tensors = {k: t * FACTOR for k, t in push.tensors.items()}
        super().apply(push)


def test_a_rule_registered_from_a_test_trains_through_a_real_server(tmp_path) -> None:
    assert RULES["toy-scaled"] is ScaledOnArrival
    cfg = ServerConfig(bind="tcp://127.0.0.1:0", workers=1, sync="toy-scaled", lr=0.5,
                       checkpoint_dir=str(tmp_path / "ckpt"))
    server = Server(cfg)
    endpoint = server.bind()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(server.serve(stop_after_s=60)), daemon=True)
    thread.start()
    g = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    with PSClient(endpoint, rank=0, world_size=1, timeout=30) as ps:
        theta = ps.init({"w": torch.zeros(3, dtype=torch.float64)})
        assert ps.server_info["sync"] == "toy-scaled" and ps.server_info["buckets"] is False
        for step in range(3):
            theta = ps.push_pull({"w": g}, step)
        assert ps.done()
    thread.join(30)
    assert codes == [0]
    torch.testing.assert_close(theta["w"], -3 * 0.5 * FACTOR * g, rtol=0, atol=1e-12)
