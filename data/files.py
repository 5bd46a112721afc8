"""File helpers shared by the shard writers."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Writes via a temp file so readers never see a partial file under ``path``.

    The data are flushed to disk before the rename: without that, a crash soon after can leave the
    new name pointing at an empty file on filesystems that reorder metadata before data.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Adds ``data`` with fixed metadata, so the same samples always give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))
