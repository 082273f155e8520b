"""Writing files so that a crash or a full disk never leaves a torn file or deletes a good one.

Every file a run or an evaluation leaves (checkpoints, metrics.json, pictures) is written to a temp
file in its own folder, fsynced, then renamed over the target (``atomic_write``): a reader, or a crash
at any moment, sees the old file or the complete new one. A full disk (ENOSPC, or a quota: EDQUOT) is
turned into ``DiskFullError``, whose message names the folder, the space the file needed and the
space free; the command line prints it as one ``error:`` line with exit code 75 (EX_TEMPFAIL: free
space and run again).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, Path]
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TEMP_RE = re.compile(r"^\..+\.tmp\.(?:(?P<host>.+)\.)?(?P<pid>\d+)$")


class DiskFullError(OSError):
    """No space left where a file had to go; the message says where, how much and what stands."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def temp_path(path: Path) -> Path:
    """The hidden temp file a write of ``path`` goes through (host and pid tell stale from live)."""
    return path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or an exception it was raised from is ENOSPC/EDQUOT (torch and PIL wrap the
    OSError in their own errors; cv2.imwrite returns False and our caller raises DiskFullError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(folder: PathLike) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def disk_full_message(what: str, folder: PathLike, needed: int | None = None, at_least: bool = False) -> str:
    """The one sentence that says a write failed for space: where, what it needed, what is free."""
    need = f"needs {'more than' if at_least else 'about'} {human(needed)}; " if needed else ""
    free = human(free_bytes(folder))
    return f"no space left on device writing {what} in {folder} ({need}{free} free there)"


def atomic_write(
    path: PathLike, write: Callable[[Path], None], what: str = "", size: int | None = None
) -> Path:
    """``write(temp_path)`` fills a temp file beside ``path``; then fsync and rename over ``path``.

    On any failure the temp file is removed and ``path`` is left as it was; a full disk raises
    DiskFullError naming ``what`` (default: the file name), the folder, the file's ``size`` (when not
    given: at least what was written before the disk filled up) and the space free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else None
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e) and not isinstance(e, DiskFullError):
            needed = size or (written and max(written, 1))
            message = disk_full_message(what or path.name, path.parent, needed, at_least=size is None)
            raise DiskFullError(message) from e
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, what: str = "") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), what, len(text.encode()))


def atomic_write_bytes(path: PathLike, data: bytes, what: str = "") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), what, len(data))
