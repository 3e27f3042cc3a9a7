"""Output files (fullrange.files): atomic and exclusive writes, hashing each file once, text, locks."""

import os

import pytest

from fullrange import files


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    files.write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        files.write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_sha256_reads_each_file_once_while_it_is_unchanged(tmp_path, monkeypatch):
    """The digest of the bytes from an offset, as hashlib gives it; a second ask of an unchanged file reads nothing
    (``--sha256``'s check and the PNGs' model hash share one read); a changed file is read again."""
    import hashlib

    path = tmp_path / "w.bin"
    path.write_bytes(b"0123456789" * 1000)
    assert files.sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert files.sha256(path, 8) == hashlib.sha256(path.read_bytes()[8:]).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    files.sha256(path)
    assert opened == []
    path.write_bytes(b"changed")
    os.utime(path, ns=(1, 1))  # another size and time: read again
    assert files.sha256(path) == hashlib.sha256(b"changed").hexdigest() and len(opened) == 1


def test_exclusive_write_never_replaces_a_file_or_a_link(tmp_path):
    (tmp_path / "taken").write_bytes(b"mine")
    os.symlink(tmp_path / "target", tmp_path / "link")
    for name in ("taken", "link"):
        with pytest.raises(FileExistsError):
            files.write_bytes(tmp_path / name, b"new", exclusive=True)
    assert (tmp_path / "taken").read_bytes() == b"mine" and not (tmp_path / "target").exists()
    files.write_bytes(tmp_path / "free", b"new", exclusive=True)
    assert (tmp_path / "free").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free", "link", "taken"]  # no temporary file left


def test_overwrites_and_read_text(tmp_path):
    (tmp_path / "in").mkdir()
    assert files.overwrites(tmp_path / "in" / "x", tmp_path / "in") and files.overwrites(tmp_path / "a", tmp_path / "a")
    assert not files.overwrites(tmp_path / "b", tmp_path / "in")
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9")
    assert files.read_text(tmp_path / "t.txt") == "café"  # the byte-order mark dropped
    (tmp_path / "l.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="not UTF-8 text \\(byte 0xe9 at offset 3\\)"):
        files.read_text(tmp_path / "l.txt")
