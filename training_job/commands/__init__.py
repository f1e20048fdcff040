"""One module per CLI subcommand; each exposes register(subparsers).

Flags are spelled as retrain.py spells them (``--snake_case``); ``add_flag`` also accepts the dashed spelling
earlier versions used, hidden from ``--help``.
"""
from __future__ import annotations

import argparse


def add_flag(parser, flag: str, **kwargs) -> None:
    """Adds ``flag`` (``--snake_case``) and, when it has an underscore, its ``--dashed-form`` as a hidden alias."""
    parser.add_argument(flag, **kwargs)
    dashed = flag.replace("_", "-")
    if dashed != flag:
        dest = flag.lstrip("-")
        alias = {k: v for k, v in kwargs.items() if k in ("type", "action", "choices", "nargs")}
        parser.add_argument(dashed, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias)
