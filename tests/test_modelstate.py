"""What a worker registers and pushes of a model (``worker.modelstate``), without a server."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from tests import models
from worker.modelstate import ModelState


def test_keys_buffers_and_aliases_of_a_tied_model_with_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    state = ModelState(model)
    assert state.keys == ["0.weight", "0.bias", "1.weight", "1.bias", "2.bias",
                          "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert state.aliases == {"2.weight": "0.weight"}
    assert "scratch" not in state.keys  # not in state_dict(): stays local
    theta = state.tensors()
    assert set(state.full(theta)) == set(model.state_dict())


def test_a_step_pushes_gradients_it_has_and_buffers_it_changed() -> None:
    torch.manual_seed(0)
    model = models.branchy64()
    state = ModelState(model)
    state.loaded()
    x = models.branchy_data().tensors[0][100:110]  # no flags: early and some unused
    model(x).sum().backward()
    out = state.step_tensors()
    for k in ("frozen.weight", "early.weight", "some.bias", "unused.weight"):
        assert out[k] is None, k
    assert out["body.weight"] is not None and out["bn.running_mean"] is not None
    assert out["bn.num_batches_tracked"] is not None  # an int64 buffer that changed
    state.loaded()
    assert state.step_tensors(["bn.running_mean", "bn.running_var"]) == {"bn.running_mean": None,
                                                                         "bn.running_var": None}


def test_sparse_gradients_are_made_dense() -> None:
    torch.manual_seed(0)
    model = models.sparse_emb()
    state = ModelState(model)
    assert state.sparse_names() == ["embed.weight"]
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    assert model.embed.weight.grad.is_sparse
    g = state.step_tensors()["embed.weight"]
    assert g is not None and g.layout == torch.strided and torch.equal(g, model.embed.weight.grad.to_dense())


def test_extra_state_is_refused_with_its_name() -> None:
    class WithExtra(nn.Linear):
        def get_extra_state(self) -> dict:
            return {"x": 1}

    with pytest.raises(ConfigError, match="_extra_state"):
        ModelState(nn.Sequential(WithExtra(2, 2)))
