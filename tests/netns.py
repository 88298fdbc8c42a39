"""Several hosts on one machine for the multi-host tests: network namespaces joined by a bridge.

The lab itself is :mod:`benchmarks.netlab` (the throttled-link benchmarks use it too, with
rate limits); the tests use it without limits. :meth:`Lab.link` takes a host's cable out and
puts it back, for partition tests. Use :func:`netns_available` to skip where namespaces
cannot be made.
"""

from __future__ import annotations

from benchmarks.netlab import Lab, cleanup_stale, netns_available

__all__ = ["Lab", "cleanup_stale", "netns_available"]
