"""Real models keep torch's and DDP's semantics: frozen, unused and late-used parameters under
momentum, Adam and weight decay; BatchNorm buffers; tied weights; mixed dtypes; sparse
embeddings; clipping. Each job runs as real processes (a server and K workers) and ends at
the state_dict of the single-process math (float64 ≤ 1e-9) and of torch DDP (gloo).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ps.checkpoint import checkpoints, load_state_dict
from tests import models
from tests.ddp_job import run_ddp
from tests.procs import Procs
from tests.reference import replay

TOL = 1e-9
TOL32 = 4e-5  # float32 keys: the summation order differs (rtol 1e-5 / atol 4e-5 by convention)
JOB = ("--batch-size", "20", "--epochs", "1", "--no-shuffle", "--loss", "cross_entropy")


def run_job(procs: Procs, world: int, server_args: tuple[str, ...], worker_args: tuple[str, ...]) -> dict:
    server, endpoint = procs.server(world, *server_args)
    workers = [procs.worker(endpoint, k, world, *worker_args) for k in range(world)]
    procs.wait_ok([*workers, server], timeout=180)
    return load_file(str(procs.tmp / "ckpt" / "final.safetensors"))


def assert_same(got: dict, want: dict, what: str, tol64: float = TOL) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        assert got[k].dtype == want[k].dtype, (what, k)
        tol = TOL32 if want[k].dtype == torch.float32 else tol64
        err = (got[k].double() - want[k].double()).abs().max().item() if got[k].numel() else 0.0
        assert err <= tol, f"{what}: {k}: max |Δ| = {err:.3g} > {tol}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer,shm", [("momentum", "auto"), ("adam", "off")])
def test_frozen_unused_late_used_layers_and_batchnorm_match_ddp(procs, tmp_path, optimizer, shm):
    """A frozen layer never moves and an unused one is never decayed; a layer used only in the
    first two steps (``early``) is left alone by momentum/Adam/weight decay afterwards; one used
    by worker 0 only (``some``) gets DDP's find_unused_parameters average; BatchNorm's running
    statistics are rank 0's, as DDP broadcasts them - the file loads strictly and predicts as
    DDP's model does in eval mode."""
    opt = ("--optimizer", optimizer, "--lr", "0.05", "--weight-decay", "0.1")
    got = run_job(procs, 2, opt, ("--model", "tests.models:branchy64", "--data", "tests.models:branchy_data",
                                  "--shm", shm, *JOB))
    want = replay(models.branchy64, models.branchy_data, 2, batch=20, epochs=1, shuffle=False,
                  loss="cross_entropy", optimizer=optimizer, lr=0.05, weight_decay=0.1)
    assert_same(got, want, "zmqps vs the single-process math")
    ddp = run_ddp(2, 1, tmp_path, model="tests.models:branchy64", data="tests.models:branchy_data", batch=20,
                  loss="cross_entropy", optimizer=optimizer, lr=0.05, weight_decay=0.1, find_unused=True)
    assert_same(got, ddp, "zmqps vs DDP")
    torch.manual_seed(0)
    start = models.branchy64().state_dict()
    for k in ("frozen.weight", "frozen.bias", "unused.weight", "unused.bias"):
        assert torch.equal(got[k], start[k]), f"{k} moved"
    assert (got["early.weight"] - start["early.weight"]).abs().max() > 1e-4  # it did train, in steps 0-1
    assert int(got["bn.num_batches_tracked"]) == 20
    model = models.branchy64()
    model.load_state_dict(got, strict=True)
    twin = models.branchy64()
    twin.load_state_dict(ddp, strict=True)
    x = models.branchy_data().tensors[0][:50]
    model.eval(), twin.eval()
    assert torch.allclose(model(x), twin(x), rtol=0, atol=1e-9)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["tied_lm", "mixed_lm"])
def test_tied_weights_and_mixed_dtypes_survive_and_load_strictly(procs, tmp_path, name):
    """A language model whose head is its embedding: θ holds the tensor once and the file holds it
    under both names, so ``load_state_dict(strict=True)`` works and the tie survives. Checkpoints
    read back the same way (``ps.checkpoint.load_state_dict``). ``mixed_lm``: a float32 layer
    between float64 ones keeps its dtype; the float64 keys downstream of float32 arithmetic can
    only agree to float32 precision (the two sides round the float32 average differently)."""
    factory = getattr(models, name)
    got = run_job(procs, 2, ("--optimizer", "adam", "--lr", "0.02", "--checkpoint-every", "7"),
                  ("--model", f"tests.models:{name}", "--data", "tests.models:lm_data", *JOB))
    want = replay(factory, models.lm_data, 2, batch=20, epochs=1, shuffle=False, loss="cross_entropy",
                  optimizer="adam", lr=0.02)
    tol = TOL if name == "tied_lm" else TOL32
    assert_same(got, want, "zmqps vs the single-process math", tol)
    assert torch.equal(got["embed.weight"], got["head.weight"])
    assert got["embed.weight"].dtype == torch.float64
    assert got["mid.weight"].dtype == (torch.float64 if name == "tied_lm" else torch.float32)
    model = factory()
    model.load_state_dict(got, strict=True)
    assert model.head.weight is model.embed.weight
    newest = checkpoints(procs.tmp / "ckpt")[0]
    model.load_state_dict(load_state_dict(newest), strict=True)  # the last checkpoint is the final step
    assert_same(dict(model.state_dict()), want, "the last checkpoint", tol)


@pytest.mark.timeout(300)
def test_sparse_embedding_gradients_train_as_dense_ones(procs):
    """[Note: sparse gradients]: sent dense; with plain SGD exactly the sparse update of one process."""
    got = run_job(procs, 2, ("--lr", "0.5"), ("--model", "tests.models:sparse_emb", "--data", "tests.models:lm_data",
                                             *JOB))
    want = replay(models.sparse_emb, models.lm_data, 2, batch=20, epochs=1, shuffle=False, loss="cross_entropy",
                  lr=0.5)
    assert_same(got, want, "zmqps vs the single-process math")


@pytest.mark.timeout(300)
def test_clip_grad_norm_clips_the_averaged_gradient_as_ddp_users_do(procs, tmp_path):
    """``--clip-grad-norm`` on the server = ``clip_grad_norm_`` after DDP's allreduce; with buckets
    (the step's key groups are clipped together, [Note: atomic steps])."""
    args = ("--model", "tests.jobs:mlp64", "--data", "tests.jobs:class_data64", "--batch-size", "60",
            "--epochs", "1", "--no-shuffle", "--loss", "cross_entropy", "--bucket-mb", "0.0002")
    got = run_job(procs, 2, ("--lr", "0.3", "--clip-grad-norm", "0.05"), args)
    want = replay(__import__("tests.jobs", fromlist=["mlp64"]).mlp64,
                  __import__("tests.jobs", fromlist=["class_data64"]).class_data64, 2, batch=60, epochs=1,
                  shuffle=False, loss="cross_entropy", lr=0.3, clip=0.05)
    assert_same(got, want, "zmqps vs the single-process math")
    ddp = run_ddp(2, 1, tmp_path, model="tests.jobs:mlp64", data="tests.jobs:class_data64", batch=60,
                  loss="cross_entropy", lr=0.3, clip=0.05)
    assert_same(got, ddp, "zmqps vs DDP")
    unclipped = replay(__import__("tests.jobs", fromlist=["mlp64"]).mlp64,
                       __import__("tests.jobs", fromlist=["class_data64"]).class_data64, 2, batch=60, epochs=1,
                       shuffle=False, loss="cross_entropy", lr=0.3)
    assert max((unclipped[k] - want[k]).abs().max().item() for k in want) > 1e-3  # the clip did bite


def test_server_options_reach_the_loss_functions_used_here() -> None:
    """The loss the jobs above name is the one the reference uses (a guard on the test itself)."""
    from worker.runtime import LOSSES

    assert LOSSES["cross_entropy"] is F.cross_entropy
