"""The parts of fault handling that need no server process: leases, membership changes of a key
group, fault specs, schema caps, certificates and endpoints, backoff, CURVE over real sockets,
and the decoder under random input."""

from __future__ import annotations

import os
import random
import stat
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import security
from common.config import ServerConfig, WorkerConfig
from common.errors import ConfigError, ErrorCode, ProtocolError
from common.faults import parse_fault
from common.protocol import Op
from common.transport import bind_router, connect_dealer
from common.watch import HandshakeWatch
from common.wire import DEFAULT_LIMITS, decode, encode
from ps.aggregate import Contribution, KeyGroup
from ps.limits import largest_frame, schema_limits
from tests import fuzzgen
from ps.liveness import Liveness
from worker.retry import RetryPolicy


# ---------------------------------------------------------------------------- leases
def test_lease_lapses_then_the_rank_is_back():
    lv = Liveness(world=2, lease_s=5.0, deadline_s=30.0)
    lv.touch(0, now=100.0)
    lv.touch(1, now=101.0)
    assert lv.remaining(0, 103.0) == pytest.approx(2.0)
    assert lv.lapse(104.0, step=7) == []
    assert lv.lapse(105.5, step=7) == [0]  # silent for 5.5 s > 5 s
    assert lv.lapse(105.6, step=7) == []  # reported once
    assert lv.remaining(0, 105.6) == 0.0  # a lost rank's lease holds nothing
    assert lv.overdue(134.0, registered=[0, 1], started=True) is None
    assert "rank 0 was lost at step 7" in lv.overdue(135.1, registered=[0, 1], started=True)
    back = lv.touch(0, now=106.0)
    assert back is not None and back.step == 7 and back.since == 105.0
    assert lv.overdue(200.0, registered=[0, 1], started=True) is None or "rank 1" in lv.overdue(
        200.0, registered=[0, 1], started=True)


def test_lapse_exempts_finished_workers_and_registration_has_a_deadline():
    lv = Liveness(world=3, lease_s=1.0, deadline_s=10.0)
    lv.touch(0, now=0.0)
    assert lv.lapse(5.0, step=3, exempt=[0]) == []
    assert lv.overdue(9.0, registered=[0], started=False) is None
    assert "rank(s) [1, 2] did not register within 10s" in lv.overdue(10.5, registered=[0], started=False)


# ---------------------------------------------------------------------------- key groups
def _push(value: float) -> Contribution:
    return Contribution({"w": torch.full((2,), value, dtype=torch.float64)}, 1.0, None)


def test_removing_a_silent_rank_completes_the_step_with_the_others():
    g = KeyGroup(keys=("w",), contributors=(0, 1, 2))
    assert not g.add(1, _push(3.0))
    assert not g.remove(2)  # rank 0 is still missing
    assert g.contributors == (0, 1)
    assert g.add(0, _push(1.0))
    grads = g.finish().grads
    assert torch.equal(grads["w"], torch.full((2,), 2.0, dtype=torch.float64))


def test_a_rank_that_pushed_stays_for_the_step_and_removal_can_complete_it():
    g = KeyGroup(keys=("w",), contributors=(0, 1, 2))
    assert not g.add(0, _push(1.0))
    assert not g.remove(0)  # its push counts this step
    assert g.contributors == (0, 1, 2)
    assert not g.add(2, _push(5.0))  # waits for rank 1, in rank order
    assert g.remove(1)  # now 0 and 2 are in: complete
    grads = g.finish().grads
    assert torch.equal(grads["w"], torch.full((2,), 3.0, dtype=torch.float64))
    empty = KeyGroup(keys=("w",), contributors=(0, 1))
    assert not empty.remove(0) and not empty.remove(1)  # nobody pushed: never "complete"


# ---------------------------------------------------------------------------- configuration
def test_fault_specs():
    assert parse_fault("stop:after-push:7").step == 7
    for bad in ("stop:after-push", "pause:after-push:1", "kill:nowhere:1", "kill:before-push:-1"):
        with pytest.raises(ConfigError):
            parse_fault(bad)


def test_curve_options_come_in_pairs():
    with pytest.raises(ConfigError, match="both"):
        ServerConfig(workers=1, curve_secret_key="s.key_secret")
    with pytest.raises(ConfigError, match="both"):
        WorkerConfig(rank=0, world_size=1, curve_server_key="server.key")
    with pytest.raises(ConfigError):
        WorkerConfig(rank=0, world_size=1, fault="kill:after-apply")
    with pytest.raises(ConfigError):
        ServerConfig(workers=1, lease=0)


# ---------------------------------------------------------------------------- caps from the schema
def test_caps_from_the_schema_admit_theta_and_nothing_bigger():
    theta = {"weight": torch.zeros(1, 10, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64)}
    specs = {k: ("float64", tuple(v.shape)) for k, v in theta.items()}
    tight = schema_limits(specs, DEFAULT_LIMITS)
    assert tight.max_tensors == 2 * 2 + 16 and tight.max_message_bytes < 80_000  # compressed: 2 frames a key
    assert largest_frame(specs, tight) == tight.max_header_bytes
    ok = decode(encode(Op.PUSH, {"rank": 0, "step": 0}, theta), tight)
    assert set(ok.tensors) == set(theta)
    big = {"weight": torch.zeros(100, 100, dtype=torch.float64)}
    with pytest.raises(ProtocolError) as e:
        decode(encode(Op.PUSH, {"rank": 0, "step": 0}, big), tight)
    assert e.value.code is ErrorCode.TOO_LARGE
    many = dict(theta, **{f"x{i}": torch.zeros(1, dtype=torch.float64) for i in range(19)})
    with pytest.raises(ProtocolError) as e:
        decode(encode(Op.PUSH, {"rank": 0, "step": 0}, many), tight)
    assert e.value.code is ErrorCode.TOO_LARGE
    one_more = dict(theta, other=torch.zeros(1, dtype=torch.float64))  # left to the schema check
    assert len(decode(encode(Op.PUSH, {"rank": 0, "step": 0}, one_more), tight).tensors) == 3


# ---------------------------------------------------------------------------- certificates, endpoints
def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    public, secret = security.keygen(tmp_path / "k", "w0")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pub, sec = security.load_keypair(secret)
    assert security.load_public(public) == pub and len(sec) == 40
    with pytest.raises(ConfigError, match="already exists"):
        security.keygen(tmp_path / "k", "w0")
    with pytest.raises(ConfigError, match="no secret key"):
        security.load_keypair(public)
    with pytest.raises(ConfigError):
        security.load_authorized(tmp_path / "missing")
    assert security.load_authorized(tmp_path / "k") == frozenset({pub})


def test_an_endpoint_carries_a_key_and_a_bad_one_is_refused():
    pub, _ = zmq.curve_keypair()
    ep = security.advertise("tcp://10.0.0.1:5555", pub)
    assert ep.rsplit(":", 1)[-1].startswith("5555#curve=")  # host:port parsing still finds the port
    assert security.split_endpoint(ep) == ("tcp://10.0.0.1:5555", pub)
    assert security.split_endpoint("ipc:///tmp/x") == ("ipc:///tmp/x", None)
    with pytest.raises(ConfigError):
        security.split_endpoint("tcp://h:1#curve=abcd")


def test_backoff_doubles_up_to_its_cap():
    p = RetryPolicy(backoff_s=0.5, backoff_max_s=3.0)
    assert [p.backoff(i) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


# ---------------------------------------------------------------------------- CURVE on real sockets
def _until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_curve_admits_authorized_keys_only(tmp_path, caplog):
    server_pub, server_sec = security.keygen(tmp_path / "keys", "server")
    _, good_sec = security.keygen(tmp_path / "keys", "good")
    _, bad_sec = security.keygen(tmp_path / "other", "bad")
    server_curve = security.Curve.for_server(str(server_sec), str(tmp_path / "keys"))
    sctx, cctx = zmq.Context(), zmq.Context()
    socks: list[zmq.Socket] = []
    watches: list[HandshakeWatch] = []
    try:
        router, ep = bind_router(sctx, "tcp://127.0.0.1:0", curve=server_curve)
        socks.append(router)
        assert security.split_endpoint(ep)[1] == server_curve.public

        def client(secret, curve_on: bool = True) -> tuple[zmq.Socket, HandshakeWatch]:
            curve = security.Curve.for_worker(str(secret), str(server_pub)) if curve_on else None
            sock = connect_dealer(cctx, ep if curve_on else security.split_endpoint(ep)[0], curve=curve)
            watch = HandshakeWatch(cctx, sock)
            socks.append(sock)
            watches.append(watch)
            return sock, watch

        good, good_watch = client(good_sec)
        good.send(b"hello")
        assert router.poll(10_000)
        assert router.recv_multipart()[1] == b"hello"
        assert _until(lambda: (good_watch.update(), good_watch.generation)[1] == 1)
        _, bad_watch = client(bad_sec)
        assert _until(lambda: (bad_watch.update(), bad_watch.failure)[1] is not None)
        assert "refused our CURVE key" in bad_watch.failure
        _, plain_watch = client(None, curve_on=False)
        assert _until(lambda: (plain_watch.update(), plain_watch.failure)[1] is not None)
        assert "mechanism mismatch" in plain_watch.failure or "CURVE on one side only" in plain_watch.failure
        assert not router.poll(200)  # nothing from the refused clients reached the socket
        guard = security.ensure_guard(sctx, server_curve)
        assert _until(lambda: guard.refused >= 2)
    finally:
        for w in watches:
            w.close()
        for s in socks:
            s.close(0)
        guard = security.ensure_guard(sctx, server_curve)
        guard.stop()
        guard.join(5)
        sctx.term()
        cctx.term()


# ---------------------------------------------------------------------------- the decoder
THETA = {"weight": torch.randn(1, 10, dtype=torch.float64), "bias": torch.randn(1, dtype=torch.float64)}
SEEDS = fuzzgen.valid_messages(THETA, [0, 1])
BATCH = 50


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(seed=st.integers(0, 2**63 - 1))
def test_the_decoder_raises_only_protocol_errors(seed):
    """5000 hostile messages: decode returns a valid message or raises ProtocolError, nothing else."""
    for frames in fuzzgen.messages(random.Random(seed), BATCH, SEEDS):
        frames = [bytearray(f) for f in frames]  # writable, as ZeroMQ's frames are
        try:
            msg = decode(frames)
        except ProtocolError as e:
            assert isinstance(e.code, ErrorCode)
            continue
        assert len(msg.tensors) == len(frames) - 1, frames


# ---------------------------------------------------------------------------- checkpoints
def test_a_crash_mid_write_leaves_the_old_checkpoint_and_a_temporary_that_is_removed(tmp_path):
    from ps import checkpoint

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    checkpoint.save_checkpoint(tmp_path, 4, {"w": torch.ones(2)}, opt.state_dict(), {"versions": {"w": 4}})
    torn = tmp_path / ".ckpt-000000008.safetensors.1234.tmp"  # what a kill -9 during a write leaves
    torn.write_bytes(b"half a file")
    assert checkpoint.latest_checkpoint(tmp_path).name == "ckpt-000000004.safetensors"
    assert checkpoint.remove_temporaries(tmp_path) == [torn] and not torn.exists()
    params, _, meta = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert meta["step"] == 4 and torch.equal(params["w"], torch.ones(2))


@pytest.mark.parametrize("damage", [lambda raw: raw[:50], lambda raw: b"junk", lambda raw: raw.replace(b'\\"step\\"', b'\\"stop\\"')])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_none_readable_is_an_error(tmp_path, caplog, damage):
    from ps import checkpoint
    from ps.server import Server

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    checkpoint.save_checkpoint(tmp_path, 4, {"w": torch.ones(2)}, opt.state_dict(), {"versions": {"w": 4}})
    checkpoint.save_checkpoint(tmp_path, 8, {"w": torch.full((2,), 2.0)}, opt.state_dict(), {"versions": {"w": 8}})
    newest = checkpoint.latest_checkpoint(tmp_path)
    newest.write_bytes(damage(newest.read_bytes()))  # the disk's doing: our writes are atomic
    cfg = ServerConfig(workers=1, checkpoint_dir=str(tmp_path))
    server = Server(cfg)
    try:
        assert server.checkpoints.saved_step == 4 and torch.equal(server.store.params["w"], torch.ones(2))
    finally:
        server.close()
    assert "cannot resume from ckpt-000000008.safetensors" in caplog.text
    for p in checkpoint.checkpoints(tmp_path):
        p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(ConfigError, match="move them away to train from scratch"):
        Server(cfg)  # not a silent fresh start over a job's checkpoints
