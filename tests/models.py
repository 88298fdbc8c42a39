"""Models as real users write them, for the correctness tests (importable as ``tests.models:NAME``).

* :func:`branchy64` - BatchNorm (running stats and an int64 counter), a frozen layer, a layer
  no step uses, one used in the first two steps only (``early``), and one that only worker 0
  uses, in two steps (``some``). Which branch runs is decided by flag columns of the data
  (:func:`branchy_data`), so each worker's use follows from its rows.
* :func:`tied_lm` - a tiny language model whose output layer is its embedding (tied weights);
  :func:`mixed_lm` the same with a float32 layer between float64 ones (mixed dtypes).
* :func:`sparse_emb` - ``nn.Embedding(sparse=True)``.
* :func:`bn_pipe` - an ``nn.Sequential`` with BatchNorm, for pipeline stages.
* :func:`charlm_short` - the head of the charlm example's training windows, for a short job.

The data sets are laid out for K = 2 workers, a global batch of 20 (10 rows each), no shuffle.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROWS = 400  # two shards of 200 rows: 20 steps of 10 rows per worker per epoch
VOCAB, CONTEXT = 11, 4


class Branchy(nn.Module):
    """Frozen, unused, early-used and partly-used layers around a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.early = nn.Linear(8, 8)
        self.some = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.body(x[:, :10])))
        h = h + torch.tanh(self.frozen(h))
        if bool((x[:, 10] > 0).any()):
            h = h + torch.tanh(self.early(h))
        if bool((x[:, 11] > 0).any()):
            h = h + torch.tanh(self.some(h))
        return self.head(h)


def branchy64() -> nn.Module:
    """:class:`Branchy` in float64."""
    return Branchy().double()


def branchy_data() -> TensorDataset:
    """400 rows: 10 features, flag ``early`` on each shard's first 20 rows (steps 0-1 of both
    workers), flag ``some`` on rows 50-69 (steps 5-6 of worker 0 only); 3 classes."""
    x = torch.randn(ROWS, 12, dtype=torch.float64)
    x[:, 10:] = 0.0
    for lo in (0, ROWS // 2):
        x[lo:lo + 20, 10] = 1.0
    x[50:70, 11] = 1.0
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


class TiedLM(nn.Module):
    """Embedding → mean over the context → a middle layer → logits through the embedding."""

    def __init__(self, mid: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8).double()
        self.mid = nn.Linear(8, 8).to(mid)
        self.head = nn.Linear(8, VOCAB, bias=False).double()
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        h = torch.tanh(self.mid(h.to(self.mid.weight.dtype))).double()
        return self.head(h)


def tied_lm() -> nn.Module:
    """:class:`TiedLM` in float64."""
    return TiedLM()


def mixed_lm() -> nn.Module:
    """:class:`TiedLM` with a float32 middle layer between float64 ones (mixed dtypes)."""
    return TiedLM(torch.float32)


def lm_data() -> TensorDataset:
    """400 contexts of 4 tokens; the target is the next token of a fixed rule."""
    x = torch.randint(0, VOCAB, (ROWS, CONTEXT))
    y = (x.sum(dim=1) * 3 + 1) % VOCAB
    return TensorDataset(x, y)


class SparseEmb(nn.Module):
    """An embedding with sparse gradients, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6, sparse=True)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


def sparse_emb() -> nn.Module:
    """:class:`SparseEmb` in float64."""
    return SparseEmb().double()


def bn_pipe() -> nn.Sequential:
    """Four layers with a BatchNorm, float64: two stages ``0:2,2:4``."""
    return nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()


def pipe_data() -> TensorDataset:
    """240 float64 rows (batches of 60 split evenly over 1 or 2 replicas and 2 microbatches)."""
    return TensorDataset(torch.randn(240, 10, dtype=torch.float64), torch.randn(240, 1, dtype=torch.float64))


def charlm_short() -> TensorDataset:
    """The first 3,200 training windows of ``--example charlm``: 100 steps of batch 32, for a short job."""
    from worker.examples import charlm

    x, y = charlm.train_data().tensors
    return TensorDataset(x[:3200], y[:3200])
