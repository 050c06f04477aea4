"""Atomic file writes: a file appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_MARK = ".tmp-"


def _create_temporary(path: Path) -> Path:
    """A new, empty hidden sibling of ``path`` with the permissions ``open(path, "w")`` gives:
    ``path``'s own when it exists, else 0o666 less the umask (applied by the kernel)."""
    while True:
        tmp = path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
    finally:
        os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` for a writer that opens files by name; renamed onto
    ``path`` when the block ends without an exception.

    The file gets the permissions a plain ``open`` would give it (the umask for a new file, the
    old file's mode when replacing one). It is fsync'ed before the rename, so after a crash
    ``path`` holds either its previous content or the complete new content. On an exception
    inside the block the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, made atomic by :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries left by writers killed before their rename; returns what was removed."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and TMP_MARK in p.name and p.is_file():
                p.unlink()
                removed.append(p)
    return removed
