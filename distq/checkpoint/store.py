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
and checksums; any newer one that is not is passed over, said in one line. eval and export read
a checkpoint folder, or the ``state.pt`` in one, only if it is as its manifest records; and no
export is ever written among a run's checkpoints (``enclosing_checkpoints``).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distq.checkpoint.files import FileRecord, file_record, fsync_dir, load_tensors
from distq.checkpoint.manifest import FORMAT_VERSION, LATEST, MANIFEST, CheckpointError, Manifest, read_manifest, write_manifest

STATE = "state.pt"
TAG_PREFIX = "step_"
LEGACY = "last.pt"
CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.yaml", "results.json")
"""Files a run directory holds beside its ``checkpoints`` folder."""
READ_FIX = "pass the run directory to use its newest complete checkpoint, or restore the files from a copy"
"""What to do about a damaged checkpoint that eval or export was given by its folder."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


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

    @classmethod
    def at(cls, root: str | Path) -> CheckpointStore:
        """The store whose checkpoints folder is ``root`` (whatever that folder is named)."""
        store = cls.__new__(cls)
        store.root = Path(root)
        return store

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

    def find(self, reading: bool = False) -> Found | None:
        """The checkpoint to resume from; None if the run has none. A newer checkpoint that is
        incomplete or damaged is passed over (``Found.skipped`` says why); CheckpointError if
        checkpoints exist but none is usable, or one was written by a newer distq. ``reading``:
        for eval and export rather than resuming (only the advice of the errors differs)."""
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
            _check_format(self.root / manifest.tag, manifest, reading)
            why = problem(self.root / manifest.tag, manifest)
            if why is None:
                return Found(self.root / manifest.tag, manifest, skipped)
            skipped.append(f"{manifest.tag} cannot be used: {why}")
        if skipped:
            purpose, fix = (
                ("to read", "restore the files from a copy")
                if reading
                else ("to resume from", "restore the files, or move the folder away to start afresh")
            )
            raise CheckpointError(f"{self.root} has no complete checkpoint {purpose} ({'; '.join(skipped)}): {fix}")
        return None

    def find_tag(self, tag: str) -> Found:
        """Exactly the checkpoint ``tag``; CheckpointError if it is incomplete or damaged."""
        return verified_checkpoint(self.root / tag)

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


def verified_checkpoint(folder: Path, only: str | None = None, reading: bool = False) -> Found:
    """The checkpoint in ``folder`` after checking the sizes and sha256 of its files against its
    manifest (only of the file ``only`` if given); CheckpointError if it is incomplete or damaged.
    ``reading``: for eval and export rather than resuming (only the advice differs)."""
    incomplete, fix = (
        ("it is incomplete (its writing was interrupted)", READ_FIX)
        if reading
        else ("it is incomplete; resume with --resume auto", "resume with --resume auto to take the newest complete one")
    )
    try:
        manifest = read_manifest(folder / MANIFEST)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder} has no readable manifest ({exc}): {incomplete}") from None
    _check_format(folder, manifest, reading)
    checked = manifest
    if only is not None:
        if only not in manifest.files:
            raise CheckpointError(f"checkpoint {folder} does not list {only} in its manifest: {fix}")
        checked = dataclasses.replace(manifest, files={only: manifest.files[only]})
    why = problem(folder, checked)
    if why is not None:
        raise CheckpointError(f"checkpoint {folder} cannot be used: {why}; {fix}")
    return Found(folder, manifest)


def _check_format(folder: Path, manifest: Manifest, reading: bool = False) -> None:
    if manifest.format > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder} has format {manifest.format}, newer than this distq's "
            f"({FORMAT_VERSION}): {'read' if reading else 'resume'} it with a newer distq"
        )


def enclosing_checkpoints(path: str | Path) -> Path | None:
    """The checkpoints folder of a run (or one checkpoint's folder) that ``path`` lies inside,
    symbolic links and ``..`` resolved; None if it lies outside every one. Such a folder holds
    a distq ``latest.json`` or ``manifest.json``, or is a ``checkpoints`` folder holding
    checkpoints or standing beside a run's files."""
    for folder in Path(path).resolve().parents:
        if _is_manifest(folder / LATEST) or _is_manifest(folder / MANIFEST):
            return folder
        if folder.name == CHECKPOINTS and (
            (folder / LEGACY).exists()
            or any(p.name.startswith(TAG_PREFIX) for p in _entries(folder))
            or any((folder.parent / name).exists() for name in RUN_FILES)
        ):
            return folder
    return None


def _is_manifest(path: Path) -> bool:
    """A distq manifest (a web app's ``manifest.json`` is not one)."""
    try:
        read_manifest(path)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return True


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def holds_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` is a run directory, its checkpoints folder or one checkpoint's folder."""
    return any((folder / name).exists() for name in (MANIFEST, STATE, LATEST, LEGACY, CHECKPOINTS))


def _step_of(tag: str) -> int:
    try:
        return int(tag[len(TAG_PREFIX) :])
    except ValueError:
        return -1


def say_on_stderr(line: str) -> None:
    """How eval and export tell which checkpoint they passed over: a line on stderr, so that
    stdout keeps only their results."""
    print(f"distq: {line}", file=sys.stderr, flush=True)


def load_state(path: str | Path, say: Callable[[str], None] = say_on_stderr) -> dict:
    """The rank-0 training state of a checkpoint: ``path`` is a run directory, its
    ``checkpoints`` folder, one checkpoint folder, its ``state.pt``, or a single-file
    checkpoint of an older distq (``last.pt``). See ``state_file``."""
    return read_state(state_file(path, say))


def state_file(path: str | Path, say: Callable[[str], None] = say_on_stderr) -> Path:
    """The file ``load_state`` reads for ``path``, checked against its checkpoint's manifest
    (sizes and sha256, as resuming checks them) wherever there is one: a run directory gives
    its newest complete checkpoint, and each newer one passed over is said in one line to
    ``say``; a checkpoint folder, or a ``state.pt`` in one, must be intact. A file without a
    manifest (``last.pt`` of an older distq, a ``state.pt`` copied out) is read as it is."""
    path = Path(path)
    if path.is_dir():
        return _state_file_in(path, say)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(path)!r} not found: pass a run directory or a checkpoint written by 'distq train' (RUN_DIR/checkpoints/step_*)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file: {_PASS_INSTEAD}")
    folder = path.parent
    if (folder / MANIFEST).exists():
        if path.name != STATE:
            raise CheckpointError(
                f"{str(path)!r} is not the training state of checkpoint {folder} (that is its {STATE}): pass the folder {folder}"
            )
        verified_checkpoint(folder, only=STATE, reading=True)
    elif path.name == STATE and folder.name.startswith(TAG_PREFIX):
        raise _incomplete(folder)
    return path


def read_state(path: Path) -> dict:
    """Load a training state file; every problem is a CheckpointError naming it."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error below says it all
            warnings.simplefilter("ignore")
            state = load_tensors(path)
    except Exception as exc:  # torch raises many types for a bad file (IndexError for an empty one, KeyError, OSError, ...)
        raise CheckpointError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or "models" not in state or "config" not in state:
        raise CheckpointError(
            _export_file(path) or f"checkpoint {str(path)!r} is not a distq training checkpoint (no models/config entries)"
        )
    if state.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {state['format']}, newer than this distq ({FORMAT_VERSION}): upgrade distq")
    return state


_PASS_INSTEAD = "pass a run directory or a checkpoint folder written by 'distq train' (RUN_DIR/checkpoints/step_*)"


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch could not load ``path``, in words that suit a user (never torch's advice to load
    with ``weights_only=False`` or to allowlist a class: either runs whatever code the file holds)."""
    what = f"checkpoint {str(path)!r}"
    message = str(exc)
    refused = "weights only load failed" in message.lower()
    foreign = (_foreign_globals(path) or re.findall(r"GLOBAL (\S+)", message)) if refused else []
    if foreign:
        return (
            f"{what} is not a distq checkpoint: it holds Python objects other than tensors ({', '.join(foreign[:3])}), "
            f"which distq never saves and which cannot be loaded safely; {_PASS_INSTEAD}"
        )
    export = _export_file(path)
    if export:
        return export
    with open(path, "rb") as f:
        head = f.read(1)
    if not head:
        return f"{what} is corrupt or not a distq checkpoint: it is empty; {_PASS_INSTEAD}"
    if not zipfile.is_zipfile(path) and head != b"\x80":  # torch.save writes a zip (a pickle before torch 1.6)
        return (
            f"{what} is corrupt or not a distq checkpoint: not a file written by torch.save, nor a run directory or "
            f"checkpoint folder; {_PASS_INSTEAD}"
        )
    reason = "its data is not tensors as torch.save writes them" if refused else (message.splitlines() or [type(exc).__name__])[0]
    return f"{what} is corrupt or not a distq checkpoint ({reason}); {_PASS_INSTEAD}"


_TENSOR_MODULES = ("torch", "collections", "builtins", "_codecs")
"""Where the classes and functions a pickle of plain tensors refers to come from."""


def _foreign_globals(path: Path) -> list[str]:
    """The classes and functions other than torch's that the pickle in ``path`` refers to, read
    with ``pickletools`` (which parses, never runs, the pickle); [] if it cannot be parsed."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        found, memo, pushed = [], {}, []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                found.append(f"{pushed[-2]}.{pushed[-1]}")
            if op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            elif op.name not in ("FRAME", "PROTO"):
                pushed.append(arg if isinstance(arg, str) else None)
    except Exception:  # not a pickle, or a damaged one: nothing to name
        return []
    return list(dict.fromkeys(g for g in found if g.split(".")[0] not in _TENSOR_MODULES))


def _export_file(path: Path) -> str | None:
    """What to do with ``path`` if it is an export file rather than a training checkpoint."""
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix.lower() == ".onnx":
        engine = "onnx"
    elif path.suffix.lower() == ".safetensors" or head[8:10] == b'{"':  # safetensors: a length, then its JSON header
        engine = "int"
    else:
        return None
    return f"checkpoint {str(path)!r} is an export file, not a training checkpoint: evaluate it with 'distq eval --engine {engine} {path}'"


def _incomplete(folder: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {folder} is incomplete: it has no {MANIFEST} (its writing was interrupted); {READ_FIX}")


def _state_file_in(folder: Path, say: Callable[[str], None]) -> Path:
    if (folder / MANIFEST).exists():
        return verified_checkpoint(folder, reading=True).state_path
    if (folder / STATE).is_file():
        if folder.name.startswith(TAG_PREFIX):
            raise _incomplete(folder)
        return folder / STATE  # a folder someone copied a state.pt into: nothing to check it against
    root = folder if (folder / LATEST).exists() or folder.name == CHECKPOINTS else checkpoint_dir(folder)
    store = CheckpointStore.at(root)
    if (root / LEGACY).is_file() and not (root / LATEST).exists() and not store._tag_folders():
        return root / LEGACY
    found = store.find(reading=True)
    if found is not None:
        for line in found.skipped:
            say(f"checkpoint {line}; using {found.folder.name}")
        return found.state_path
    if (root / LEGACY).is_file():
        return root / LEGACY
    raise CheckpointError(
        f"{folder} is not a run directory or checkpoint folder: it holds no checkpoint; {_PASS_INSTEAD}"
    )
