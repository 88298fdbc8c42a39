"""A character-level language model on the Python standard library's own source (no download).

The corpus is built from text every machine with Python has: the top-level ``*.py`` files of
the standard library directory (``sysconfig.get_paths()["stdlib"]``; subpackages and
``site-packages`` are left out, since distributions split some of them into other packages),
read as bytes in sorted file-name order, concatenated and cut at :data:`CORPUS_BYTES`. Bytes are
the vocabulary (256 classes). The last :data:`HELDOUT_FRACTION` of the corpus is held out.

[Note: one corpus] Every worker must build the same corpus. It is the same on machines with
the same Python release (3.11.7 here: 168 files, of which the first 77, ``__future__.py`` to
``linecache.py``, and part of ``locale.py`` make the 2 MiB; the held-out 5 % starts near the end
of ``inspect.py``); another patch release or distribution may edit a file and so change the bytes.
:func:`corpus_digest` names the bytes (``665e740229cee282`` for 3.11.7); compare it across the
hosts of a job that spans several. Building it takes about 0.1 s; it is cached per process.

Samples are non-overlapping windows of :data:`SEQ_LEN` bytes; the target of each position is
the next byte, so a row is (x of ``SEQ_LEN`` byte values, y of the ``SEQ_LEN`` next ones). The
model returns logits as ``[N, 256, SEQ_LEN]`` (classes second), which is what
``torch.nn.functional.cross_entropy`` takes for sequences: ``--loss cross_entropy`` is the mean
per-character loss in nats (ln 256 = 5.55 for a uniform guess; bits per character = nats / ln 2).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.errors import ConfigError

CORPUS_BYTES = 2 << 20
"""Bytes of source text in the corpus (2 MiB)."""
HELDOUT_FRACTION = 0.05
"""The last 5 % of the corpus is held out (1,638 rows: all of them fit the default ``--eval-rows``)."""
SEQ_LEN = 64
"""Characters per sample."""
VOCAB = 256
"""One class per byte value."""
EVAL_BATCH = 256
"""Rows per forward pass in :func:`heldout_loss`."""

PRESETS: dict[str, Any] = {
    "model": "worker.examples.charlm:model",
    "data": "worker.examples.charlm:train_data",
    "loss": "cross_entropy",
    "optimizer": "adam",
    "lr": 0.003,
    "epochs": 1,
    "batch_size": 32,
    "eval_data": "worker.examples.charlm:test_data",
    "eval_every": 100,
}
"""Option values ``ps-launch --example charlm`` runs with (anything given explicitly wins)."""


def _sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: p.name)


@functools.cache
def corpus() -> bytes:
    """The corpus: the first :data:`CORPUS_BYTES` of the stdlib's top-level sources, in name order.

    Raises:
        ConfigError: the standard library holds less source than that.
    """
    parts: list[bytes] = []
    size = 0
    for path in _sources():
        if size >= CORPUS_BYTES:
            break
        parts.append(path.read_bytes())
        size += len(parts[-1])
    if size < CORPUS_BYTES:
        raise ConfigError(f"the charlm example needs {CORPUS_BYTES} bytes of Python source; the standard library "
                          f"at {sysconfig.get_paths()['stdlib']} has {size}")
    return b"".join(parts)[:CORPUS_BYTES]


def corpus_digest() -> str:
    """The first 16 hex digits of the corpus's SHA-256: equal on two hosts iff they train on the same text."""
    return hashlib.sha256(corpus()).hexdigest()[:16]


@functools.cache
def _split() -> tuple[TensorDataset, TensorDataset]:
    data = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).long()
    cut = len(data) - int(len(data) * HELDOUT_FRACTION)
    return _windows(data[:cut]), _windows(data[cut:])


def _windows(text: torch.Tensor) -> TensorDataset:
    """Non-overlapping windows of ``text``: x = bytes [i, i+T), y = bytes [i+1, i+T+1)."""
    n = (len(text) - 1) // SEQ_LEN
    x = text[:n * SEQ_LEN].view(n, SEQ_LEN)
    y = text[1:n * SEQ_LEN + 1].view(n, SEQ_LEN)
    return TensorDataset(x.clone(), y.clone())


class CharGRU(nn.Module):
    """Byte embedding (64) → one GRU layer (256) → logits over the 256 byte values."""

    def __init__(self, embed: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, VOCAB, T]`` of the next byte at each of the T positions of ``x`` (``[N, T]``)."""
        out, _ = self.rnn(self.embed(x))
        return self.head(out).transpose(1, 2)


def model() -> nn.Module:
    """The 329,472-parameter byte-level GRU language model; sets this process to one CPU thread.

    [Note: one thread] A GRU runs 64 small steps per batch, each a handful of small kernels; with
    torch's default of one intra-op thread per core, K workers and the server on the same cores
    spin against each other: on the 2-core machine a step took 1.3 s with 2 threads and 54 ms
    with 1 while other jobs ran. One thread per worker is also what ``ps-launch`` needs on any
    machine with fewer cores than workers x threads.
    """
    torch.set_num_threads(1)
    return CharGRU()


def train_data() -> TensorDataset:
    """The training windows: the first 95 % of the corpus (31,129 rows of 64 bytes)."""
    return _split()[0]


def test_data() -> TensorDataset:
    """The held-out windows: the last 5 % of the corpus (1,638 rows), disjoint from the training text."""
    return _split()[1]


def heldout_loss(theta: Mapping[str, torch.Tensor], data: TensorDataset | None = None) -> float:
    """Mean cross entropy per character (nats) of θ on ``data`` (default: every held-out row)."""
    net = model()
    net.load_state_dict(dict(theta))
    net.eval()
    x, y = (data or test_data()).tensors
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            xb, yb = x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]
            total += float(nn.functional.cross_entropy(net(xb), yb)) * len(xb)
    return total / len(x)


def evaluate(theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Held-out loss of the final θ (nats per character) and the same in bits per character."""
    loss = heldout_loss(theta)
    return {"heldout_loss": loss, "bits_per_char": loss / math.log(2)}
