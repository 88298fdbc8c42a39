"""zmqps workers: the client API (:class:`PSClient`), the optimizer wrapper, the runtime, the launcher."""

from worker.client import PSClient
from worker.optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer", "PSClient"]
