"""`python -m training_job <command>`: one CLI for the batch job.

Each command lives in its own module that exposes ``register(subparsers)``; the parser it adds sets ``func``,
which takes the parsed arguments and returns an exit code. A ``UserError`` becomes a clear message, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from training_job.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# In the order `run` performs them.
COMMAND_MODULES = [
    "training_job.commands.weights",
    "training_job.commands.gather",
    "training_job.commands.collect",
    "training_job.commands.prepare",
    "training_job.commands.train",
    "training_job.commands.evaluate",
    "training_job.commands.publish",
    "training_job.commands.publish_int8",
    "training_job.commands.sweep",
    "training_job.commands.run",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training_job",
        description="Mushroom photo classifier training job: gather -> prepare -> train -> evaluate -> publish.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def print_any_file_name() -> None:
    """Let stdout print a photo path whose bytes are not UTF-8 (Python holds them as surrogate escapes): a UTF-8
    terminal's stdout is strict and would raise; such bytes are printed as \\udcXX escapes instead."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    from training_job.base_weights import WeightsUnavailable

    print_any_file_name()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, WeightsUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
