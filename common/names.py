"""The names a user picks from, one enum per kind, each member with its line of ``--help``.

Four kinds of names choose an implementation: the server's optimizer (``--optimizer``), its
consistency model (``--sync``), the pipeline schedule (``--schedule``) and the loss
(``--loss``). Each kind is declared here once; :mod:`common.config` takes the options'
``choices`` and help from it, and the code that implements a kind registers against it where
it lives, through :func:`implementations`, which checks the two agree when that module is
imported:

* :class:`Optimizer` - ``common/optimizers.py``, ``OPTIMIZERS``
* :class:`SyncModel` - ``ps/consistency.py``, ``MODELS``
* :class:`PipelineSchedule` - ``worker/pipeline/schedule.py``, ``MAKERS``
* :class:`Loss` - ``worker/losses.py``, ``LOSSES``

Members are strings (``SyncModel.BSP == "bsp"``), so a configuration value compares with a
member directly and looks up a registry keyed by plain names.
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping, TypeVar

T = TypeVar("T")


class Choice(str, Enum):
    """A name of one kind, with a one-line description (``Member = "name", "description"``).

    The description is a predicate: ``--help`` prints the name, then it (``bsp waits for ...``).
    """

    description: str

    def __new__(cls, value: str, description: str) -> Choice:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every name of this kind, in declaration order (the options' ``choices``)."""
        return tuple(m.value for m in cls)

    @classmethod
    def describe(cls) -> str:
        """The names with their descriptions, as ``--help`` shows them: ``a does ...; b does ...``."""
        return "; ".join(f"{m.value} {m.description}" for m in cls)


class Optimizer(Choice):
    """``--optimizer``: the torch.optim optimizer the server applies to the averaged gradient."""

    SGD = "sgd", "is torch.optim.SGD, with momentum 0 unless --momentum is given"
    MOMENTUM = "momentum", "is torch.optim.SGD with --momentum, 0.9 unless given"
    ADAM = "adam", "is torch.optim.Adam"
    ADAMW = "adamw", "is torch.optim.AdamW (decoupled weight decay; the usual inner optimizer of diloco)"


class SyncModel(Choice):
    """``--sync``: when a worker gets θ and how a push is applied (ps/consistency.py)."""

    BSP = "bsp", "waits for every worker each step"
    ASYNC = "async", "applies each push on arrival with lr/K"
    SSP = "ssp", "applies each push on arrival but lets a worker run at most --staleness steps ahead"
    DILOCO = "diloco", ("lets each worker take --inner-steps local steps with --optimizer, then averages "
                        "their changes and applies them with Nesterov SGD (--outer-lr, --outer-momentum)")
    DILOCO_ASYNC = "diloco-async", ("is diloco where each worker's change is applied on arrival (delayed "
                                    "Nesterov: momentum moves once per K arrivals); nobody waits")


class PipelineSchedule(Choice):
    """``--schedule``: the order of a pipeline stage's forwards and backwards."""

    GPIPE = "gpipe", "runs all M forwards, then all M backwards, holding M microbatches of activations"
    ONE_F_ONE_B = "1f1b", "alternates one forward and one backward after a warm-up, holding at most P"


class Loss(Choice):
    """``--loss``: the loss the data-parallel worker or the last pipeline stage computes."""

    MSE = "mse", "is the mean squared error, torch.nn.functional.mse_loss"
    CROSS_ENTROPY = "cross_entropy", "is the cross entropy of class logits, torch.nn.functional.cross_entropy"


def implementations(kind: type[Choice], impls: Mapping[str, T], where: str) -> dict[str, T]:
    """``impls`` checked against ``kind``: exactly one implementation per declared name.

    Call it once, at module level, where the implementations live; a mismatch stops the
    import instead of surfacing as a ``KeyError`` when someone picks the name.

    Args:
        kind: the declared names (e.g. :class:`Optimizer`).
        impls: name -> implementation.
        where: the implementing module (its ``__name__``), for the message.

    Returns:
        ``impls`` as a plain dict, in ``kind``'s declaration order.

    Raises:
        ImportError: a declared name has no implementation, or an implementation has no
            declared name.
    """
    declared = kind.names()
    missing = [n for n in declared if n not in impls]
    unknown = [str(n) for n in impls if n not in declared]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{', '.join(missing)} declared in common.names.{kind.__name__} but not implemented")
        if unknown:
            parts.append(f"{', '.join(unknown)} implemented but not declared in common.names.{kind.__name__} "
                         f"(add the name with its description there)")
        raise ImportError(f"{where}: {'; '.join(parts)}")
    return {n: impls[n] for n in declared}
