"""The output directory belongs to one run at a time, and what it publishes appears whole or not at all.

`OutputDirLock` holds an exclusive `flock` on ``<output dir>/run.lock`` for the run's life. The kernel drops the lock
when the holder dies (even by SIGKILL), so a lock left by a dead process is simply taken over; the file only says
who holds it (pid, host, start time) for the one-line refusal a second run gets.

`publish_dir` writes a folder beside its destination and swaps it into place: with ``renameat2(RENAME_EXCHANGE)``
where the kernel has it (one atomic step), else with two renames whose in-between state `recover_published` repairs
at the next start. A kill at any moment leaves either the previous folder or the new one, complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "run.lock"


class OutputDirBusy(RuntimeError):
    """Another live process holds the output directory."""


class OutputDirLock:
    """An exclusive lock on an output directory, held until `release()` or the end of the process."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None
        self.unsupported: str | None = None  # why the filesystem refused to lock, if it did

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: a planted one would have us truncate the file it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise OutputDirBusy(f"{self.path} is a link, not a lock this project made; delete it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.unsupported = os.strerror(e.errno or 0)  # e.g. a network filesystem without locks
                return self
            raise OutputDirBusy(self._holder_text()) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[OutputDirLock]:
        """Let go of the lock if the block raises (a refused start frees the output dir at once)."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def _holder_text(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
            return f"pid {int(holder['pid'])} on {holder['host']}, since {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its name yet"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # a stale file names nobody; the lock itself goes with the descriptor
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# -----------------------------------------------------------------------------
# Publishing a folder atomically

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # old kernel or a filesystem without exchange: fall back to two renames
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}")


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Inside a staging (.tmp-) or set-aside (.old-) folder this tool made: only such folders are ever deleted.
STAGING_MARK = ".publish-staging"


class NotOurs(FileExistsError):
    """A file, link or folder this tool did not make stands where it would stage or publish."""


def _staging(dest: Path) -> Path:
    return dest.with_name(f".tmp-{dest.name}")


def _previous(dest: Path) -> Path:
    return dest.with_name(f".old-{dest.name}")


def _ours(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / STAGING_MARK).is_file()


def _clear(path: Path, dest: Path) -> None:
    """Remove a staging or set-aside folder of ours; refuse anything else standing there (never deleted, never
    followed)."""
    if _ours(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        raise NotOurs(
            f"{path} stands where {dest.name} is written and was not made by this tool; move it away and run again"
        )


def check_publishable(dest: Path) -> None:
    """Raise NotOurs when `dest` is a link (a write would go where it points) or not a folder."""
    if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
        kind = "a link" if dest.is_symlink() else "not a folder"
        raise NotOurs(f"{dest} is {kind}; this tool writes a folder there: move it away and run again")


def recover_published(dest: Path) -> None:
    """Repair what a kill between the two fallback renames left: the previous folder goes back into place. Staging
    and set-aside folders of ours are removed; anything else of those names is refused (NotOurs)."""
    old, staging = _previous(dest), _staging(dest)
    if _ours(old) and not os.path.lexists(dest):
        os.rename(old, dest)
    if dest.is_dir() and not dest.is_symlink():
        (dest / STAGING_MARK).unlink(missing_ok=True)  # a kill right after a publish
    _clear(old, dest)
    _clear(staging, dest)


@contextlib.contextmanager
def publish_dir(dest: Path) -> Iterator[Path]:
    """Yield a staging folder to write into; on success it replaces `dest` atomically (`dest` untouched on error).

    The staging folder, and the previous `dest` while it is set aside, carry STAGING_MARK, so a later start removes
    them after a kill and nothing else (a user's `.tmp-NAME` or `.old-NAME` is refused, never deleted).
    NotOurs when `dest` is a link or a file, or such a name is taken by something this tool did not make.
    """
    dest = Path(dest)
    check_publishable(dest)
    recover_published(dest)
    staging = _staging(dest)
    staging.mkdir(parents=True)
    (staging / STAGING_MARK).touch()
    try:
        yield staging
        _sync_tree(staging)
        if dest.exists():
            (dest / STAGING_MARK).touch()  # the previous folder, about to be set aside
        if not dest.exists():
            os.rename(staging, dest)
        elif _exchange(staging, dest):
            shutil.rmtree(staging)  # now the previous folder
        else:
            os.rename(dest, _previous(dest))
            os.rename(staging, dest)
            shutil.rmtree(_previous(dest))
        (dest / STAGING_MARK).unlink()  # not part of what is published (a kill before this: removed at next start)
    finally:
        if _ours(staging):
            shutil.rmtree(staging)
