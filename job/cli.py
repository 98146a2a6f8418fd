"""`charlstm train|prepare|evaluate|generate ARGS`: the same commands as `python -m job.<command> ARGS`."""

from __future__ import annotations

import importlib
import sys

from job.core.errors import EXIT_USER_ERROR, run_cli

COMMANDS = {
    "train": ("job.train", "train a model (a Ray Train job, or --in-process)"),
    "prepare": ("job.prepare", "prepare a corpus into a dataset ahead of training"),
    "evaluate": ("job.evaluate", "held-out loss of a trained model"),
    "generate": ("job.generate", "generate text with a trained model (a batch job)"),
}


def usage() -> str:
    lines = ["usage: charlstm COMMAND [ARGS ...]   (COMMAND --help lists its flags)", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)} (charlstm --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    # Imported by name, only the one asked for: `prepare` never pays for TensorFlow, and child processes find
    # what a module defines under its own name.
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_cli(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
