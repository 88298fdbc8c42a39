"""``python -m worker`` runs ``ps-worker``."""

import sys

from worker.cli import main

sys.exit(main())
