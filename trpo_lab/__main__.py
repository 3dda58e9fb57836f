"""``python -m trpo_lab`` runs the ``trpo-lab`` command line."""

import sys

from trpo_lab.cli import main

sys.exit(main())
