"""An exclusive lock on a checkpoint directory, so two runs never write into one rotation.

The lock is ``fcntl.flock`` on the file ``.detlayers-train.lock`` inside the directory: the
operating system releases it when the holding process ends, however it ends (a crash, ``kill
-9``), so a lock is never left held by a dead process. While holding it, the run writes who it is
into the file (JSON ``{"pid", "host", "started"}``); a second run is refused with an error naming
that holder, and a clean :meth:`DirectoryLock.release` empties the file again.

Finding the file not empty when the lock is free means the previous holder did not release it
(killed or crashed): the new run takes over and prints one warning line naming that holder (and,
on the same host, that its pid is no longer running).

``flock`` is honoured by local file systems and NFSv4; on a shared file system that ignores it
between hosts, two hosts are not kept apart (the holder line still shows who wrote last).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

LOCK_NAME = ".detlayers-train.lock"


class DirectoryInUseError(RuntimeError):
    """Another live process holds the directory's lock; the message names it."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists, owned by someone else
    return True


class DirectoryLock:
    """Holds ``<directory>/.detlayers-train.lock`` from :meth:`acquire` until :meth:`release`."""

    def __init__(self, directory: str, fd: int):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> DirectoryLock:
        """Takes the lock (creating the directory and the file if needed) or raises
        :class:`DirectoryInUseError` naming the holder's pid, host and start time."""
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                raise DirectoryInUseError(
                    f"checkpoint directory {directory} is in use by another run ("
                    + (_describe(holder) if holder else "holder unknown") + f"; lock file {path}): "
                    "wait for it to finish, stop it, or choose another --checkpoint-dir") from None
            previous = _read_holder(fd)
            if previous:
                print(f"warning: {_takeover_note(directory, previous)}", file=sys.stderr, flush=True)
            _write_holder(fd)
        except BaseException:
            os.close(fd)  # closing also drops the flock if it was taken
            raise
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empties the holder record and drops the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a clean end leaves no holder behind
        finally:
            os.close(fd)  # releases the flock


def _takeover_note(directory: str, previous: dict) -> str:
    note = (f"checkpoint directory {directory}: taking over the lock left by "
            f"{_describe(previous)}, which did not release it (killed or crashed)")
    pid = previous.get("pid")
    if previous.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_is_running(pid):
        note += f"; pid {pid} is no longer running"
    return note


def _read_holder(fd: int) -> dict:
    size = os.fstat(fd).st_size
    if size == 0:
        return {}
    try:
        holder = json.loads(os.pread(fd, min(size, 4096), 0).decode())
    except ValueError:  # a damaged record still means "someone left it"
        return {"pid": "?", "host": "?", "started": "? (unreadable lock record)"}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    record = json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    os.fsync(fd)
