"""The entry points' garbage-collector policy ([Note: frozen start-up] in common/gcpolicy.py)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import gc, json, sys
from common.gcpolicy import frozen_startup
gc.enable()
seen = {}
with frozen_startup():
    seen["inside"] = gc.isenabled()
    import torch  # the objects start-up makes
after_on = gc.isenabled()
frozen = gc.get_freeze_count()
gc.disable()
try:
    with frozen_startup():
        raise RuntimeError("boom")
except RuntimeError:
    pass
print(json.dumps({"inside": seen["inside"], "after_on": after_on, "frozen": frozen,
                  "stays_off": not gc.isenabled()}))
"""


def test_collector_paused_inside_frozen_after_and_state_restored():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    r = json.loads(out.stdout)
    assert r["inside"] is False  # paused while importing
    assert r["after_on"] is True  # re-enabled afterwards
    assert r["frozen"] > 100_000  # torch's objects are in the permanent generation
    assert r["stays_off"] is True  # a collector that was off stays off, even when the block raises
