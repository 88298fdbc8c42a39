"""``ps-launch --mode pipeline`` runs the seed's model-parallel example with one command.

Nothing but the mode (and where to put the checkpoint) is given: Linear(10, 5) then
Linear(5, 1) on two stages, MSE, the seed's 1000 random samples, batch 100, SGD lr 0.01,
10 epochs. The launcher chooses the layer ranges once and prints them; the final θ equals
single-process SGD on the same batches (float32: rtol 1e-5, atol 4e-5).
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.procs import Procs
from tests.reference_pipeline import replay_pipeline
from worker.factories import default_data, default_pipeline_model


@pytest.mark.timeout(240)
def test_the_seed_two_stage_example_runs_with_one_command(procs: Procs, tmp_path):
    ckpt = tmp_path / "ckpt"
    launcher = procs.spawn("launch", [sys.executable, "-m", "worker.launch", "--mode", "pipeline",
                                      "--checkpoint-dir", str(ckpt), "--progress", "off"],
                           env={"OMP_NUM_THREADS": "1"})
    assert launcher.wait(200) == 0, launcher.output()
    out = launcher.output(tail=200_000)
    assert "partition (" in out and "stage 0: layers [0, 1) cost" in out and "stage 1: layers [1, 2) cost" in out
    assert "[worker 1 stage 1]" in out and "job finished: every process exited 0" in out
    got = load_file(str(ckpt / "final.safetensors"))
    want = replay_pipeline(default_pipeline_model, default_data)
    assert set(got) == {"0.weight", "0.bias", "1.weight", "1.bias"} == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=4e-5)
    # final.safetensors loads into the whole nn.Sequential.
    default_pipeline_model().load_state_dict(got)
