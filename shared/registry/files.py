"""File operations of the registry that must survive crashes and planted links: atomic
writes, directory fsync, link-free sizes and deletion."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under path (apparent sizes), never following a link; 0 if it is gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for fname in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                total += os.lstat(os.path.join(dirpath, fname)).st_size
            except OSError:  # removed meanwhile (a concurrent gc): it no longer counts
                pass
    return total


def remove_tree(path: Path) -> None:
    """Delete a trash entry. A folder goes with shutil.rmtree, which on Linux works through
    descriptors and never follows a link inside it; a link or file (a planted "version") is
    unlinked, never followed. Entries already gone (another gc got there first) are fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return

    def onerror(func, p, exc_info):
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
