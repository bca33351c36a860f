"""``python -m agent``: same as the ``sentinel-agent`` console script."""

import sys

from agent.cli import main

sys.exit(main())
