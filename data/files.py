"""File helpers shared by the shard writers."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Callable


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temp file beside ``path``, which then replaces ``path``: readers never see a
    partial file. The data are flushed to disk before the rename: without that, a crash soon after can
    leave the new name pointing at an empty file on filesystems that reorder metadata before data."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` under ``path``, whole or not at all (``atomic_replace``)."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Adds ``data`` with fixed metadata, so the same samples always give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))
