"""One live writer per run directory: an advisory lock on ``WORKDIR/.lock``.

``fcntl.flock`` (exclusive, non-blocking) on an open file: the kernel drops the
lock when the process ends however it ends (exit, exception, SIGKILL, OOM
kill), so a crashed run never leaves the directory locked; there is no stale
lock to clean up and no PID guessing. The lock file itself stays and records
the last holder (host, pid, start time), which the refusal message quotes.

Multi-process runs: only process 0 takes the lock -- the other processes of
the same run write into the same directory legitimately. A second *run*
(another process 0) is refused.

File systems: flock works on local disks and on NFSv4 (emulated with POSIX
locks by the Linux client). On a file system that does not implement it
(e.g. Lustre mounted without ``-o flock``) the lock cannot be taken; the run
then goes on with a warning rather than refusing to train at all.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import warnings
from pathlib import Path

from fcn_jax.errors import FcnError

LOCK_NAME = ".lock"


class RunLockedError(FcnError, RuntimeError):
    """Another live process is training in this run directory."""


class RunLock:
    """Context manager holding the exclusive lock of ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.path = Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if not self.enabled or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"{self.path.parent} is in use by another training process ({holder}); two runs writing one "
                    "directory would overwrite each other's checkpoints. Wait for it to finish or stop it, or "
                    "choose another --workdir. (The lock is released automatically when that process ends, "
                    "even if it crashes.)"
                ) from None
            warnings.warn(f"{self.path}: cannot lock the run directory on this file system ({e}); "
                          "make sure no other run uses it", RuntimeWarning, stacklevel=2)
            return self
        # we hold it: record who we are (for the next one's message)
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
