"""Atomic file writes: a reader sees either the old file or the complete new one, never half."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union


def atomic_write(path: Union[str, os.PathLike], write: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, sync it, then rename it to ``path``.

    The folder is created if needed and its entry is synced after the rename. A failed write
    leaves ``path`` as it was and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as tmp_file:
            write(tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (not possible on Windows, where it is skipped)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
