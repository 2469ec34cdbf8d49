"""`torpor bench coldstart` as a script: `python bench/coldstart.py [--quick] [--json] ...` (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(["coldstart", *sys.argv[1:]]))
