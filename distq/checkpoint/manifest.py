"""The manifest: the file whose atomic appearance makes a checkpoint exist.

A checkpoint is one folder (its tag) holding the rank-0 training state and every rank's
optimizer shard. ``TAG/manifest.json`` names the tag, the world size that wrote it and the
size and sha256 of every file; it is written last, after all ranks finished their files, and
``checkpoints/latest.json`` (the same manifest) is then replaced to point at it. Until then
the folder is an incomplete checkpoint that resuming ignores (as torch.distributed.checkpoint's
``.metadata`` and DeepSpeed's universal checkpoints do).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distq.checkpoint.files import FileRecord, atomic_write
from distq.errors import DistqError

FORMAT_VERSION = 2
"""Checkpoint layout version: 1 was a single last.pt plus DeepSpeed's own shards."""
MANIFEST = "manifest.json"
LATEST = "latest.json"


class CheckpointError(DistqError):
    """A checkpoint is missing, damaged, from a newer distq, or does not fit the run."""


@dataclass
class Manifest:
    tag: str
    world_size: int
    files: dict[str, FileRecord]
    meta: dict = field(default_factory=dict)
    """What the trainer needs before loading anything: step, epoch, samples into the epoch, global batch."""
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if not isinstance(raw, dict) or not {"tag", "world_size", "files", "format"} <= raw.keys():
            raise ValueError("not a distq checkpoint manifest (tag, world_size, files and format expected)")
        files = {name: FileRecord(**record) for name, record in raw["files"].items()}
        return cls(tag=raw["tag"], world_size=int(raw["world_size"]), files=files, meta=raw.get("meta", {}), format=int(raw["format"]))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def read_manifest(path: Path) -> Manifest:
    """The manifest at ``path``; ValueError/OSError if it is missing or unreadable."""
    return Manifest.from_json(Path(path).read_text())


def write_manifest(path: Path, manifest: Manifest) -> None:
    text = manifest.to_json().encode()
    atomic_write(path, lambda f: f.write(text))
