"""Files that several processes may write at once (the caches under ``cache_root()``: kernel routes, the q4
kernel-ready weights, GGUF conversions): each writer works in a temporary file of its own, then publishes it
whole with one rename or link, so a reader sees a file whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A new empty file in ``path``'s directory whose name no other writer uses (not even a process of the same
    id in another container sharing the directory, which a name made of the process id would not ensure)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a cache's other users
    finally:
        os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: set it back at once
    os.umask(mask)
    return mask


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it is there; never raises (a read-only mount refuses even to unlink a missing file)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
