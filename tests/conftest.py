"""Shared fixtures: real processes that are always stopped, and a fresh ZeroMQ context."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import zmq

from tests.forkserver import ForkServer
from tests.procs import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Start servers and workers as real processes; all of them are stopped afterwards."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A private ZeroMQ context, terminated (sockets closed with linger 0) after the test."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture(scope="session")
def forkserver() -> Iterator[ForkServer]:
    """A fork server with torch and zmqps preloaded: real child processes that start in milliseconds."""
    fs = ForkServer()
    try:
        yield fs
    finally:
        fs.close()
