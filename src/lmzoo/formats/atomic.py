"""Write files and directories so that a kill at any moment never leaves a half-written result.

The pattern: write to a temporary name in the same directory, flush and fsync, then
``os.replace`` onto the final name (atomic on POSIX). A reader sees the old file or the new one.

A directory cannot be renamed over a non-empty one. On Linux the two are swapped in one step
(``renameat2(RENAME_EXCHANGE)``); elsewhere the old one is first moved into the temporary
directory, which leaves a short window where a kill leaves no ``final`` at all:
:func:`clean_stale` (called by the trainer when a run starts) moves it back. A kill also leaves the
hidden ``.<name>.*.tmp`` directory itself behind; :func:`clean_stale` removes those too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory entry itself (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where unsupported."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # old kernel or file system
        return False
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


# What to do about a failed write, by its cause.
REMEDY = {
    errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
    errno.EROFS: "write to a writable file system (this one is mounted read-only)",
    errno.EACCES: "make the directory writable for this user", errno.EPERM: "make the directory writable for this user",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error (safetensors, tokenizers) ends


def write_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OSError (errno, cause, ``path``) behind a library's failed write, or None when ``e`` is an
    OSError already or no I/O failure.

    Each library reports a full disk its own way: Python raises ``OSError(ENOSPC)``; safetensors raises
    ``SafetensorError`` and tokenizers a bare ``Exception``, both ending in ``(os error 28)``; ``torch.save``
    raises ``RuntimeError("... unexpected pos ...")`` with no errno at all. Without an errno the file system
    is asked, while the partial file still takes its space: read-only, not writable, or (almost) full. One
    OSError whatever the library means one line on the command line (``strerror (path)``)."""
    if isinstance(e, OSError):
        return None  # already the OSError a caller handles, naming its own file
    msg = " ".join(str(e).split())
    m = _RUST_ERRNO.search(msg)
    code = int(m.group(1)) if m else None
    torch_writer = "PytorchStreamWriter" in msg or "unexpected pos" in msg  # torch.save's zip writer
    if code is None and not torch_writer:
        return None  # not a write failure (a bug, a bad value): let it through unchanged
    if code is None:
        code = _ask_file_system(Path(path).parent)
    cause = os.strerror(code) if code is not None else f"write failed ({msg[:200]})"
    return OSError(code, cause, os.fspath(path))


def _ask_file_system(directory: Path) -> int | None:
    """Why writing into ``directory`` may have failed, from the file system's own state, or None."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if not os.access(directory, os.W_OK):
        return errno.EACCES
    if st.f_bavail * st.f_frsize < 1 << 20:  # less than 1 MiB left for this user
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it onto ``final``.

    Works for a file or a directory written at the yielded path. On any exception the temporary
    is removed and ``final`` is left as it was; a library's error for a failed write (a full disk, a
    read-only file system) is raised as the OSError :func:`write_error` makes of it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as e:  # a read-only or full directory: name the file that could not be written, not the temporary
        raise OSError(e.errno, e.strerror, os.fspath(final)) from None
    target = tmp / "payload"
    try:
        try:
            yield target
        except Exception as e:  # a library's own error for a full disk: one OSError naming the cause
            mapped = write_error(e, final)
            if mapped is None:
                raise
            raise mapped from None
        if target.is_dir():
            for p in target.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
        elif target.exists():
            with open(target, "rb") as f:
                os.fsync(f.fileno())
        else:
            raise FileNotFoundError(f"nothing was written for {final}")
        if final.is_dir() and not final.is_symlink():
            # A directory cannot be renamed over a non-empty one: swap the two in one step where the
            # OS can, else move the old one aside first (clean_stale repairs a kill in between).
            if not exchange(target, final):
                os.replace(final, tmp / "old")
                os.replace(target, final)
        else:
            os.replace(target, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that no reader ever sees it half deleted: rename it away first."""
    path = Path(path)
    if not path.exists():
        return
    gone = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.replace(path, gone / "old")
    shutil.rmtree(gone, ignore_errors=True)


def clean_stale(directory: str | os.PathLike) -> list[str]:
    """Repair what a kill inside :func:`atomic_path` or :func:`remove_tree` left in ``directory``.

    Moves an old directory back where a kill fell between its two renames (so ``final`` exists again
    with its previous content), then deletes the hidden ``.<name>.*.tmp`` leftovers. Only call it
    when no other process is writing into ``directory``. Returns the names removed.
    """
    d = Path(directory)
    removed = []
    for tmp in sorted(d.glob(".*.tmp")):
        if not tmp.is_dir():
            continue
        name = tmp.name[1:].rsplit(".", 2)[0]  # ".<name>.<random>.tmp" -> "<name>"
        # atomic_path's window: the old directory moved aside, the new one (payload) not yet in place.
        # (remove_tree leaves "old" without "payload": that directory was being deleted.)
        if (tmp / "old").exists() and (tmp / "payload").exists() and not (d / name).exists():
            os.replace(tmp / "old", d / name)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp.name)
    if removed:
        fsync_dir(d)
    return removed
