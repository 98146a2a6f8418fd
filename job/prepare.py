"""`python -m job.prepare` (and `charlstm prepare`): the prepare stage's command; it lives in job/data/prepare.py."""

from __future__ import annotations

import sys

from job.core.errors import run_cli
from job.data.prepare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
