"""One writer per run folder: a lock file that the operating system releases when its holder dies.

``<run folder>/.lock`` is locked with ``flock``; the kernel drops the lock when the process ends,
however it ends, so a crashed or killed run never leaves it stuck. The file records who holds
it (host, pid, start time) for the error message of a second launch. It is deleted on release;
an acquirer that locked a file deleted in the meantime tries again on the new one.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional, Union

from segmentation.errors import RunError

LOCK_NAME = ".lock"


class RunLockedError(RunError, RuntimeError):
    """Another process is running with the same run folder."""

    raised_on_every_rank = True  # rank 0 holds the lock and tells the others


class RunLock:
    """The exclusive lock of one run folder (``acquire`` / ``release``, or a ``with`` block)."""

    def __init__(self, folder: Union[str, os.PathLike]) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise ``RunLockedError`` naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise RunLockedError(
                    f"another run is writing to {self.path.parent} ({holder}); two runs with the same "
                    "--name and folders would overwrite each other's checkpoints. Wait for it to end "
                    "(or stop it), or choose another --name"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder released and deleted this file meanwhile: lock the new one
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
