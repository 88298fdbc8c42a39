"""A model module in the current directory works under every entry point, as users start them:
the console scripts ``ps-worker`` and ``ps-launch`` (data and pipeline mode), whose
``sys.path`` does not start with the current directory the way ``python -m`` does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.procs import Procs
from tests.reference import replay
from tests.reference_pipeline import replay_pipeline

BIN = Path(sys.executable).parent
MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def make():
    return nn.Sequential(nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def data():
    return TensorDataset(torch.randn(120, 10, dtype=torch.float64), torch.randn(120, 1, dtype=torch.float64))
'''
JOB = ("--model", "usermodel:make", "--data", "usermodel:data", "--batch-size", "40", "--epochs", "2")


def _user_module(tmp: Path):
    (tmp / "usermodel.py").write_text(MODULE)
    spec = importlib.util.spec_from_file_location("usermodel_for_reference", tmp / "usermodel.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["ps-worker", "ps-launch", "ps-launch --mode pipeline"])
def test_a_model_module_in_the_current_directory_works(procs: Procs, tmp_path: Path, how: str) -> None:
    user = _user_module(tmp_path)
    ck = tmp_path / "ck"
    if how == "ps-worker":
        server, ep = procs.server(2, ckpt=ck)
        workers = [procs.spawn(f"worker {k}", [_script("ps-worker"), "--server", ep, "--rank", str(k),
                                               "--world-size", "2", "--progress", "off", *JOB], cwd=tmp_path)
                   for k in range(2)]
        procs.wait_ok([*workers, server], timeout=240)
        want = replay(user.make, user.data, 2, batch=40, epochs=2)
    else:
        extra = ["--mode", "pipeline", "--partition", "0:2,2:3", "--microbatches", "2"] if "pipeline" in how else []
        child = procs.spawn("launch", [_script("ps-launch"), *JOB, *extra, "--checkpoint-dir", str(ck),
                                       "--progress", "off"], cwd=tmp_path)
        assert child.wait(240) == 0, child.output()
        want = (replay_pipeline(user.make, user.data, batch=40, epochs=2) if "pipeline" in how
                else replay(user.make, user.data, 2, batch=40, epochs=2))
    got = load_file(str(ck / "final.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-9, k
    assert torch.is_tensor(got["0.weight"])
