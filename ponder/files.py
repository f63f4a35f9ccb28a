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
    os.close(fd)
    return Path(name)


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it is there; never raises (a read-only mount refuses even to unlink a missing file)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
