"""An exclusive lock on a path that dies with its holder (SIGKILL included).

The lock is ``fcntl.flock`` on a lock file: the kernel drops it when the holding
process dies however it dies, so a lock left by a killed run is simply free again
(no pid guessing). The file also holds ``pid``, ``host`` and ``since`` of the holder,
for the message that refuses a second taker. Where ``flock`` is not supported
(``ENOLCK``/``EOPNOTSUPP`` on some network file systems) it falls back to creating
the file with ``O_EXCL``; such a lock survives its holder, so it is taken over only
when it names a dead pid on this host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockHeld(Exception):
    """The lock is held by another live process; ``holder`` is its record (may be empty)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe(holder)}")


def describe(holder: dict) -> str:
    """``pid 123 on host h since 2026-01-01 12:00:00 UTC`` (what is known of it)."""
    if not holder:
        return "another process (it has not written its pid yet)"
    since = holder.get("since")
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
            if isinstance(since, (int, float)) else "an unknown time")
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # exists (another user's) or unreadable: assume alive
    return True


def _flock_works(directory: Path) -> bool:
    """Whether the file system of ``directory`` supports ``flock`` (probed on the directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)
    return True


class FileLock:
    """``with FileLock(path) as lock:`` holds ``path`` exclusively or raises :class:`LockHeld`.

    ``lock.previous`` is the record a dead earlier holder left in the file ({} if none).
    The lock file is removed on release.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.fd: int | None = None
        self.previous: dict = {}
        self.flock = True

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        if not _flock_works(self.path.parent):
            return self._acquire_excl(me)
        for _ in range(100):  # retried only when the file is replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockHeld(self.path, self._holder()) from None
            except BaseException:
                os.close(fd)
                raise
            # A releasing holder unlinks the file while it still holds it: if ours is
            # no longer the file at this path, lock the new one instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self.previous = _read(self.path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except BaseException:  # e.g. a full disk: do not keep the lock
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise LockHeld(self.path, self._holder())

    def _holder(self) -> dict:
        for _ in range(20):  # the holder writes its record just after taking the lock
            if holder := _read(self.path):
                return holder
            time.sleep(0.05)
        return {}

    def _acquire_excl(self, me: dict):
        self.flock = False
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.previous = holder  # its holder is dead: take it over
                    self.path.unlink(missing_ok=True)
                    continue
                raise LockHeld(self.path, holder) from None
            os.write(fd, json.dumps(me).encode())
            self.fd = fd
            return self
        raise LockHeld(self.path, _read(self.path))

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held (see acquire)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
