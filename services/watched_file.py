"""A value read from a file (or folder) that operators change under a running process: a Kubernetes Secret mounted
as a volume is swapped in place, a compose secret or a local file is edited.

Read at start, where a file that does not read is an error. Then read again at the first use after its identity
(inode, size, modification time) changed: a changed file that does not read keeps the value already read, logged
once per change, and is read again when it changes again.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("watched_file")
T = TypeVar("T")


class WatchedFile(Generic[T]):
    def __init__(self, path: str | Path, read: Callable[[Path], T], what: str):
        """``read(path)`` makes the value (OSError or ValueError when the file does not do); ``what`` names it in
        the log."""
        self.path, self._read, self.what = Path(path), read, what
        self._stamp = self._current_stamp()
        self._value = read(self.path)

    def _current_stamp(self) -> tuple[int, int, int]:
        stat = os.stat(self.path)  # follows the symbolic links a mounted Secret is made of
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def current(self) -> T:
        """The value read from the file as it is now, or as it last read."""
        try:
            stamp = self._current_stamp()
        except OSError as exc:
            stamp = exc.__class__.__name__
        if stamp == self._stamp:
            return self._value
        self._stamp = stamp
        try:
            self._value = self._read(self.path)
        except (OSError, ValueError) as exc:
            log.error("%s not read again from %s, keeping the ones read before: %s", self.what, self.path, exc)
        return self._value
