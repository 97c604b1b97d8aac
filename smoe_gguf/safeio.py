"""Careful file access: inputs opened as regular files only, pack files kept inside their pack,
outputs that never replace an input, and leftovers of interrupted writers cleaned up.

Every failure is a :class:`~smoe_gguf.errors.SmoeError` that names the file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import SmoeError


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` is, in words ("a directory", "a FIFO (named pipe)", ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, follow: bool = True, flags: int = 0, prefix: str = "") -> int:
    """Open ``path`` read-only and return its descriptor, refusing anything but a regular file.

    The open never blocks (``O_NONBLOCK``: a FIFO with no writer is refused, not waited on);
    ``follow=False`` also refuses a symbolic link as the last component (``O_NOFOLLOW``).
    ``flags`` are added (``O_DIRECT``). ``prefix`` starts the message ("layer 3 expert 1 part up: shard ").
    """
    p = str(path)
    where = prefix + p
    oflags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | flags
    if not follow:
        oflags |= os.O_NOFOLLOW
    try:
        fd = os.open(p, oflags)
    except FileNotFoundError:
        raise SmoeError(f"{where}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise SmoeError(f"{where}: is a symbolic link, not a regular file") from None
        raise SmoeError(f"{where}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SmoeError(f"{where}: is {kind_of(st.st_mode)}, not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_relative(rel: str) -> None:
    """Raise ValueError unless ``rel`` is a plain relative path that stays where it starts."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        raise ValueError(f"bad file name {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        raise ValueError(f"file {rel!r} is not a plain path inside the pack")


def in_pack(pack: Path, rel: str, prefix: str = "") -> Path:
    """``pack / rel`` after checking that it cannot lead out of the pack: ``rel`` is relative with
    no ``..``, and the directories on the way are not links to elsewhere."""
    try:
        check_relative(rel)
    except ValueError as e:
        raise SmoeError(f"{prefix}{pack}: {e}") from None
    path = pack / rel
    root = os.path.realpath(pack)
    parent = os.path.realpath(path.parent)
    if parent != root and not parent.startswith(root.rstrip("/") + "/"):
        raise SmoeError(f"{prefix}{path}: leads outside the pack {pack}")
    return path


def open_in_pack(pack: Path, rel: str, *, flags: int = 0, prefix: str = "") -> int:
    """Open a file of a pack: inside it (:func:`in_pack`), not a link, a regular file."""
    return open_regular(in_pack(pack, rel, prefix), follow=False, flags=flags, prefix=prefix)


def read_file(path: str | os.PathLike[str], *, follow: bool = True, limit: int = 1 << 30) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    fd = open_regular(path, follow=follow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise SmoeError(f"{path}: {size} bytes, more than the {limit} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    except OSError as e:
        raise SmoeError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_input(output: str | os.PathLike[str], inputs: list[Path], what: str) -> None:
    """Refuse to write ``output`` where it would replace an input: one of ``inputs`` (a file), or
    a directory among them (a pack) or anything inside it."""
    out = Path(output)
    real = os.path.realpath(out)
    for src in inputs:
        if src.is_dir():
            root = os.path.realpath(src)
            if real == root or real.startswith(root.rstrip("/") + "/") or _same(out, src):
                raise SmoeError(f"{what} {out}: is inside the pack {src}; refusing to write over an input")
        elif _same(out, src):
            raise SmoeError(f"{what} {out}: is the model {src}; refusing to write over an input")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def leftover_name(name: str, kind: str) -> str:
    """The hidden sibling a writer of ``name`` works in: ``.NAME.partial-PID`` or ``.NAME.old-PID``."""
    return f".{name}.{kind}-{os.getpid()}"


def clean_leftovers(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings in ``parent`` whose writer (PID)
    is gone: what an interrupted split or merge of ``name`` left. The paths removed."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)$")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or pid_alive(int(m.group(2))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def os_error(e: OSError, path: str | os.PathLike[str] | None = None) -> SmoeError:
    """An OSError as the one-line SmoeError that names its file (``path`` when it names none)."""
    name = e.filename if e.filename is not None else path
    reason = e.strerror or str(e)
    return SmoeError(f"{name}: {reason}" if name is not None else reason)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (``flock`` on ``<path>.lock``) for a read-merge-write
    of it: two processes saving at once both count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write`` into a temporary file beside it, renamed over it once
    complete: a reader sees the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
