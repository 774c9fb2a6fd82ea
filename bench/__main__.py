"""``python -m bench`` from the repository root, with the venv's Python: bench/suite.py, every benchmark
into one bench/results/<date>.md. On a fresh machine use bench/run.sh: it installs what is missing first."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench scripts import each other by name

from suite import main

sys.exit(main())
