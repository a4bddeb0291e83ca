"""Durable files: atomic writes, and the size and checksum every checkpoint file is recorded with."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 1 << 22


@dataclass(frozen=True)
class FileRecord:
    """What a manifest says of one file: its size in bytes and its sha256."""

    size: int
    sha256: str


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file, fsync, then rename over ``path``: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it on the way to ``f``."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None
        """The write error underneath, if any: torch.save reports it as a RuntimeError of its own."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise


def save_tensors(obj, path: Path) -> FileRecord:
    """``torch.save(obj)`` to ``path`` atomically; returns the file's size and sha256 (computed
    while writing: no second pass over the bytes)."""
    written: list[_Hashing] = []

    def write(f):
        hashing = _Hashing(f)
        try:
            torch.save(obj, hashing)
        except RuntimeError:
            if hashing.error is not None:  # a full disk, not a torch problem: say so as the OSError it is
                raise hashing.error from None
            raise
        written.append(hashing)

    atomic_write(path, write)
    return FileRecord(written[0].size, written[0].digest.hexdigest())


def file_record(path: Path) -> FileRecord:
    """Size and sha256 of a file on disk."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size, digest.hexdigest())


def load_tensors(path: Path):
    """``torch.load`` of a file written by :func:`save_tensors` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
