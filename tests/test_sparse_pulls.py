"""Sparse exact pulls ([Note: sparse pulls]): under plain SGD a step changes only the entries of
a nonzero averaged gradient, and a worker that holds θ of the step before gets just those."""

from __future__ import annotations

import json

import pytest
import torch

from common.config import ServerConfig
from ps.store import ParameterStore
from tests.procs import Procs

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
