"""The charlm example (a byte-level language model on the stdlib's source) and held-out evaluation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ps import plot
from worker.evaluation import HeldOut
from worker.examples import charlm

pytestmark = pytest.mark.timeout(300)  # real processes on a shared, loaded machine


def test_the_corpus_is_fixed_and_the_splits_are_disjoint_windows_of_it():
    text = charlm.corpus()
    charlm.corpus.cache_clear()
    charlm._split.cache_clear()
    began = time.monotonic()
    train, test = charlm.train_data(), charlm.test_data()
    assert time.monotonic() - began < 2.0
    assert charlm.corpus() == text and len(text) == charlm.CORPUS_BYTES
    assert text.startswith(charlm._sources()[0].read_bytes()[:1000])
    cut = len(text) - int(len(text) * charlm.HELDOUT_FRACTION)
    flat = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    for data, lo, hi in ((train, 0, cut), (test, cut, len(text))):
        x, y = data.tensors
        assert x.shape == y.shape and x.shape[1] == charlm.SEQ_LEN and x.dtype == torch.long
        assert torch.equal(x.flatten(), flat[lo:lo + x.numel()])  # consecutive windows of its own part
        assert torch.equal(y.flatten(), flat[lo + 1:lo + 1 + y.numel()])  # the next byte of each
        assert lo + y.numel() + 1 <= hi  # no window, target included, reaches into the other part
    assert len(test) >= 0.05 * len(train)


def test_the_model_gives_per_position_logits_for_cross_entropy():
    threads = torch.get_num_threads()
    try:
        net = charlm.model()
        assert torch.get_num_threads() == 1  # [Note: one thread]
    finally:
        torch.set_num_threads(threads)  # the rest of the session keeps its threads
    x, y = charlm.test_data().tensors
    out = net(x[:3])
    assert out.shape == (3, charlm.VOCAB, charlm.SEQ_LEN)
    assert 200_000 < sum(p.numel() for p in net.parameters()) < 1_000_000
    assert nn.functional.cross_entropy(out, y[:3]).item() == pytest.approx(5.55, abs=0.1)  # ~ln 256


def test_heldout_evaluates_at_start_every_n_steps_and_at_the_end(tmp_path: Path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    log = tmp_path / "eval.jsonl"
    held = HeldOut(data, nn.functional.mse_loss, every=2, rows=6, log_path=str(log))
    rng = torch.get_rng_state()
    held.start(0, net)
    for step in range(1, 6):
        held.after_step(step, net)
    held.final(5, net)
    held.final(5, net)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2, 4, 5]
    with torch.no_grad():  # eval mode (no dropout), the first 6 rows
        expect = nn.functional.mse_loss(net.eval()(data.tensors[0][:6]), data.tensors[1][:6]).item()
    assert recs[-1]["heldout_loss"] == pytest.approx(expect)
    assert all(r["ev"] == "eval" and r["rank"] == 0 and r["rows"] == 6 and r["seconds"] >= 0 for r in recs)
    assert [r["t"] for r in recs] == sorted(r["t"] for r in recs)
    assert torch.equal(torch.get_rng_state(), rng)
    net.train()
    held.evaluate(6, net)
    assert net.training  # back in the mode it was in
    rounds = HeldOut(data, nn.functional.mse_loss, every=5)  # rounds of 4 local steps, the last of 2
    rounds.start(0, net)
    seen = [rounds.last_step]
    for step in (4, 8, 12, 14):
        rounds.after_step(step, net)
        seen.append(rounds.last_step)
    assert seen == [0, 0, 8, 12, 12]  # (4, 8] and (8, 12] hold a multiple of 5, (0, 4] and (12, 14] none
    off = HeldOut(None, nn.functional.mse_loss)
    off.start(0, net), off.after_step(2, net), off.final(3, net)
    assert not off.active and off.last_step is None


def test_eval_every_needs_held_out_data(capsys):
    from worker.cli import main as worker_main
    from worker.launch import main as launch_main

    assert launch_main(["--eval-every", "5"]) == 2
    assert worker_main(["--world-size", "1", "--eval-every", "5"]) == 2
    assert launch_main(["--mode", "pipeline", "--eval-every", "5", "--eval-data", "m:f"]) == 2
    err = capsys.readouterr().err
    assert err.count("--eval-every 5 needs --eval-data") == 2 and "--eval-every is for data mode" in err


def test_diloco_evaluates_theta_global_after_rounds(procs, tmp_path: Path):
    """--sync diloco: rank 0 evaluates θ_global at the start, after each round (H = 5 >= N) and at the end."""
    ckpt, log = tmp_path / "dl", tmp_path / "dl-eval.jsonl"
    launch = procs.spawn("launch", [sys.executable, "-m", "worker.launch", "--example", "digits", "--workers", "2",
                                    "--epochs", "1", "--sync", "diloco", "--inner-steps", "5", "--eval-every", "5",
                                    "--eval-log", str(log), "--progress", "off", "--checkpoint-dir", str(ckpt)])
    procs.wait_ok([launch], timeout=120)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 5, 10, 15, 20, 23]  # 23 steps of batch 64: 5 rounds, the last of 3
    assert not (ckpt / "eval.jsonl").exists()
    assert recs[-1]["heldout_loss"] < recs[0]["heldout_loss"], recs


def test_ps_launch_example_charlm_logs_a_falling_held_out_loss(procs, tmp_path: Path):
    """100 steps of the example (its first 3,200 training windows): held out, 5.6 nats falls below 2.6."""
    ckpt = tmp_path / "charlm"
    launch = procs.spawn("launch", [sys.executable, "-m", "worker.launch", "--example", "charlm", "--workers", "2",
                                    "--data", "tests.models:charlm_short", "--eval-every", "25",
                                    "--eval-rows", "256", "--progress", "off", "--checkpoint-dir", str(ckpt)])
    procs.wait_ok([launch], timeout=240)
    recs = [json.loads(line) for line in (ckpt / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 25, 50, 75, 100]
    assert all(set(r) == {"ev", "t", "step", "heldout_loss", "rows", "seconds", "rank"} for r in recs)
    assert all(r["ev"] == "eval" and r["rank"] == 0 and r["rows"] == 256 for r in recs)
    assert recs[0]["heldout_loss"] == pytest.approx(5.55, abs=0.1)
    assert recs[-1]["heldout_loss"] < 2.6, recs
    out = launch.output(20000)
    assert "held-out loss " in out and " at step 0 (256 rows" in out and "example charlm: heldout_loss" in out, out
    png = tmp_path / "charlm.png"
    assert plot.main([str(ckpt / "metrics.jsonl"), str(ckpt / "eval.jsonl"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = plot.read_log(ckpt / "eval.jsonl")
    assert series.heldout == [r["heldout_loss"] for r in recs] and series.eval_t[0] == 0.0 and not series.t
    assert plot.legend_labels([ckpt / "metrics.jsonl", ckpt / "eval.jsonl"]) == ["charlm: bsp", "charlm"]
