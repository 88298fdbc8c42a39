"""θ's first values, offered by the workers at INIT: only the tensors that will be used are kept.

Every worker builds its model and offers its parameters at INIT; θ takes each key from the
lowest rank that offered it, so the choice does not depend on arrival order. The server used
to keep every offer until all K workers had registered, K × |θ| of memory at the start of a
job (64 GiB for 64 workers of a 1 GiB model). Now an offer's tensor is kept only while no
lower rank has offered the same key, and a lower rank's offer replaces what a higher one left:
at most one tensor per key is held, |θ| in all, plus the message being handled.

A rank that offered and then left before θ was formed still counts: its offer is as good a
starting point as any, and waiting for a higher rank's offer that was already dropped would
never end.
"""

from __future__ import annotations

from typing import Mapping

import torch


class Offers:
    """The lowest-ranked offer of each key received so far."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, torch.Tensor]] = {}

    def add(self, rank: int, tensors: Mapping[str, torch.Tensor]) -> int:
        """Keep the tensors no lower rank has offered (a rank's repeated offer replaces its own).

        Returns how many of ``tensors`` were kept.
        """
        kept = 0
        for k, t in tensors.items():
            held = self._held.get(k)
            if held is None or rank <= held[0]:
                self._held[k] = (rank, t)
                kept += 1
        return kept

    def complete(self, owner: Mapping[str, int]) -> bool:
        """Whether every key has an offer from its owner (the lowest rank registered for it) or lower."""
        return all(k in self._held and self._held[k][0] <= r for k, r in owner.items())

    def take(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The offered tensors of ``keys``; then forget every offer (θ is formed once)."""
        out = {k: self._held[k][1] for k in keys}
        self._held.clear()
        return out

    def ranks(self) -> list[int]:
        """The ranks whose tensors are held, ascending."""
        return sorted({r for r, _ in self._held.values()})

    def __len__(self) -> int:
        return len(self._held)
