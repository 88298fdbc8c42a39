"""``ps-keygen DIR NAME``: write a CURVE certificate pair for a server, a worker or a stage.

``DIR/NAME.key`` is the public half (give it to the peers that must trust NAME: put workers'
``.key`` files in the server's ``--curve-authorized-keys`` directory, and the server's ``.key``
to the workers as ``--curve-server-key``); ``DIR/NAME.key_secret`` holds both halves, mode
0600, and stays with NAME (``--curve-secret-key``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.errors import ConfigError
from common.security import keygen


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-keygen``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="ps-keygen", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("directory", metavar="DIR", help="directory for the certificate files (created)")
    parser.add_argument("name", metavar="NAME", help="certificate name, e.g. server or worker0")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        public, secret = keygen(args.directory, args.name, args.force)
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"ps-keygen: error: {e}\n")
        return 1
    sys.stdout.write(f"{public}\n{secret}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
