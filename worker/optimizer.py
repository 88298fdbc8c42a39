"""``DistributedOptimizer``: a custom training loop gains the parameter server in two lines.

In the spirit of Horovod's ``hvd.DistributedOptimizer``::

    from worker import DistributedOptimizer
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model)

    for x, y in my_shard:                       # the loop is unchanged
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                              # push gradients, load θ back (one round trip)
    opt.finish()                                # optional: also sent at a clean exit

Construction registers the model's parameters with the server and loads the agreed initial
θ into the model (rank 0's values win). ``step()`` pushes every parameter's gradient for
this worker's next step and copies the θ the server sends back into the model, in place.

[Note: who updates θ] The server owns θ and applies *its* optimizer (``ps-server
--optimizer/--lr``) to the averaged gradient; the wrapped optimizer only provides
``zero_grad`` and its settings are not used (a mismatch with the server's is logged). An LR
scheduler on the local optimizer therefore has no effect.

The server holds the model's whole ``state_dict()`` (``worker.modelstate``): a parameter
whose ``grad`` is None at ``step()`` (frozen, or not used this step) is sent as absent and the
server's optimizer leaves it alone, as torch.optim would; buffers (BatchNorm's statistics)
are rank 0's, as under DDP; tied weights stay tied.

[Note: clipping] ``clip_grad_norm_`` called before ``step()`` clips *this worker's* gradient,
before the server averages the K of them. Under DDP the same line clips the *averaged*
gradient (backward has already all-reduced it), so the two differ. For DDP's behaviour, leave
the local clip out and start the server with ``--clip-grad-norm MAX``: it clips the averaged
gradient over the whole model before each update.

The endpoint, rank and world size come from the arguments, else from ``PS_SERVER``,
``PS_RANK`` and ``PS_WORLD_SIZE`` (as ``ps-worker`` reads them); without a rank the server
assigns one at registration (data mode), readable as ``opt.rank``. Every other client option
comes from its ``PS_*`` variable too: ``PS_TIMEOUT``, ``PS_HEARTBEAT``, ``PS_CHUNK_MB``,
``PS_SHM``, ``PS_WIRE_DTYPE``, ``PS_IO_THREADS``, ``PS_WORKER_ID`` and the CURVE keys
(``PS_CURVE_SECRET_KEY``, ``PS_CURVE_SERVER_KEY``). The environment is read in one place,
:func:`config_from_env` (through ``common.config.parse_config``, the one module that reads
it); a caller that passes ``config=`` (a :class:`common.config.WorkerConfig`) has nothing read.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import sys
import weakref
from types import TracebackType
from typing import Any, Callable

import torch
from torch import nn

from common.config import WorkerConfig, parse_config
from worker.client import PSClient

log = logging.getLogger(__name__)

_crashed = False
_hooked = False


def _hook_crashes() -> None:
    """Chain ``sys.excepthook`` once, so the exit handler knows the loop died of an exception."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        global _crashed
        _crashed = True
        previous(kind, value, tb)

    sys.excepthook = excepthook


def config_from_env(server: str | None = None, rank: int | None = None, world_size: int | None = None,
                    timeout: float | None = None) -> WorkerConfig:
    """The wrapper's configuration: the values given, every other option from ``PS_*``.

    Raises:
        ConfigError: no world size (given or ``PS_WORLD_SIZE``), or a bad value.
    """
    given = {"--server": server, "--rank": rank, "--world-size": world_size, "--timeout": timeout}
    argv = [str(x) for flag, value in given.items() if value is not None for x in (flag, value)]
    return parse_config(WorkerConfig, argv, prog="DistributedOptimizer")


class DistributedOptimizer:
    """Wraps ``optimizer`` so that ``step()`` trains ``model`` through the parameter server.

    Args:
        optimizer: the loop's optimizer (used for ``zero_grad``); None to use the model's.
        model: the module whose ``named_parameters()`` the server holds.
        server: the server endpoint (default: ``PS_SERVER``).
        rank: this worker's rank (default: ``PS_RANK``; else the server assigns one, see ``.rank``).
        world_size: the number of workers K (default: ``PS_WORLD_SIZE``).
        timeout: seconds any call may block before it raises ``PSTimeoutError``.
        config: every client option (CURVE included); nothing is then read from the
            environment, and the arguments above, where given, replace its values. Default:
            :func:`config_from_env`.

    Raises:
        ConfigError: no world size, given or in the environment; a CURVE key that cannot be read.
        PSTimeoutError: the server did not answer (e.g. not every worker started) in time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, model: nn.Module, server: str | None = None,
                 rank: int | None = None, world_size: int | None = None, timeout: float | None = None, *,
                 config: WorkerConfig | None = None) -> None:
        if config is None:
            config = config_from_env(server, rank, world_size, timeout)  # the edge: PS_* are read here only
        else:
            given = {"server": server, "rank": rank, "world_size": world_size, "timeout": timeout}
            overrides = {k: v for k, v in given.items() if v is not None}
            config = dataclasses.replace(config, **overrides) if overrides else config
        self.config = config
        self.optimizer = optimizer
        self.model = model
        self.client = PSClient.from_config(config)  # rank None: the server assigns one
        self._finished = False
        try:
            theta = self.client.init(model)
        except BaseException:
            self.client.close()
            raise
        self._load(theta)
        self._check_settings()
        atexit.register(_finish_at_exit, weakref.ref(self))
        _hook_crashes()

    @property
    def rank(self) -> int:
        """This worker's rank (given, or assigned by the server)."""
        assert self.client.rank is not None
        return self.client.rank

    @property
    def next_step(self) -> int:
        """The step the next ``step()`` pushes (non-zero when the server resumed)."""
        return self.client.step

    @property
    def last_loss(self) -> float | None:
        """The server's latest mean loss over all workers (None until a loss was reported)."""
        return self.client.last_loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (through the wrapped optimizer when there is one)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        else:
            self.model.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | torch.Tensor | None = None,
             samples: int | None = None) -> Any:
        """Push this step's gradients and load the θ the server sends back into the model.

        Args:
            closure: like ``torch.optim.Optimizer.step``: re-evaluates and returns the loss.
            loss: this batch's loss, reported to the server's metrics (optional).
            samples: rows in this batch; the server weights the gradient by it (optional).

        Returns:
            What ``closure`` returned, else None.
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if loss is None and result is not None:
                loss = result
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
        theta = self.client.push_pull(self.model, samples=samples, loss=value)
        self._load(theta)
        return result

    def finish(self) -> None:
        """Tell the server this worker is done and close the connection (idempotent)."""
        if self._finished:
            return
        self._finished = True
        try:
            self.client.done()
        finally:
            self.client.close()

    def __enter__(self) -> "DistributedOptimizer":
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.finish()
        else:  # a failed loop is not "done": just close, the server keeps waiting for a restart
            self._finished = True
            self.client.close()

    def __getattr__(self, name: str) -> Any:
        """Everything else (``param_groups``, ``state_dict``...) comes from the wrapped optimizer."""
        inner = self.__dict__.get("optimizer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def _load(self, theta: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(theta)

    def _check_settings(self) -> None:
        info = self.client.server_info
        if self.optimizer is None or "lr" not in info:
            return
        local = self.optimizer.param_groups[0].get("lr")
        if local is not None and float(local) != float(info["lr"]):
            log.warning("the server applies its own optimizer (%s, lr %g); the local %s(lr=%g) only clears "
                        "gradients", info.get("optimizer"), info["lr"], type(self.optimizer).__name__, local)


def _finish_at_exit(ref: "weakref.ReferenceType[DistributedOptimizer]") -> None:
    """At a clean interpreter exit, send DONE for a wrapper the loop did not finish."""
    opt = ref()
    if opt is None or opt._finished:
        return
    if _crashed:
        opt._finished = True
        opt.client.close()
        return
    try:
        opt.finish()
    except Exception as e:  # exiting anyway: report, do not raise from atexit
        log.warning("could not tell the server this worker is done: %s", e)
