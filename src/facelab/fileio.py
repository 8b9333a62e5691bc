"""Atomic file writes: a crash mid-write leaves the previous version of the file intact.

Choices: a symbolic link is written through (its target gets the new content, the link stays);
an existing file keeps its permission bits, a new one gets the usual 0666 minus the umask; the
temporary file is named `.NAME.PID.RANDOM.tmp`, so the next write of NAME removes temporaries
that a killed process left behind (those whose process is gone) and nothing of a live writer.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

# A temporary without a process id in its name (made by an older facelab) counts as stale
# once it is this old.
STALE_SECONDS = 3600.0


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of `path` whose writer no longer runs (a `kill -9` mid-write)."""
    removed = []
    prefix = f".{path.name}."
    for entry in os.scandir(path.parent):
        middle = entry.name[len(prefix) : -len(".tmp")]
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp") and middle):
            continue
        pid = middle.split(".")[0]
        if pid.isdigit():
            stale = int(pid) != os.getpid() and _process_gone(int(pid))
        else:
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
        if stale and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def check_writable(path: str | Path) -> Path:
    """Refuse, before any work, an output file that cannot be written: its folder cannot be
    made or written to (read-only file system, permissions, a file in the way), or the path is
    a folder or a read-only file. Raises OSError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = _temporary_name(path)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write here ({exc.strerror or exc})", str(path)) from None
    if path.is_dir():
        raise IsADirectoryError(21, "a folder, not a file", str(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(13, "the file is read-only", str(path))
    return path


def check_writable_folder(folder: str | Path) -> Path:
    """`check_writable` for an output folder (made if absent): a file can be written in it."""
    check_writable(Path(folder) / ".facelab-write-check")
    return Path(folder)


def _naming(exc: OSError, path: str | Path) -> OSError:
    """The same error (errno, reason) about `path` instead of a temporary or no file."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(fh)` on a temporary file beside `path`, fsync it, then rename over `path`.

    An OSError (disk full, read-only file system) is raised naming `path`, not the temporary.
    """
    target = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = _temporary_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                if target.exists():
                    os.fchmod(fh.fileno(), stat.S_IMODE(target.stat().st_mode))
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as exc:
                if exc.filename:  # reading an input failed: an error about that file
                    raise
                raise _naming(exc, path) from None
        try:
            os.replace(tmp, target)
            _fsync_folder(target.parent)
        except OSError as exc:
            raise _naming(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_csv(
    path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]
) -> Path:
    """Write a CSV atomically, consuming `rows` lazily: a million-row submission file never
    has to sit in memory, and a crash mid-write leaves no half-written file behind."""

    def write(fh: IO[bytes]) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # leave `fh` open for atomic_write's fsync

    return atomic_write(path, write)
