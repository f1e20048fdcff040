#!/usr/bin/env python
"""The local stack: `up` (train if needed, start everything, print the demo report), `down`, `status`.
See devstack/ for the code the tests share."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
