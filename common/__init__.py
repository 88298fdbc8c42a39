"""Shared layer of zmqps: wire format, protocol, configuration, errors.

This package imports neither :mod:`ps` nor :mod:`worker`; both of those build on it.
"""

PROTOCOL_VERSION = 1
"""Version carried in every message header; a mismatch is rejected before anything else."""
