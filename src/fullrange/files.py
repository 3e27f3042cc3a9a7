"""Output files that are never half-written: write to a temporary file beside the target, fsync it, rename it over
the target, fsync the folder. A crash leaves the old file or the new one. Files get the user's umask, as any file
they create (so a ComfyUI or A1111 running as another user can read them where the umask allows)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (``.NAME.<random>.tmp``) to write; renamed over ``path`` when the
    block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path.parent, path.name)
    mode = tmp.stat().st_mode  # 0666 less the umask, as for any new file
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced the file with one of its own (safetensors: 0600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _new_file(folder: Path, name: str) -> Path:
    """A new empty file ``.NAME.<random>.tmp`` in ``folder``, created with mode 0666 less the umask."""
    tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def share_like_new_files(folder: Path | str) -> None:
    """Give every file under ``folder`` the permissions a new file gets (0666 less the umask): some writers
    (safetensors' ``save_file``, which diffusers uses) leave 0600."""
    folder = Path(folder)
    probe = _new_file(folder, "mode")
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_bytes(path: Path | str, data: bytes) -> None:
    """``data`` to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """``tensors`` to a safetensors file, atomically, streamed by safetensors' file writer straight from the
    tensors' memory (no copy of CPU tensors; tensors on a device are copied to the host by the writer)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
