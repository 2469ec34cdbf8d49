"""``python -m host.cli``: the same as the ``torpor`` command."""

import sys

from host.cli.app import main

sys.exit(main())
