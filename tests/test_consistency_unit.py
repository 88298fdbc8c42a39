"""The consistency models' rules, in one process (no sockets: pure bookkeeping and math)."""

from __future__ import annotations

import pytest
import torch

from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.protocol import Op
from ps.aggregate import KeyGroup
from ps.engine import Services, make_engine
from ps.engine.pushes import Push
from ps.membership import Membership, WorkerInfo
from ps.metrics import ServerMetrics
from ps.store import ParameterStore
from worker.jitter import Stall


class NoCheckpoints:
    """The engine's view of the checkpoints, doing nothing (no disk in these tests)."""

    def maybe_save(self, version: int, cut: bool) -> None:
        pass

    def restorable(self) -> list[int]:
        return []


def setup(sync: str, clocks: list[int], staleness: int = 0, optimizer: str = "sgd", lr: float = 0.5):
    cfg = ServerConfig(workers=len(clocks), sync=sync, staleness=staleness, optimizer=optimizer, lr=lr)
    store = ParameterStore(cfg)
    store.initialize({"w": torch.zeros(3, dtype=torch.float64)})
    members = Membership(cfg)
    for r, c in enumerate(clocks):
        members.workers[r] = WorkerInfo(rank=r, identity=b"%d" % r, keys=("w",), clock=c)
    metrics = ServerMetrics(cfg)
    policy = make_engine(Services(cfg, store, members, metrics, None, None, NoCheckpoints()))  # type: ignore[arg-type]
    group = KeyGroup(keys=("w",), contributors=tuple(range(len(clocks))))
    return policy, store, members.workers, metrics, group


def push(policy, w: WorkerInfo, step: int, group: KeyGroup, grads: dict, weight: float, loss) -> bool:
    """What ``on_push`` hands the rule once the message is read and checked."""
    return policy.accept(Push(Op.PUSH, w, step, grads, frozenset(), [group], weight, None, loss, w.keys, False))


def test_ssp_waits_only_while_the_slowest_live_worker_is_below_c_minus_s():
    policy, _, workers, _, _ = setup("ssp", [5, 3, 4], staleness=2)
    assert policy.ready(0, 5, ("w",))  # slowest 3 >= 5 - 2
    assert not policy.ready(0, 6, ("w",))  # 3 < 6 - 2
    workers[1].done = True  # a finished worker no longer holds anyone back
    assert policy.ready(0, 6, ("w",)) and not policy.ready(0, 7, ("w",))


def test_bsp_waits_for_the_version_and_async_never_waits():
    bsp, store, *_ = setup("bsp", [0, 0])
    assert bsp.ready(0, 0, ("w",)) and not bsp.ready(0, 1, ("w",))
    store.apply({"w": torch.ones(3, dtype=torch.float64)})
    assert bsp.ready(0, 1, ("w",))
    asy, *_ = setup("async", [9, 0])
    assert asy.ready(0, 10, ("w",))


def test_async_applies_each_push_with_lr_over_k_and_restores_the_lr():
    policy, store, workers, metrics, group = setup("async", [0, 0], lr=0.5)
    g = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert push(policy, workers[0], 0, group, {"w": g}, 1.0, 2.0)
    torch.testing.assert_close(store.params["w"].detach(), -0.25 * g, rtol=0, atol=0)
    assert store.optimizer.param_groups[0]["lr"] == 0.5
    assert workers[0].clock == 1 and store.versions["w"] == 1 and metrics.updates == 1
    assert policy.loss == 2.0


def test_async_rejects_a_step_ahead_of_the_clock_and_acknowledges_a_replay_without_change():
    policy, store, workers, metrics, group = setup("async", [1, 0])
    before = store.params["w"].detach().clone()
    with pytest.raises(ProtocolError) as e:
        push(policy, workers[0], 3, group, {"w": torch.ones(3, dtype=torch.float64)}, 1.0, None)
    assert e.value.code is ErrorCode.BAD_STEP and "rank 0" in str(e.value)
    assert not push(policy, workers[0], 0, group, {"w": torch.ones(3, dtype=torch.float64)}, 1.0, None)
    assert torch.equal(store.params["w"].detach(), before) and workers[0].clock == 1 and metrics.pushes == 0


def test_adam_runs_with_lr_over_k_on_arrival():
    policy, store, workers, _, group = setup("async", [0, 0], optimizer="adam", lr=0.1)
    push(policy, workers[0], 0, group, {"w": torch.ones(3, dtype=torch.float64)}, 1.0, None)
    # Adam's first step moves each coordinate by lr (times sign): here lr / K = 0.05
    torch.testing.assert_close(store.params["w"].detach(), torch.full((3,), -0.05, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    assert store.optimizer.param_groups[0]["lr"] == 0.1


def test_staleness_counts_updates_since_the_workers_read_and_lead_counts_steps():
    policy, _, workers, metrics, group = setup("async", [0, 0])
    policy.on_read(0, 0)
    policy.on_read(1, 0)
    one = {"w": torch.ones(3, dtype=torch.float64)}
    push(policy, workers[0], 0, group, one, 1.0, None)  # applied at version 0: staleness 0
    push(policy, workers[1], 0, group, one, 1.0, None)  # one update since its read: 1
    push(policy, workers[0], 1, group, one, 1.0, None)  # read 0, now 2; rank 1 is at clock 1
    assert dict(metrics.staleness) == {0: 1, 1: 1, 2: 1}
    policy.on_read(0, 3)
    push(policy, workers[0], 2, group, one, 1.0, None)  # 1 step ahead of rank 1 (clock 1)
    assert metrics.max_lead == 1 and metrics.staleness[0] == 2


def test_an_empty_batch_advances_the_clock_without_an_update():
    policy, store, workers, metrics, group = setup("ssp", [0, 0], staleness=1)
    assert push(policy, workers[0], 0, group, {"w": torch.ones(3, dtype=torch.float64)}, 0.0, None)
    assert workers[0].clock == 1 and store.versions["w"] == 0 and metrics.updates == 0


def test_checkpoint_state_restores_the_clocks_for_a_resumed_worker():
    policy, _, workers, _, _ = setup("async", [4, 7])
    state = policy.state()
    fresh, _, fresh_workers, _, _ = setup("async", [0, 0])
    fresh.load_state(state)
    assert fresh.start_step(1, 999) == 7 and fresh_workers[1].clock == 7


def test_stall_draws_depend_only_on_seed_rank_and_step():
    a, b, other = Stall(0.3, 0.0, seed=1, rank=0), Stall(0.3, 0.0, seed=1, rank=0), Stall(0.3, 0.0, seed=1, rank=1)
    draws = [a.hits(t) for t in range(200)]
    assert draws == [b.hits(t) for t in range(200)]
    assert draws != [other.hits(t) for t in range(200)]
    assert 30 < sum(draws) < 90
    assert all(Stall(1.0, 0.0).hits(t) for t in range(50)) and not any(Stall(0.0, 0.0).hits(t) for t in range(50))


def test_a_dropped_rank_no_longer_holds_ssp_back():
    policy, _, workers, _, _ = setup("ssp", [6, 1, 6], staleness=2)
    assert not policy.ready(0, 6, ("w",))
    del workers[1]  # what --on-worker-loss shrink does
    assert policy.ready(0, 6, ("w",)) and policy.peers(0) == (0, 2)


@pytest.mark.parametrize("sync", ["async", "ssp"])
def test_on_arrival_rules_start_every_worker_from_one_theta(sync):
    """[Note: one start] Until a push is applied, an INIT waits for every registered worker's INIT:
    a worker that started early must not push step 0 before another one has read θ_0."""
    from ps.parking import Waiter

    policy, _, workers, _, group = setup(sync, [0, 0])
    parking = policy.members.parking
    parking.park(Waiter(b"0", 1, Op.INIT, 0, ("w",), step=0))
    assert policy.start_barrier(0)  # rank 1 registered but has not sent its INIT yet
    parking.park(Waiter(b"1", 1, Op.INIT, 1, ("w",), step=0))
    assert not policy.start_barrier(0) and not policy.start_barrier(1)
    parking.waiters.clear()  # both answered with θ_0
    assert push(policy, workers[0], 0, group, {"w": torch.ones(3, dtype=torch.float64)}, 1.0, None)
    parking.park(Waiter(b"1", 2, Op.INIT, 1, ("w",), step=0))  # a copy of an INIT, once training runs
    assert not policy.start_barrier(1)


def test_bsp_needs_no_start_barrier():
    bsp, *_ = setup("bsp", [0, 0])
    assert not bsp.start_barrier(0)


def test_a_stage_restarted_after_the_last_step_does_not_wait_for_stages_that_are_done():
    """[Note: pipeline formations] Stages start together, but one that finished (its DONE is in)
    takes no part any more: a stage killed before its DONE and restarted must not wait for it
    (found by the nemesis, seed 203: a deadlock)."""
    from ps.parking import Waiter

    members = Membership(ServerConfig(workers=2))
    for r in range(2):
        members.workers[r] = WorkerInfo(rank=r, identity=b"%d" % r, keys=(f"{r}.weight",), role="stage")
    members.parking.park(Waiter(b"1", 1, Op.INIT, 1, ("1.weight",), step=0))
    assert members.stage_barrier(1)  # stage 0 has not sent its INIT
    members.workers[0].done = True
    assert not members.stage_barrier(1)
