"""Atomic file writes: a reader sees either the old file or the complete new one, never half."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, List, Union

from segmentation.errors import RunError
from segmentation.faults import fault_point

TEMP_SUFFIX = ".tmp"


class WriteError(RunError, OSError):
    """A file could not be written (disk full, quota, I/O error); the previous file is kept."""


def atomic_write(path: Union[str, os.PathLike], write: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, sync it, then rename it to ``path``.

    The folder is created if needed and its entry is synced after the rename. The file gets the
    permissions of any new file (0666 less the umask; e.g. group-readable on a shared cluster).
    A failed write leaves ``path`` as it was and no temporary file behind, and raises
    ``WriteError`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp creates it private (0600)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(handle, mode) as tmp_file:
            write(tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp_name, path)
    except BaseException as error:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        os_error = _os_error_in(error)
        if os_error is not None and not isinstance(error, WriteError):
            raise _write_error(path, os_error) from error
        raise
    _fsync_dir(path.parent)


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, and another thread
    creating a file meanwhile would get the wrong permissions)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_error_in(error: BaseException) -> "OSError | None":
    """The OSError behind ``error`` (torch.save reports a failed write as a RuntimeError whose
    context is the OSError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    wrapped = WriteError(
        f"cannot write {path}: {reason}; the previous version of the file (if any) is kept and no "
        "partial file was left. Free space in (or fix) that folder and rerun the same command"
    )
    wrapped.errno = error.errno
    return wrapped


def remove_stale_temporaries(folder: Union[str, os.PathLike]) -> List[Path]:
    """Delete the temporary files that ``atomic_write`` left in ``folder`` when it was killed.

    Call it only while no other process writes to ``folder`` (under the run lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [entry for entry in folder.iterdir()
             if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file()]
    for entry in stale:
        entry.unlink()
    return stale


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (not possible on Windows, where it is skipped)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
