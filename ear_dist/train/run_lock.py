"""One writer per ``train.out_dir``: a lock file that the kernel releases when its owner dies.

The first rank of a run takes an exclusive ``flock`` on ``<train.out_dir>/.lock`` and
writes its pid and host into it; a second run into the same directory is refused at once
(exit 2, naming the lock and its owner) instead of failing late on a half-written
checkpoint. A run killed with ``kill -9`` holds no lock any more (``flock`` locks end with
their process), so the next run takes it at once and only logs that the previous owner is
gone. The file stays behind (removing it would let two runs lock two different files).
``flock`` locks hold across processes of one machine, and on network file systems that
forward them (NFS v4, Lustre with ``-o flock``); elsewhere they lock only locally.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from ear_dist.errors import InputError

log = logging.getLogger("ear_dist.train")

LOCK_FILE = ".lock"


class RunLockedError(InputError, RuntimeError):
    """Another run holds ``train.out_dir`` (exit 2)."""


class RunLock:
    """An exclusive, non-blocking lock on ``out_dir`` (``acquire`` / ``release``)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"train.out_dir: {self.out_dir}: cannot write there ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd) or "owner unknown"
            os.close(fd)
            raise RunLockedError(f"train.out_dir: {self.out_dir} is in use by another run ({owner}; lock file "
                                 f"{self.path}); wait for it to end, or choose another train.out_dir") from None
        previous = _read(fd)
        if previous:  # its owner died without releasing (kill -9, a lost node): the kernel released the lock
            log.info("%s: the run that held it (%s) is gone; taking it over", self.path, previous,
                     extra={"shared": True})
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; the file is emptied so that the next owner finds no stale owner in it."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    return ""


@contextlib.contextmanager
def run_lock(out_dir: Path, rt) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the block. Global rank 0 takes it; every rank learns the outcome
    (a broadcast), so all ranks of a refused job stop with the same error instead of waiting on rank 0."""
    lock, error = None, None
    if rt.rank == 0:
        try:
            lock = RunLock(out_dir).acquire()
        except InputError as e:
            error = e
    if rt.distributed:
        import torch.distributed as dist

        message = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            kind, text = message[0]
            error = RunLockedError(text) if kind == RunLockedError.__name__ else InputError(text)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
