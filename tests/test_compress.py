"""The push codecs (``common.compression``): EF-topk against an independent reference, the
error-feedback identity, determinism, and the receiver's checks of hostile parts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.compression import Compressor, Encoded, decompress, expand, pack, parse
from common.compression.codecs import check, index_dtype, topk_indices
from common.errors import ErrorCode, ProtocolError

STEPS = 6


def ref_topk(e: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: order entries by (−|e|, index) with a full stable sort, keep the first k."""
    k = max(1, math.ceil(ratio * e.numel()))
    order = sorted(range(e.numel()), key=lambda i: (-abs(float(e[i])), i))[:k]
    idx = torch.tensor(sorted(order), dtype=torch.int64)
    return e[idx].clone(), idx


def ref_ef(grads: list[dict[str, torch.Tensor]], ratio: float) -> list[dict[str, torch.Tensor]]:
    """What the receiver gets at each step under EF-topk: a plain loop over dense residuals."""
    residual: dict[str, torch.Tensor] = {}
    out = []
    for g in grads:
        step = {}
        for name, t in g.items():
            e = residual.get(name, torch.zeros(t.numel(), dtype=t.dtype)) + t.reshape(-1)
            values, idx = ref_topk(e, ratio)
            sent = torch.zeros_like(e)
            sent[idx] = values
            residual[name] = e - sent
            step[name] = sent.reshape(t.shape)
        out.append(step)
    return out


def random_grads(seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        ties = torch.randint(-2, 3, (7, 5), generator=gen).double()  # many equal magnitudes
        steps.append({"w": torch.randn(13, 11, generator=gen, dtype=torch.float64), "ties": ties,
                      "b": torch.randn(3, generator=gen, dtype=torch.float64)})
    return steps


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.37, 1.0])
def test_ef_topk_equals_the_reference_bitwise(ratio: float) -> None:
    grads = random_grads(int(ratio * 1000))
    want = ref_ef(grads, ratio)
    comp = Compressor(f"topk:{ratio}")
    for t, g in enumerate(grads):
        for name, x in g.items():
            enc = comp.compress(name, x, step=t)
            assert enc.parts["indices"].dtype == torch.int32 and enc.parts["values"].dtype == torch.float64
            assert enc.parts["values"].numel() == max(1, math.ceil(ratio * x.numel()))
            assert torch.equal(decompress(enc, x.shape, x.dtype), want[t][name]), (t, name)


def test_error_feedback_loses_nothing() -> None:
    """Σ sent over the steps + the final residual = Σ g."""
    grads = random_grads(7)
    comp = Compressor("topk:0.05")
    sent = {k: torch.zeros_like(v) for k, v in grads[0].items()}
    for t, g in enumerate(grads):
        for name, x in g.items():
            sent[name] += decompress(comp.compress(name, x, step=t), x.shape, x.dtype)
    for name in sent:
        total = sum(g[name] for g in grads)
        residual = comp.residual(name)
        assert residual is not None
        err = (sent[name] + residual.reshape(total.shape) - total).abs().max().item()
        assert err <= 1e-12, (name, err)


def test_one_encoding_per_step_and_deterministic() -> None:
    x = torch.tensor([3.0, -3.0, 1.0, 3.0, -2.0], dtype=torch.float64)
    comp = Compressor("topk:0.4")
    first = comp.compress("x", x, step=0)
    assert first.parts["indices"].tolist() == [0, 1]  # ties go to the lower index
    again = comp.compress("x", x, step=0)  # a resent push: same encoding, residual untouched
    assert again is first
    assert comp.residual("x").tolist() == [0.0, 0.0, 1.0, 3.0, -2.0]
    nxt = comp.compress("x", x, step=1)
    assert nxt.parts["indices"].tolist() == [3, 4]  # 6 and -4 now lead
    other = Compressor("topk:0.4")
    for t in range(2):
        enc = other.compress("x", x, step=t)
    assert all(torch.equal(enc.parts[p], nxt.parts[p]) for p in ("values", "indices"))


def test_nan_is_sent_and_half_precision_keeps_a_float32_residual() -> None:
    x = torch.tensor([0.5, float("nan"), 2.0, 0.1])
    enc = Compressor("topk:0.25").compress("x", x)
    assert enc.parts["indices"].tolist() == [1] and math.isnan(enc.parts["values"].item())
    h = torch.tensor([1e-4, 1.0, 2.0, 3.0], dtype=torch.bfloat16)
    comp = Compressor("topk:0.25")
    enc = comp.compress("h", h)
    assert enc.parts["values"].dtype == torch.bfloat16 and comp.residual("h").dtype == torch.float32


def test_parse_and_index_dtype() -> None:
    assert parse("none").enabled is False and parse("topk:0.01").ratio == 0.01
    for bad in ("topk", "topk:0", "topk:1.5", "topk:x", "powersgd:0", "powersgd:65", "powersgd:x", "", "none:1"):
        with pytest.raises(ValueError, match="--compress"):
            parse(bad)
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    assert topk_indices(torch.zeros(4), 0).numel() == 0 and topk_indices(torch.ones(3), 9).tolist() == [0, 1, 2]


def _parts(values: list[float], idx: list[int], vdtype=torch.float64, idtype=torch.int32) -> dict:
    return {"values": torch.tensor(values, dtype=vdtype), "indices": torch.tensor(idx, dtype=idtype)}


@pytest.mark.parametrize("parts,why", [
    (_parts([1.0], [0], vdtype=torch.float32), "values are"),
    (_parts([1.0], [0], idtype=torch.int16), "int32 or int64"),
    (_parts([1.0, 2.0], [0]), "values and"),
    (_parts([1.0] * 7, list(range(7))), "values and"),
    (_parts([1.0], [6]), "in [0, 6)"),
    (_parts([1.0], [-1]), "in [0, 6)"),
    (_parts([1.0, 2.0], [2, 2]), "strictly increasing"),
    (_parts([1.0, 2.0], [3, 1]), "strictly increasing"),
    ({"values": torch.ones(1, 1, dtype=torch.float64), "indices": torch.zeros(1, 1, dtype=torch.int32)}, "1-D"),
    ({"values": torch.ones(1, dtype=torch.float64)}, "parts"),
])
def test_check_refuses_bad_parts(parts: dict, why: str) -> None:
    assert why in (check("topk", parts, (6,), torch.float64) or "accepted")
    assert check("topk", _parts([1.0, 2.0], [0, 5]), (6,), torch.float64) is None
    assert check("topk", _parts([], []), (2, 3), torch.float64) is None
    assert "unknown codec" in check("zip", parts, (6,), torch.float64)


SPECS = {"w": ("float64", (2, 3)), "b": ("float64", (1,)), "bn.running_mean": ("float64", (2,))}
BUFFERS = frozenset({"bn.running_mean"})


def _push() -> tuple[list, dict[str, torch.Tensor]]:
    enc = Encoded("topk", _parts([5.0, -1.0], [1, 4]))
    return pack({"b": torch.ones(1, dtype=torch.float64)}, {"w": enc})


def test_expand_gives_the_dense_push() -> None:
    field, tensors = _push()
    assert field == [["w", "topk"]] and list(tensors) == ["b", "w::values", "w::indices"]
    out = expand(tensors, field, SPECS, BUFFERS)
    assert set(out) == {"w", "b"}
    assert out["w"].tolist() == [[0.0, 5.0, 0.0], [0.0, -1.0, 0.0]] and out["b"].tolist() == [1.0]


def _tweak(how: str) -> tuple[object, dict[str, torch.Tensor], dict]:
    field, tensors = _push()
    specs = dict(SPECS)
    if how == "not a list":
        field = {"w": "topk"}
    elif how == "empty":
        field = []
    elif how == "bad entry":
        field = [["w"]]
    elif how == "twice":
        field = [["w", "topk"], ["w", "topk"]]
    elif how == "unknown key":
        field = [["z", "topk"]]
    elif how == "buffer":
        field = [["bn.running_mean", "topk"]]
        tensors["bn.running_mean::values"], tensors["bn.running_mean::indices"] = tensors["w::values"], \
            tensors["w::indices"]
    elif how == "dense too":
        tensors["w"] = torch.zeros(2, 3, dtype=torch.float64)
    elif how == "unknown codec":
        field = [["w", "zip"]]
    elif how == "clash":
        specs["w::values"] = ("float64", (2,))
    elif how == "stray":
        tensors["w::extra"] = torch.zeros(1)
    elif how == "missing part":
        del tensors["w::indices"]
    elif how == "bad part":
        tensors["w::indices"] = torch.tensor([4, 1], dtype=torch.int32)
    return field, tensors, specs


@pytest.mark.parametrize("how", ["not a list", "empty", "bad entry", "twice", "unknown key", "buffer", "dense too",
                                 "unknown codec", "clash", "stray", "missing part", "bad part"])
def test_expand_refuses_a_hostile_field(how: str) -> None:
    field, tensors, specs = _tweak(how)
    with pytest.raises(ProtocolError) as e:
        expand(tensors, field, specs, BUFFERS)
    assert e.value.code in (ErrorCode.BAD_MESSAGE, ErrorCode.SCHEMA_MISMATCH)


def test_push_bytes_reach_prometheus_and_the_jsonl(tmp_path) -> None:
    from prometheus_client import generate_latest

    from common.config import ServerConfig
    from ps.metrics import ServerMetrics

    log = tmp_path / "m.jsonl"
    m = ServerMetrics(ServerConfig(workers=1, metrics_log=str(log)))
    m.start()
    m.push_frames(0, 24, 88)  # two bucket pushes of one step, then its record
    m.push_frames(0, 12, 40)
    m.push(0, 0, 0, 0, 1.0, None)
    m.close(1, None)
    text = generate_latest(m.registry).decode()
    assert 'zmqps_push_bytes_total{rank="0"} 36.0' in text and 'zmqps_push_dense_bytes_total{rank="0"} 128.0' in text
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert (recs[1]["bytes"], recs[1]["dense_bytes"]) == (36, 128)
    assert (recs[-1]["push_bytes"], recs[-1]["push_dense_bytes"]) == (36, 128)


def test_compress_option_from_flag_and_environment() -> None:
    from common.config import WorkerConfig, parse_config
    from common.errors import ConfigError

    assert parse_config(WorkerConfig, ["--world-size", "2"], "t", environ={"PS_COMPRESS": "topk:0.01"}).compress \
        == "topk:0.01"
    for kwargs, why in [({"compress": "topk:0"}, "topk:RATIO"),
                        ({"compress": "topk:0.1", "wire_dtype": "float16"}, "--wire-dtype"),
                        ({"compress": "topk:0.1", "mode": "pipeline", "rank": 0, "stages": 2}, "pipeline")]:
        with pytest.raises(ConfigError, match=why):
            WorkerConfig(world_size=2, **kwargs)


# ---------------------------------------------------------------------------- powersgd
def ref_powersgd(grads: list[torch.Tensor], rank: int, q0: torch.Tensor) -> list[torch.Tensor]:
    """Rank-r error feedback written out: M = residual + g; P = orth(M Q); Q = Mᵀ P; send P Qᵀ."""
    residual = torch.zeros_like(grads[0])
    q = q0
    out = []
    for g in grads:
        m = residual + g
        p, _ = torch.linalg.qr(m @ q)
        q = m.T @ p
        sent = p @ q.T
        residual = m - sent
        out.append(sent)
    return out


def test_powersgd_equals_the_reference_and_loses_nothing() -> None:
    from common.compression.lowrank import start_q

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(12, 9, generator=gen, dtype=torch.float64) for _ in range(STEPS)]
    comp = Compressor("powersgd:2")
    want = ref_powersgd(grads, 2, start_q("w", 9, 2, torch.float64))
    total = torch.zeros_like(grads[0])
    for t, g in enumerate(grads):
        enc = comp.compress("w", g, step=t)
        assert enc.codec == "powersgd" and enc.parts["p"].shape == (12, 2) and enc.parts["q"].shape == (9, 2)
        got = decompress(enc, g.shape, g.dtype)
        assert (got - want[t]).abs().max().item() <= 1e-12
        total += got
    err = (total + comp.residual("w").reshape(12, 9) - sum(grads)).abs().max().item()
    assert err <= 1e-12


def test_powersgd_sends_vectors_dense_and_checks_factors() -> None:
    comp = Compressor("powersgd:4")
    assert not comp.applies(torch.ones(100)) and not comp.applies(torch.ones(4, 4)) and comp.applies(torch.ones(64, 32))
    assert comp.applies(torch.ones(16, 3, 3, 3))  # a conv weight: 16 x 27
    with pytest.raises(ValueError):
        comp.compress("b", torch.ones(100))
    good = {"p": torch.ones(6, 2, dtype=torch.float64), "q": torch.ones(5, 2, dtype=torch.float64)}
    assert check("powersgd", good, (6, 5), torch.float64) is None
    assert check("powersgd", good, (6, 5, 1), torch.float64) is None  # read as 6 x 5
    for parts, shape in [({**good, "p": torch.ones(6, 3, dtype=torch.float64)}, (6, 5)),  # ranks differ
                         ({**good, "q": torch.ones(4, 2, dtype=torch.float64)}, (6, 5)),
                         ({"p": torch.ones(6, 0, dtype=torch.float64), "q": torch.ones(5, 0, dtype=torch.float64)},
                          (6, 5)),
                         ({"p": torch.ones(2, 6, dtype=torch.float64), "q": torch.ones(2, 6, dtype=torch.float64)},
                          (2, 2)),
                         ({**good, "p": torch.ones(6, 2)}, (6, 5)),
                         (good, (30,)),
                         ({**good, "p": torch.ones(12, dtype=torch.float64)}, (6, 5))]:
        assert check("powersgd", parts, shape, torch.float64) is not None, (parts, shape)
