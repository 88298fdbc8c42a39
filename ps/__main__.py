"""``python -m ps`` runs ``ps-server``."""

import sys

from ps.cli import main

sys.exit(main())
