"""Print the options table of README.md from common/config.py (run: python docs/gen_options.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import OPTIONS, LaunchConfig, ServerConfig, WorkerConfig, default_text  # noqa: E402

ROLES = {"server": ServerConfig, "worker": WorkerConfig, "launch": LaunchConfig}


def table() -> str:
    """The markdown table: option, variable, roles, default, meaning."""
    rows = ["| option | variable | used by | default | meaning |", "|---|---|---|---|---|"]
    for name, opt in OPTIONS.items():
        users, defaults = [], []
        for role, cls in ROLES.items():
            for f in dataclasses.fields(cls):
                if f.name == name:
                    users.append(role)
                    d = default_text(cls, name)
                    if d not in defaults:
                        defaults.append(d)
        choices = f" ({', '.join(opt.choices)})" if opt.choices and opt.names is None else ""  # names: in opt.text
        rows.append(f"| `{opt.flag}` | `{opt.env}` | {', '.join(users)} | {' / '.join(defaults)} | "
                    f"{opt.text}{choices} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
