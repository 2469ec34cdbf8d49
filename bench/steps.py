"""`torpor bench steps` as a script: `python bench/steps.py [--quick] [--json] ...` (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(["steps", *sys.argv[1:]]))
