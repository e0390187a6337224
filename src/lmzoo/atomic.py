"""Write files and directories so that a kill at any moment never leaves a half-written result.

The pattern: write to a temporary name in the same directory, flush and fsync, then
``os.replace`` onto the final name (atomic on POSIX). A reader sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it onto ``final``.

    Works for a file or a directory written at the yielded path. On any exception the temporary
    is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / "payload"
    try:
        yield target
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
            # Directories cannot be replaced atomically over a non-empty one: move the old one
            # aside first, then swap in the new one, then delete the old one.
            old = tmp / "old"
            os.replace(final, old)
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
