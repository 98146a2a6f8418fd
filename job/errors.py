"""User-facing errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, missing corpus, wrong bucket...).

    The message must say what is wrong and how to fix it, on one line.
    """


EXIT_USER_ERROR = 2


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI entry point; turn UserError into one line on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
