"""How to add an optional extra (``examples``, ``plot``) to the zmqps that is running.

[Note: editable installs] ``make setup`` installs zmqps from its checkout in editable mode
(``pip install -e '.[dev]'``; the dev extra includes ``examples`` and ``plot``). A plain
``pip install '.[examples]'`` run there afterwards would replace that editable install with a
copy, and edits to the checkout would silently stop taking effect. Messages that name a
missing extra therefore give the command that fits the installation they run in.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse


def editable_checkout() -> Path | None:
    """The source checkout zmqps is installed from in editable mode, or None."""
    try:
        raw = metadata.distribution("zmqps").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        raw = None
    if raw:
        try:
            info = json.loads(raw)
        except ValueError:
            info = {}
        url = info.get("url", "")
        if info.get("dir_info", {}).get("editable") and url.startswith("file://"):
            return Path(unquote(urlparse(url).path))
    here = Path(__file__).resolve().parent.parent  # running from a checkout without an install
    if (here / "pyproject.toml").is_file() and (here / "Makefile").is_file():
        return here
    return None


def install_hint(extra: str) -> str:
    """The command that adds ``zmqps[extra]`` to this installation without replacing it."""
    checkout = editable_checkout()
    if checkout is None:
        return f"pip install 'zmqps[{extra}]'"
    return (f"make setup in {checkout} installs it; or {sys.executable} -m pip install -e '{checkout}[{extra}]' "
            f"(keep -e: without it pip replaces the editable install)")
