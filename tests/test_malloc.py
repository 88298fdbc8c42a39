"""The entry points' allocator policy ([Note: kept heap] in common/malloc.py), in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

SCRIPT = r"""
import json, resource, sys
from common.malloc import keep_freed_memory, release_free_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # 64 MiB allocated, written and freed, as a training step does with its gradients
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    del t
for _ in range(10):  # the heap settles (it grows a few times first)
    step()
f0 = faults()
for _ in range(5):
    step()
print(json.dumps({"kept": kept, "faults_per_alloc": (faults() - f0) / 5, "trim": release_free_memory()}))
"""


def _run(mode: str, env: dict[str, str] | None = None) -> dict:
    e = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         check=True, env=e)
    return json.loads(out.stdout)


def test_kept_heap_reuses_freed_blocks_without_page_faults():
    default = _run("default")
    kept = _run("keep")
    assert kept["kept"] is True
    # 64 MiB is 16,384 pages: by default every allocation maps and faults them in again
    assert default["faults_per_alloc"] > 10_000
    assert kept["faults_per_alloc"] < 500
    assert kept["trim"] in (True, False)  # callable after tuning (the server trims after INIT)


def test_users_own_allocator_settings_win():
    r = _run("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert r["kept"] is False
