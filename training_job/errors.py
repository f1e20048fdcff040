"""Errors the training job reports to its user."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLI prints it as one clear message and exits with status 2."""
