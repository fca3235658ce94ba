"""Writing user files: one atomic-write helper for every file the pack writes.

A file is written under a temporary name in its destination folder, flushed, given the mode a plain ``open()``
would have given it (``0o666`` less the process umask: ``tempfile.mkstemp`` creates files ``0o600``, which a UI
running as another user cannot read), then renamed over the destination. A reader sees the old file or the new
one, never half of one; an interrupted write leaves only a hidden ``.<name>.*.tmp`` file that is removed on error.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "default_file_mode",
    "make_parent",
    "move_into_fresh_folder",
    "save_safetensors_atomic",
]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    # os.umask can only be read by setting it; set it back at once (single call pair, no I/O in between).
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk where the OS supports it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_parent(path: str | os.PathLike) -> None:
    """Create the folder of ``path`` (and its parents) if missing.

    Raises:
        NotADirectoryError: a component of that folder is a file (mkdir would say "File exists: <that file>",
            which reads as if the output itself existed).
    """
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        for folder in (parent, *parent.parents):
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(
                    f"cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder"
                ) from None
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` with the umask's file mode.

    Args:
        path (`str` or `os.PathLike`): the destination file; its folder is created if missing.
        fsync (`bool`, defaults to `True`): flush the file and the folder entry to disk before returning.

    Yields:
        `Path`: where the caller writes the new content (a file the caller may open, or pass to a library writer).
    """
    path = Path(path)
    make_parent(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see `atomic_path`). Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see `atomic_path`). Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors_atomic(
    tensors: Mapping[str, object], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through `atomic_path`.

    Args:
        tensors (`Mapping[str, torch.Tensor]`): contiguous CPU tensors by key.
        path (`str` or `os.PathLike`): the destination ``.safetensors`` file.
        metadata (`Mapping[str, str]`, *optional*): the header's ``__metadata__``.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def move_into_fresh_folder(parent: str | os.PathLike, prefix: str, paths: list[Path]) -> Path:
    """Move ``paths`` (each directly below ``parent``) into a new folder ``parent/<prefix>-<UTC time>[-N]/``.

    Used to set a user's earlier work aside instead of deleting it (``replaced-*`` on ``--overwrite``, abandoned
    checkpoints on resume). Each move is one rename, so a kill leaves every path either where it was or in the new
    folder. Paths that no longer exist are skipped.

    Returns:
        `Path`: the new folder.
    """
    import time

    parent = Path(parent)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = parent / f"{prefix}-{stamp}", 1
    while folder.exists():
        folder, n = parent / f"{prefix}-{stamp}-{n}", n + 1
    folder.mkdir()
    for path in paths:
        path = Path(path)
        if path.exists() or path.is_symlink():
            os.rename(path, folder / path.name)
    fsync_dir(parent)
    return folder
