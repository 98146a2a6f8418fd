"""`python -m job.evaluate` (and `charlstm evaluate`): held-out loss of an exported model; the command and the
scoring live in job/model/scoring.py."""

from __future__ import annotations

import sys

from job.core.errors import run_cli
from job.model.scoring import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
