"""Output files that are never half-written and never written through a link: write to a temporary file beside the
target, fsync it, rename it over the target (a rename replaces a link planted at the name, never the link's
target), fsync the folder. A crash leaves the old file or the new one. Writers fullrange does not control (diffusers'
savers open files by name) write into a private folder whose files are then renamed in (:func:`staged_folder`).
Files get the user's umask, as any file they create (so a ComfyUI or A1111 running as another user can read them
where the umask allows)."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: Path | str, *, exclusive: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (``.NAME.<random>.tmp``) to write; renamed over ``path`` when the
    block succeeds, removed when it fails. ``exclusive``: never replace anything at ``path`` (``FileExistsError``):
    the file is linked in under its name, which fails if the name is taken, even by a link."""
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
        if exclusive:
            os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failure = written_error(err, path)
        if failure is None or isinstance(err, FileExistsError):
            raise
        raise failure from None
    _fsync_folder(path.parent)


def written_error(err: BaseException, path: Path | str) -> OSError | None:
    """An error of writing (an ``OSError``, or safetensors' own for a failed write) as an ``OSError`` naming ``path``
    (not a temporary file beside it) with the system's reason, ``No space left on device`` say; ``None`` for other
    errors."""
    if isinstance(err, SafetensorError):
        found = re.search(r"os error (\d+)", str(err))
        number = int(found.group(1)) if found else errno.EIO
        return OSError(number, os.strerror(number) if found else str(err), str(path))
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror or str(err), str(path))
    return None


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


@contextlib.contextmanager
def staged_folder(folder: Path | str) -> Iterator[Path]:
    """A new private folder beside ``folder`` for a writer fullrange does not control; when the block succeeds, every
    file written there is renamed into ``folder`` (replacing what has its name, a planted link included, never the
    link's target) with the permissions a new file gets. The private folder is removed however the block ends."""
    import shutil
    import tempfile

    folder = Path(folder)
    real_folder(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        try:
            yield tmp
        except (OSError, SafetensorError) as err:
            raise written_error(err, folder) from None
        share_like_new_files(tmp)
        for path in sorted(tmp.rglob("*")):
            target = folder / path.relative_to(tmp)
            if path.is_dir():
                real_folder(target)
            else:
                os.replace(path, target)
        _fsync_folder(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def real_folder(folder: Path | str) -> Path:
    """``folder``, created if missing; an ``OSError`` naming it if it is a symbolic link (a link planted where fullrange
    writes a folder would send its files elsewhere)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise OSError(errno.ELOOP, "a symbolic link where fullrange writes a folder; remove it", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def claim_output_folder(folder: Path | str, inputs: dict[str, str | Path | None]) -> Path:
    """Check that ``folder`` may receive a command's outputs: it is named (not ``""``), is not and is not inside one of
    the ``inputs`` (config field → path; nor they inside it), and is missing, empty or fullrange's own (it holds the
    :data:`LOCK` file a run leaves). A ``ValueError`` says which rule failed; nothing is written."""
    if str(folder).strip() == "":
        raise ValueError("is empty: name the output folder (an unset shell variable?)")
    folder = Path(folder)
    for field, given in inputs.items():
        if given is None or str(given) == "":
            continue
        if overwrites(folder, given) or overwrites(given, folder):
            raise ValueError(
                f"{folder}: is or holds {field} {given}, which the outputs could overwrite; write them elsewhere"
            )
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file, not a directory")
    if folder.is_dir() and not (folder / LOCK).exists() and any(folder.iterdir()):
        raise ValueError(f"{folder}: holds files that are not a fullrange run's; choose a new or empty folder")
    return folder


def write_bytes(path: Path | str, data: bytes, *, exclusive: bool = False) -> None:
    """``data`` to ``path``, atomically (``exclusive``: see :func:`atomic_path`)."""
    with atomic_path(path, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)


def sha256(path: Path | str, offset: int = 0) -> str:
    """Hex SHA-256 of a file's bytes from ``offset`` on, read in chunks (never whole). Each file is hashed once
    while its size and modification time stay the same (the digest is remembered by path, size and time)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, offset)


@functools.lru_cache(maxsize=65536)
def _sha256(path: str, size: int, mtime_ns: int, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def save_safetensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """``tensors`` to a safetensors file, atomically, streamed by safetensors' file writer straight from the
    tensors' memory (no copy of CPU tensors; tensors on a device are copied to the host by the writer)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def overwrites(out: Path | str, given: Path | str) -> bool:
    """Whether writing ``out`` would replace the file ``given`` or a file inside the folder ``given``."""
    target, source = Path(out).resolve(), Path(given).resolve()
    return target == source or (source.is_dir() and target.is_relative_to(source))


def read_text(path: Path | str, limit: int | None = None) -> str:
    """A text file, decoded by fullrange's one rule: UTF-8, a byte-order mark honoured (and dropped); anything
    else is refused with a ``ValueError`` naming the file and where decoding failed. A file larger than ``limit``
    bytes is refused without being read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read() if limit is None else f.read(limit + 1)
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror or type(err).__name__})") from None
    if limit is not None and len(raw) > limit:
        raise ValueError(f"{path}: larger than {limit:,} bytes, too large for what it should hold")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None


def read_json(path: Path | str):
    """A JSON file (decoded as :func:`read_text`); a ``ValueError`` naming the file if it is not well-formed."""
    import json

    try:
        return json.loads(read_text(path, limit=JSON_LIMIT))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None


JSON_LIMIT = 2**26
"""The largest JSON file read (64 MiB; configs are kilobytes, a tokenizer's vocabulary a few megabytes)."""


LOCK = ".fullrange.lock"
"""The lock file :func:`lock` keeps in an output folder."""


class Busy(ValueError):
    """Another process holds the lock on an output folder."""


@contextlib.contextmanager
def lock(folder: Path | str, what: str) -> Iterator[None]:
    """Hold ``folder/.fullrange.lock`` (an OS lock: released when the process ends, however it ends) for the block;
    :class:`Busy` naming the holder (its pid, host, command and start time) if another process holds it."""
    import fcntl
    import json
    import socket
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    try:  # never through a link planted at the lock's name (another user's file would be truncated)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise ValueError(f"{path}: is a symbolic link; fullrange does not write through links (remove it)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            try:
                info = json.loads(holder)
                named = f"pid {info['pid']} on {info['host']}, {info['what']}, since {info['since']}"
            except (ValueError, KeyError, TypeError):
                named = "another process"
            raise Busy(f"{folder}: in use by another fullrange run ({named})") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what}
        record["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)


def fingerprint(path: Path | str, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")) -> str:
    """A short identity of a weights file, or of the weight files under a folder, without reading them whole: each
    file's relative name, size and SHA-256 of its first, middle and last MiB (which differ between two fine-tunes
    of one architecture, whose headers and sizes agree)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
    digest = hashlib.sha256()
    chunk = 2**20
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}:".encode())
        with file.open("rb") as f:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                f.seek(offset)
                digest.update(f.read(chunk))
    return digest.hexdigest()[:16]
