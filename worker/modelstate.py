"""A model's state as the server holds it: parameters, buffers and the names of tied tensors.

θ on the server is the model's whole ``state_dict()`` ([Note: buffers in θ] in ``ps.store``):

* every parameter, once, under its first name (``named_parameters()`` drops the repeats of a
  tied tensor), and every *persistent* buffer (BatchNorm's ``running_mean``, ``running_var``,
  ``num_batches_tracked``); a non-persistent buffer is not in ``state_dict()`` and stays local;
* the other names of a tied tensor (a language model's ``lm_head.weight``, which is its
  embedding's weight) as *aliases*: registered, never sent, written beside the tensor in
  ``final.safetensors`` so that ``load_state_dict(..., strict=True)`` works.

Each step a worker pushes, per key, what it has: a parameter's gradient, or nothing when it
has none (frozen, or not reached by this step's loss: the server then leaves it alone, as
torch.optim does); a buffer's value when the step changed it, or nothing. The server keeps
the lowest rank's buffers, as DDP broadcasts rank 0's (``ps.aggregate``).

[Note: sparse gradients] ``nn.Embedding(sparse=True)`` produces sparse gradients; they are
sent dense (the server's optimizers are dense): the same update as a dense embedding's, and
exactly the sparse update for SGD without momentum or weight decay.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from common.errors import ConfigError

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


def dense_grad(p: torch.Tensor) -> torch.Tensor | None:
    """``p.grad`` as a dense, contiguous tensor (None when there is none)."""
    g = p.grad
    if g is None:
        return None
    if g.layout != torch.strided:
        g = g.to_dense()
    return g if g.is_contiguous() else g.contiguous()


class ModelState:
    """The keys of ``module`` the server holds, and how a step's push is made from it.

    Args:
        module: the model (or a pipeline stage's layers; their names are the model's).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params: dict[str, nn.Parameter] = dict(module.named_parameters())
        state = module.state_dict(keep_vars=True)
        named_buffers = dict(module.named_buffers())
        self.buffers: dict[str, torch.Tensor] = {k: b for k, b in named_buffers.items() if k in state}
        canonical = {id(t): k for k, t in (*self.params.items(), *self.buffers.items())}
        self.aliases: dict[str, str] = {}
        for name, t in state.items():
            if name in self.params or name in self.buffers:
                continue
            key = canonical.get(id(t)) if isinstance(t, torch.Tensor) else None
            if key is None:
                raise ConfigError(f"{type(module).__name__}.state_dict() entry {name!r} is neither a parameter nor "
                                  f"a buffer of the model (extra state is not supported)")
            self.aliases[name] = key
        self._loaded: dict[str, torch.Tensor] = {}  # each buffer as θ last gave it

    @property
    def keys(self) -> list[str]:
        """The registered keys: parameters, then buffers."""
        return [*self.params, *self.buffers]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every key's current value on the CPU (the offer of initial θ)."""
        return {k: t.detach().cpu() for k, t in (*self.params.items(), *self.buffers.items())}

    def alias_pairs(self) -> list[list[str]]:
        """The aliases as REGISTER sends them: ``[[alias, key], ...]``."""
        return [[a, k] for a, k in self.aliases.items()]

    def step_tensors(self, names: list[str] | None = None) -> dict[str, torch.Tensor | None]:
        """What a push carries for ``names`` (default: every key): a parameter's gradient (dense)
        or None; a buffer's value if it changed since θ was last loaded, else None."""
        out: dict[str, torch.Tensor | None] = {}
        for name in (self.keys if names is None else names):
            p = self.params.get(name)
            if p is not None:
                out[name] = dense_grad(p)
                continue
            b = self.buffers[name]
            last = self._loaded.get(name)
            out[name] = None if last is not None and torch.equal(b, last) else b.detach()
        return out

    def targets(self) -> dict[str, torch.Tensor]:
        """The tensors θ is loaded into: parameters and buffers, by key."""
        return {**self.params, **self.buffers}

    def loaded(self) -> None:
        """θ was just loaded into the buffers: remember their values, to see what a step changes."""
        self._loaded = {k: b.detach().clone() for k, b in self.buffers.items()}

    def remember(self, theta: Tensors) -> None:
        """θ was handed to the caller, who loads it: its buffers are what the next step starts from."""
        self._loaded = {k: theta[k] for k in self.buffers if k in theta}

    def load(self, theta: Tensors) -> None:
        """Copy θ (by key) into the parameters and buffers, in place."""
        with torch.no_grad():
            for k, t in self.targets().items():
                if k in theta:
                    t.copy_(theta[k])
        self.loaded()

    def full(self, theta: Tensors) -> dict[str, torch.Tensor]:
        """θ with every alias too: a complete ``state_dict`` for ``load_state_dict(strict=True)``."""
        out = dict(theta)
        for alias, key in self.aliases.items():
            if key in out:
                out[alias] = out[key]
        return out

    def sparse_names(self) -> list[str]:
        """Parameters whose gradients will be sparse (sent dense: [Note: sparse gradients])."""
        names = []
        for mname, m in self.module.named_modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
                names += [f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)]
        return [n for n in names if n in self.params]
