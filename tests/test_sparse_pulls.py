"""Sparse exact pulls ([Note: sparse pulls]): under plain SGD a step changes only the entries of
a nonzero averaged gradient, and a worker that holds θ of the step before gets just those.

A worker checks the changed entries a server sends before it writes any: a real client against a
hostile server played by the test (a ZeroMQ ROUTER, ``tests.test_inflight.Peer``)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import torch

from common.config import ServerConfig
from common.errors import PSError
from common.protocol import Op
from ps.store import ParameterStore
from tests.procs import Procs
from tests.test_inflight import Answer, Peer, peer  # noqa: F401  (fixture)
from worker.client import PSClient

pytestmark = pytest.mark.timeout(300)


def _store(**cfg) -> ParameterStore:
    store = ParameterStore(ServerConfig(workers=1, **cfg))
    store.initialize({"w": torch.arange(10, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)})
    store.compressed_pushes = True  # as after a compressed push (ps.engine.pushes)
    return store


def test_plain_sgd_remembers_the_changed_entries_and_sends_them_exactly() -> None:
    store = _store(lr=0.5)
    g = torch.zeros(10, dtype=torch.float64)
    g[[2, 7]] = torch.tensor([1.0, -3.0], dtype=torch.float64)
    store.apply({"w": g}, keys=["w", "b"])  # b: no gradient, nothing changed
    dense, sparse = store.sparse_view(("w", "b"), have=0)
    assert dense == ()
    assert sparse["w"]["indices"].tolist() == [2, 7] and sparse["w"]["indices"].dtype == torch.int32
    assert sparse["w"]["values"].tolist() == [1.5, 8.5]
    assert sparse["b"]["indices"].numel() == 0 and sparse["b"]["values"].numel() == 0
    assert store.sparse_view(("w",), have=1) == (("w",), {})  # another version: whole
    store.apply({"w": torch.ones(10, dtype=torch.float64)}, keys=["w"])  # a dense step: whole
    assert store.sparse_view(("w",), have=1) == (("w",), {})


def test_without_compressed_pushes_no_step_is_searched_for_changed_entries() -> None:
    store = _store(lr=0.5)
    store.compressed_pushes = False  # dense gradients: the pass over them is not worth its time
    g = torch.zeros(10, dtype=torch.float64)
    g[3] = 1.0
    store.apply({"w": g}, keys=["w"])
    assert store.sparse_view(("w",), have=0) == (("w",), {})


@pytest.mark.parametrize("cfg", [{"optimizer": "momentum"}, {"weight_decay": 0.1}, {"optimizer": "adam"}])
def test_an_optimizer_that_moves_every_entry_sends_theta_whole(cfg: dict) -> None:
    store = _store(**cfg)
    g = torch.zeros(10, dtype=torch.float64)
    g[3] = 1.0
    store.apply({"w": g}, keys=["w"])
    assert store.sparse_view(("w",), have=0) == (("w",), {})


def _bytes_out(procs: Procs, optimizer: str) -> tuple[float, int]:
    log = procs.tmp / f"metrics-{optimizer}.jsonl"
    server, ep = procs.server(2, "--optimizer", optimizer, "--metrics-log", str(log), ckpt=procs.tmp / optimizer)
    job = ("--model", "tests.jobs:wide64", "--data", "tests.jobs:wide_data64", "--epochs", "2", "--batch-size", "64",
           "--compress", "topk:0.01", "--shm", "off")
    procs.wait_ok([*(procs.worker(ep, k, 2, *job) for k in range(2)), server], timeout=240)
    end = [json.loads(line) for line in log.read_text().splitlines()][-1]
    return end["bytes_out"], end["version"]


def test_a_compressed_sgd_job_pulls_a_fraction_of_theta(procs: Procs) -> None:
    theta = (64 * 256 + 64) * 8
    sparse, steps = _bytes_out(procs, "sgd")
    dense, _ = _bytes_out(procs, "momentum")
    pulls = 2 * steps  # every step's θ, to each of 2 workers (and θ_0 whole at INIT)
    assert dense > (pulls + 2) * theta  # momentum moves every entry: θ goes whole
    assert sparse - 2 * theta < 0.1 * pulls * theta, (sparse, dense)


# ---------------------------------------------------------------- a hostile server's sparse reply
THETA0 = {"b": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "w": torch.arange(10, dtype=torch.float64)}
REGISTERED = {"world_size": 1, "sync": "sync", "initialized": True, "rank": 0, "optimizer": "sgd", "lr": 0.1,
              "incarnation": "hostile", "lease_s": 60.0, "hold_s": 60.0, "buckets": True}
INITIALIZED = {"version": 0, "loss": None, "peers": [], "restorable": [], "formation": 0}
I32 = torch.int32


def _entries(idx: list[int] | torch.Tensor, vals: list[float] | torch.Tensor,
             key: str = "w") -> dict[str, torch.Tensor]:
    """``key``'s changed entries as their frames (``KEY::indices`` int32, ``KEY::values`` float64)."""
    return {f"{key}::indices": idx if isinstance(idx, torch.Tensor) else torch.tensor(idx, dtype=I32),
            f"{key}::values": vals if isinstance(vals, torch.Tensor) else torch.tensor(vals, dtype=torch.float64)}


GOOD_B = _entries([1], [7.0], "b")  # b's changed entries, valid: listed (and checked) before w's


Stepped = tuple[dict[str, torch.Tensor], "BaseException | None", dict[str, Any]]


def _step_against(peer: Peer, sparse: list[str], tensors: dict[str, torch.Tensor],  # noqa: F811
                  allow: bool = True, timeout: float = 30.0) -> Stepped:
    """A real client (frames, no heartbeat) joins ``peer`` and runs one step holding θ_0, allowing
    sparse pulls (unless not ``allow``); the server answers REGISTER and INIT as a server would,
    then the step's PUSH_PULL with ``sparse`` and ``tensors``. Returns the parameters after the
    step, what the step raised, and the PUSH_PULL's fields."""
    params = {k: v.clone() for k, v in THETA0.items()}
    out: dict[str, Any] = {}

    def work() -> None:
        client = PSClient(peer.endpoint, 0, 1, timeout=timeout, heartbeat=0, shm="off")
        try:
            for k, t in client.init({k: v.clone() for k, v in THETA0.items()}).items():
                params[k].copy_(t)
            if allow:
                client.allow_sparse_pulls()
            client.begin_step(samples=1.0)
            client.push_bucket(0, {"w": torch.ones(10, dtype=torch.float64), "b": None})
            client.end_step(params)
        except BaseException as e:  # the test's thread looks at it
            out["error"] = e
        finally:
            client.close()

    answers: dict[Op, Answer] = {
        Op.REGISTER: lambda m: (REGISTERED, {}),
        Op.INIT: lambda m: (INITIALIZED, THETA0),
        Op.PUSH_PULL: lambda m: ({"version": 1, "loss": None, "sparse": sparse}, tensors),
    }
    t = threading.Thread(target=work, daemon=True)
    t.start()
    seen = peer.serve(answers, t, timeout)
    assert not t.is_alive(), "the client did not finish its step"
    asked = [m.fields for m in seen if m.op is Op.PUSH_PULL]
    assert asked, "the client never reached its step's PUSH_PULL"
    out["asked"] = asked[0]
    return params, out.get("error"), out["asked"]


def test_a_worker_holding_theta_takes_the_changed_entries_the_server_sends(peer) -> None:  # noqa: F811
    params, error, asked = _step_against(peer, ["b", "w"], {**GOOD_B, **_entries([2, 7], [20.0, 70.0])})
    assert error is None
    assert asked["have"] == 0  # it offered the version it holds
    want_w = THETA0["w"].clone()
    want_w[[2, 7]] = torch.tensor([20.0, 70.0], dtype=torch.float64)
    assert torch.equal(params["w"], want_w)
    assert torch.equal(params["b"], torch.tensor([0.5, 7.0, 2.0], dtype=torch.float64))


BAD = {
    "an index past the end": (["b", "w"], _entries([2, 10], [1.0, 2.0]), "w"),
    "a negative index": (["b", "w"], _entries([-1, 3], [1.0, 2.0]), "w"),
    "indices not increasing": (["b", "w"], _entries([7, 2], [1.0, 2.0]), "w"),
    "a repeated index": (["b", "w"], _entries([4, 4], [1.0, 2.0]), "w"),
    "float indices": (["b", "w"], _entries(torch.tensor([1.0, 2.0]), [1.0, 2.0]), "w"),
    "int16 indices": (["b", "w"], _entries(torch.tensor([1, 2], dtype=torch.int16), [1.0, 2.0]), "w"),
    "values of another dtype": (["b", "w"], _entries([1, 2], torch.tensor([1.0, 2.0])), "w"),
    "more indices than values": (["b", "w"], _entries([1, 2, 3], [1.0, 2.0]), "w"),
    "more values than entries": (["b", "w"], _entries(list(range(11)), [0.0] * 11), "w"),
    "2-D indices": (["b", "w"], _entries(torch.tensor([[1, 2]], dtype=I32), torch.ones(1, 2, dtype=torch.float64)),
                    "w"),
    "a missing part": (["b", "w"], {"w::values": torch.ones(2, dtype=torch.float64)}, "w"),
    "a key listed twice": (["b", "w", "w"], _entries([1], [1.0]), "w"),
    "a key also sent whole": (["b", "w"], {**_entries([1], [1.0]), "w": torch.zeros(10, dtype=torch.float64)}, "w"),
    "a key this worker lacks": (["b", "z"], _entries([1], [1.0], "z"), "z"),
    "a stray part": (["b", "w"], {**_entries([1], [1.0]), "w::p": torch.ones(1, dtype=torch.float64)}, "w::p"),
    "a whole key of the wrong shape": (["b"], {"w": torch.zeros(1, dtype=torch.float64)}, "w"),
    "a whole key of another dtype": (["b"], {"w": torch.zeros(10, dtype=torch.float32)}, "w"),
    "a key missing": (["b"], {}, "w"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_changed_entries_are_a_ps_error_naming_the_key_and_change_nothing(peer, case: str) -> None:  # noqa: F811
    sparse, tensors, key = BAD[case]
    params, error, asked = _step_against(peer, sparse, {**GOOD_B, **tensors})
    assert asked["have"] == 0
    assert isinstance(error, PSError), error
    assert repr(key) in str(error) and peer.endpoint in str(error), str(error)
    for k, v in THETA0.items():  # b's valid entries were not applied either: nothing half-done
        assert torch.equal(params[k], v), (k, params[k])


def test_changed_entries_the_worker_did_not_ask_for_are_refused(peer) -> None:  # noqa: F811
    params, error, asked = _step_against(peer, ["b"], GOOD_B, allow=False)
    assert "have" not in asked
    assert isinstance(error, PSError) and "'b'" in str(error) and "whole" in str(error), error
    assert torch.equal(params["b"], THETA0["b"])
