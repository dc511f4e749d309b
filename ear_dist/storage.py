"""Writing files so that nothing half-written is ever left looking complete.

Every output a later step trusts (deltas, summaries, run records, checkpoint parts)
is written under a temp name, flushed to disk and renamed into place; a write that
fails (a full disk, a file size limit) removes the temp file and raises
``StorageError`` naming the file and the OS's reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ear_dist.errors import storage_error

PathLike = Union[str, Path]


def fsync_path(path: PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike) -> None:
    """Give ``path`` (every file under it, for a directory) the mode a plain ``open`` would: 0666 less the
    umask. safetensors writes its files 0600, which other users of a shared cluster cannot read."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        os.chmod(f, mode)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp name and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_path(tmp)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, e) from None
    return path


def save_safetensors(path: PathLike, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file`` via a temp name and a rename."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        apply_umask(tmp)
        fsync_path(tmp)
        tmp.replace(path)
    except (OSError, SafetensorError) as e:  # safetensors wraps the OS error (disk full) in its own
        tmp.unlink(missing_ok=True)
        raise storage_error(path, e) from None
    return path
