"""Output-folder locks: one writer per folder for the length of a run.

Every writer of a folder (the commands ``train``, ``analyze``, ``reproduce``, ``compare``,
:func:`hesslens.training.train`, a :class:`~hesslens.CurvatureTracker` with ``out=``) holds the
folder's lock, the file ``.hesslens.lock`` in it, while it writes there. A second writer gets
:class:`~hesslens.errors.OutputLockedError` at once, naming the folder, the holder (what, pid,
host, since when) and the fix, instead of the two overwriting each other's files.

How: the lock's content (JSON: ``what``, ``pid``, ``host``, ``started``) is written to a private
temporary file that holds an OS lock (``fcntl.flock``), which is then linked into place with
``os.link``; that fails if the name exists, like ``O_CREAT | O_EXCL``, so taking the lock is
atomic and the file is never seen empty or unlocked. The OS lock goes with its process: a holder
killed with SIGKILL leaves the file, but with its lock free, and the next writer recognises it as
stale and takes it over with a :class:`~hesslens.errors.StaleLockWarning`. On file systems
without ``flock``, a lock whose holder ran on this host under a pid that is gone is stale.

A lock that created its folder removes it again when the block fails and left the folder empty:
a run that fails its checks leaves nothing behind.

Example:
    >>> import os, tempfile
    >>> from hesslens.errors import OutputLockedError
    >>> folder = os.path.join(tempfile.mkdtemp(), "run")
    >>> with output_lock(folder, what="demo") as lock:
    ...     try:
    ...         output_lock(folder, what="a second writer")
    ...     except OutputLockedError as err:
    ...         print(str(err)[str(err).index("is in use"):][:46])
    ...     os.listdir(folder)
    is in use by this process: demo holds its lock
    ['.hesslens.lock']
    >>> lock.held, os.listdir(folder)
    (False, [])
    >>> lock = output_lock(folder, what="a tracker")   # held until release()
    >>> lock.release()
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import tempfile
import time
import warnings
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any

from hesslens.errors import HesslensInputError, OutputLockedError, StaleLockWarning
from hesslens.files import _TOKEN

try:
    import fcntl
except ImportError:  # no flock here (Windows): a lock is then never taken over by itself
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "OutputLock", "output_lock", "read_lock"]

#: The lock file's name in a locked folder.
LOCK_NAME = ".hesslens.lock"

PathLike = str | os.PathLike[str]


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: cannot tell, assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's), or cannot tell
    return True


def read_lock(folder: PathLike) -> dict[str, Any] | None:
    """What the lock file of ``folder`` says (``what``, ``pid``, ``host``, ``started``), or
    ``None`` when the folder has no lock file (whether its holder still runs is not checked).

    >>> import tempfile
    >>> read_lock(tempfile.mkdtemp()) is None
    True
    """
    try:
        text = (Path(folder) / LOCK_NAME).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _holder(info: dict[str, Any]) -> str:
    what = info.get("what") or "another writer"
    pid = info.get("pid", "?")
    host = info.get("host") or "an unknown host"
    since = f", since {info['started']}" if info.get("started") else ""
    return f"{what} (pid {pid} on {host}{since})"


def _release(fd: int, path: str, owner: int) -> None:
    """Remove the lock file (if it is still ours) and drop the OS lock; in a forked child that
    inherited the descriptor, only close it."""
    try:
        if os.getpid() == owner:
            with contextlib.suppress(OSError):
                st, mine = os.stat(path), os.fstat(fd)
                if (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(path)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


class OutputLock:
    """The lock of one output folder (see the module's notes). ``acquire()`` takes it or raises
    :class:`~hesslens.errors.OutputLockedError`; ``release()`` gives it back (also at exit of
    the process or when the object is collected). As a context manager it is held for the
    block.

    Args:
        folder: the folder to lock, created (with its parents) if needed.
        what: who writes, for the messages others get (``"hesslens train"``, ``"a
            CurvatureTracker"``).
    """

    def __init__(self, folder: PathLike, what: str = "a run") -> None:
        self.folder = Path(folder)
        self.what = str(what)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None
        self._created: list[Path] = []  # folders made by acquire(), outermost last

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __repr__(self) -> str:
        return f"OutputLock({str(self.folder)!r}, what={self.what!r}, held={self.held})"

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> OutputLock:
        """Take the lock (creating the folder); return ``self``. Raises
        :class:`~hesslens.errors.OutputLockedError` if a live writer holds it."""
        if self.held:
            return self
        self._make_folder()
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _make_folder(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise HesslensInputError(f"the output folder {folder} is a file, not a folder")
        missing = []
        for p in (folder, *folder.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise HesslensInputError(
                f"cannot create the output folder {folder}: {err.strerror or err}") from None
        self._created = missing

    def _info(self) -> bytes:
        return json.dumps({
            "what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }).encode()

    def _take(self) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp",
                                       prefix=f"{LOCK_NAME}.{os.getpid()}-{_TOKEN}.")
        except OSError as err:
            raise HesslensInputError(
                f"cannot write into the output folder {self.folder}: "
                f"{err.strerror or err} (is it writable?)") from None
        holding = fd
        try:
            flock = _try_flock(fd)
            content = self._info()
            os.write(fd, content)
            os.fsync(fd)
            for _ in range(100):  # another round when the lock was released meanwhile
                try:
                    holding = _place(fd, tmp, self.path, flock, content)
                    break
                except FileExistsError:
                    pass
                state, stale_fd, info = _inspect(self.path, flock)
                if state == "held":
                    raise self._locked(info, flock) from None
                if state == "foreign":
                    raise OutputLockedError(
                        f"the output folder {self.folder} holds {self.path}, which is not a "
                        "lock file (a folder?); remove it, or write into another folder")
                if state == "stale":  # its OS lock is ours now: put our file in its place
                    try:
                        os.replace(tmp, self.path)
                    finally:
                        if stale_fd is not None:
                            os.close(stale_fd)
                    warnings.warn(
                        f"taking over the lock of {self.folder}: it was left by "
                        f"{_holder(info)}, which no longer runs", StaleLockWarning, stacklevel=4)
                    break
            else:
                raise OutputLockedError(
                    f"{self.folder} is in use: its lock {self.path} keeps changing hands; "
                    "write into another folder")
        except BaseException:
            for f in {fd, holding}:
                with contextlib.suppress(OSError):
                    os.close(f)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if holding != fd:
            os.close(fd)
        self._fd = holding
        self._finalizer = weakref.finalize(self, _release, holding, str(self.path), os.getpid())

    def _locked(self, info: dict[str, Any], flock: bool = True) -> OutputLockedError:
        if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            return OutputLockedError(
                f"{self.folder} is in use by this process: {info.get('what') or 'a writer'} "
                "holds its lock; close or finish that writer first (a tracker's close()), or "
                "write into another folder")
        gone = ""
        if not flock or info.get("host") not in (None, socket.gethostname()):
            gone = f"; if that process is gone, delete {self.path}"
        return OutputLockedError(
            f"{self.folder} is in use: {_holder(info)} is writing into it; wait until it ends, "
            f"or write into another folder{gone}")

    # ------------------------------------------------------------------ giving it back
    def release(self, *, failed: bool = False) -> None:
        """Give the lock back (nothing if not held). With ``failed=True`` a folder that
        :meth:`acquire` created and that is empty now is removed too."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd, self._finalizer = None, None
        if failed:
            self._remove_created()
        self._created = []

    def _remove_created(self) -> None:
        for p in self._created:  # innermost first; stops at the first that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.release(failed=exc_type is not None)


def output_lock(folder: PathLike, what: str = "a run") -> OutputLock:
    """Take the lock of ``folder`` (created if needed) for ``what``; return the held
    :class:`OutputLock`: use it in a ``with`` block, or call ``.release()`` when done.

    >>> import tempfile
    >>> with output_lock(tempfile.mkdtemp(), what="a tracker") as lock:
    ...     lock.held
    True
    """
    return OutputLock(folder, what).acquire()


# ---------------------------------------------------------------------- OS-level helpers
def _try_flock(fd: int) -> bool:
    """``flock(fd, LOCK_EX | LOCK_NB)``; ``False`` where the system or file system has no
    flock."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL,
                         errno.ENOSYS):
            return False
        raise
    return True


def _young(fd: int, seconds: float = 10.0) -> bool:
    try:
        return time.time() - os.fstat(fd).st_mtime < seconds
    except OSError:
        return False


def _read_fd(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data.decode())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _inspect(path: Path, flock: bool) -> tuple[str, int | None, dict[str, Any]]:
    """The state of an existing lock file: ``("held", None, info)`` (a live writer),
    ``("stale", fd, info)`` (its writer is gone; ``fd`` holds its OS lock now),
    ``("gone", None, {})`` (released or replaced meanwhile: try again) or ``("foreign", None,
    {})`` (not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "gone", None, {}
    except OSError:
        return "held", None, read_lock(path.parent) or {}
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return "foreign", None, {}
    info = _read_fd(fd)
    if not info and _young(fd):  # being created this instant (where there are no hard links)
        os.close(fd)
        return "held", None, info
    try:
        if flock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return "held", None, info
        else:  # no OS locks here: stale when its writer ran on this host and is gone
            pid = info.get("pid")
            if (info.get("host") != socket.gethostname() or not isinstance(pid, int)
                    or _alive(pid)):
                os.close(fd)
                return "held", None, info
        st, mine = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        os.close(fd)
        return "gone", None, {}
    if (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev):
        os.close(fd)
        return "gone", None, {}
    return "stale", fd, info


def _place(fd: int, tmp: str, path: Path, flock: bool, content: bytes) -> int:
    """Put the lock file in place, or raise ``FileExistsError``; return the descriptor that
    holds it. ``os.link`` of the finished temporary file where the file system has hard links,
    else ``O_CREAT | O_EXCL`` on the name itself, then its OS lock and content."""
    try:
        os.link(tmp, path)
        return fd
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                             errno.EXDEV, errno.EMLINK):
            raise
    new = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        for _ in range(200):  # another process may be looking at the empty file this instant
            try:
                if flock:
                    fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.005)
        else:
            raise OutputLockedError(f"cannot lock the output folder {path.parent}: its lock "
                                    f"file {path} stays locked by another process")
        os.write(new, content)
        os.fsync(new)
    except BaseException:
        os.close(new)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return new
