"""zmqps workers: the client API (:class:`PSClient`), the data-parallel runtime, the launcher."""

from worker.client import PSClient

__all__ = ["PSClient"]
