"""A run's checkpoints: one folder per checkpoint, committed by its manifest, found again on resume.

Layout of ``RUN_DIR/checkpoints``::

    latest.json                 the newest committed manifest (the commit point)
    step_00000066/              one checkpoint, named by its optimizer step
        state.pt                rank 0: config, classes, models, controller, RNG, history
        optim-00000-of-00002.pt every rank's share of the optimizer state (engine-independent)
        optim-00001-of-00002.pt
        manifest.json           written last: tag, world size, size and sha256 of each file

Writing: every rank writes its files, rank 0 collects their records, writes the tag's
manifest and then ``latest.json`` (both atomically), and only then deletes older
checkpoints. Reading: the newest committed checkpoint (``latest.json``'s, or a newer one whose
manifest was written just before a crash) whose files are all there with the recorded sizes
and checksums; any newer one that is not is passed over, said in one line.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from distq.checkpoint.files import FileRecord, file_record, fsync_dir, load_tensors
from distq.checkpoint.manifest import FORMAT_VERSION, LATEST, MANIFEST, CheckpointError, Manifest, read_manifest, write_manifest

STATE = "state.pt"
TAG_PREFIX = "step_"
LEGACY = "last.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def optimizer_file(rank: int, world: int) -> str:
    return f"optim-{rank:05d}-of-{world:05d}.pt"


@dataclass
class Found:
    """The checkpoint to resume from, and what was passed over to get to it (one line each)."""

    folder: Path
    manifest: Manifest
    skipped: list[str] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.folder / STATE

    def optimizer_paths(self) -> list[Path]:
        return [self.folder / optimizer_file(r, self.manifest.world_size) for r in range(self.manifest.world_size)]


def problem(folder: Path, manifest: Manifest, deep: bool = True) -> str | None:
    """Why the checkpoint in ``folder`` cannot be used, or None if every file is as recorded."""
    if not folder.is_dir():
        return f"its folder {folder} is missing"
    for name, record in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.size:
            return f"{name} has {size} bytes, the manifest says {record.size} (truncated or overwritten)"
        if deep and file_record(path).sha256 != record.sha256:
            return f"{name} does not match its checksum (damaged)"
    return None


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path):
        self.root = checkpoint_dir(run_dir)

    # --- writing (the trainer calls these in order, on the ranks named) --------------------

    def begin(self, tag: str) -> Path:
        """Rank 0, before any rank writes: an empty folder for ``tag`` (a folder left by an
        interrupted attempt at the same step is removed first)."""
        folder = self.root / tag
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    def commit(self, tag: str, world_size: int, files: dict[str, FileRecord], meta: dict) -> Manifest:
        """Rank 0, after every rank wrote its files: the manifest makes the checkpoint exist."""
        manifest = Manifest(tag=tag, world_size=world_size, files=dict(sorted(files.items())), meta=meta)
        folder = self.root / tag
        fsync_dir(folder)
        write_manifest(folder / MANIFEST, manifest)
        write_manifest(self.root / LATEST, manifest)
        return manifest

    def prune(self, keep: int) -> None:
        """Rank 0, after a commit: keep the ``keep`` newest committed checkpoints, delete the
        rest (older ones, and folders that never got a manifest)."""
        committed = sorted(self._committed(), key=lambda m: m.step, reverse=True)
        kept = {m.tag for m in committed[:keep]}
        for folder in self._tag_folders():
            if folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)

    # --- reading ----------------------------------------------------------------------------

    def find(self) -> Found | None:
        """The checkpoint to resume from; None if the run has none. A newer checkpoint that is
        incomplete or damaged is passed over (``Found.skipped`` says why); CheckpointError if
        checkpoints exist but none is usable, or one was written by a newer distq."""
        if not self.root.is_dir():
            return None
        if (self.root / LEGACY).is_file() and not (self.root / LATEST).exists() and not self._tag_folders():
            raise CheckpointError(
                f"{self.root} holds a checkpoint of an older distq (last.pt, format 1) that this version cannot resume: "
                "start a fresh run.dir (distq eval and export still read it)"
            )
        skipped: list[str] = []
        candidates: list[Manifest] = []
        latest = self.root / LATEST
        if latest.exists():
            try:
                candidates.append(read_manifest(latest))
            except (OSError, ValueError, TypeError) as exc:
                skipped.append(f"{latest} is unreadable ({exc})")
        # Newest first: a checkpoint whose manifest is written is complete even if latest.json
        # (written just after) does not name it yet.
        candidates += [m for m in self._committed() if m.tag not in {c.tag for c in candidates}]
        candidates.sort(key=lambda m: m.step, reverse=True)
        best_step = max((m.step for m in candidates), default=-1)
        for folder in self._tag_folders():
            if not (folder / MANIFEST).exists() and _step_of(folder.name) > best_step:
                skipped.append(f"{folder.name} is incomplete (no manifest: its writing was interrupted)")
        for manifest in candidates:
            self._check_format(manifest)
            why = problem(self.root / manifest.tag, manifest)
            if why is None:
                return Found(self.root / manifest.tag, manifest, skipped)
            skipped.append(f"{manifest.tag} cannot be used: {why}")
        if skipped:
            raise CheckpointError(
                f"{self.root} has no complete checkpoint to resume from ({'; '.join(skipped)}): "
                "restore the files, or move the folder away to start afresh"
            )
        return None

    def find_tag(self, tag: str) -> Found:
        """Exactly the checkpoint ``tag``; CheckpointError if it is incomplete or damaged."""
        folder = self.root / tag
        try:
            manifest = read_manifest(folder / MANIFEST)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {folder} has no readable manifest ({exc}): it is incomplete; resume with --resume auto") from None
        self._check_format(manifest)
        why = problem(folder, manifest)
        if why is not None:
            raise CheckpointError(f"checkpoint {folder} cannot be used: {why}; resume with --resume auto to take the newest complete one")
        return Found(folder, manifest)

    def _check_format(self, manifest: Manifest) -> None:
        if manifest.format > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.root / manifest.tag} has format {manifest.format}, newer than this distq's "
                f"({FORMAT_VERSION}): resume it with a newer distq"
            )

    def _tag_folders(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)) if self.root.is_dir() else []

    def _committed(self) -> list[Manifest]:
        manifests = []
        for folder in self._tag_folders():
            try:
                manifests.append(read_manifest(folder / MANIFEST))
            except (OSError, ValueError, TypeError):
                continue
        return manifests


def _step_of(tag: str) -> int:
    try:
        return int(tag[len(TAG_PREFIX) :])
    except ValueError:
        return -1


def load_state(path: str | Path) -> dict:
    """The rank-0 training state of a checkpoint: ``path`` is a run directory, its
    ``checkpoints`` folder, one checkpoint folder, its ``state.pt``, or a single-file
    checkpoint of an older distq (``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = _state_file_in(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} not found: pass a run directory or a checkpoint written by 'distq train' (RUN_DIR/checkpoints/step_*)"
        )
    try:
        state = load_tensors(path)
    except Exception as exc:  # torch raises many types for a bad file (IndexError for an empty one, KeyError, OSError, ...)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a distq checkpoint ({reason})") from None
    if not isinstance(state, dict) or "models" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a distq training checkpoint (no models/config entries)")
    if state.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {state['format']}, newer than this distq ({FORMAT_VERSION}): upgrade distq")
    return state


def _state_file_in(folder: Path) -> Path:
    if (folder / STATE).is_file() or (folder / MANIFEST).is_file():
        return folder / STATE
    root = folder if (folder / LATEST).exists() or folder.name == "checkpoints" else checkpoint_dir(folder)
    found = CheckpointStore(root.parent).find()
    if found is not None:
        return found.state_path
    if (root / LEGACY).is_file():
        return root / LEGACY
    raise CheckpointError(f"{folder} holds no checkpoint: pass a run directory with checkpoints, or a checkpoint folder (RUN_DIR/checkpoints/step_*)")
