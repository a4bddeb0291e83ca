"""What a run directory holds, and the files distq writes there.

A directory that holds a run is never trained into by accident: without ``--resume`` the
trainer refuses it (``refusal``), and ``--overwrite`` deletes the old run's files first
(``clear``), so no step of the old run can outrank one of the new.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from distq.checkpoint import CheckpointError, CheckpointStore
from distq.checkpoint.store import RUN_FILES
from distq.errors import DistqError
from distq.train.sample_log import FOLDER as SAMPLES
from distq.train.tb import FOLDER as TENSORBOARD

CONFIG, RESULTS = RUN_FILES
RESUMED_CONFIG = "config.resume-{n}.yaml"
"""The effective config of the n-th resume (config.yaml stays the run's original)."""
RUN_FOLDERS = ("checkpoints", TENSORBOARD, SAMPLES)


def prepare(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents); a path that cannot hold a run is one error line."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".distq-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise DistqError(f"run.dir {run_dir} is a file, not a folder: choose another run.dir") from None
    except NotADirectoryError:
        parent = next((p for p in run_dir.parents if p.is_file()), run_dir.parent)
        raise DistqError(f"run.dir {run_dir} cannot be created: {parent} is a file, not a folder; choose another run.dir") from None
    except PermissionError:
        raise DistqError(f"run.dir {run_dir} cannot be written (permission denied): choose a writable run.dir") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise DistqError(f"run.dir {run_dir} is on a read-only file system: choose a writable run.dir") from None
        if exc.errno == errno.ENOSPC:
            raise DistqError(f"run.dir {run_dir}: no space left on the device: free some space or choose another run.dir") from None
        raise DistqError(f"run.dir {run_dir} cannot be used ({exc.strerror}): choose another run.dir") from None


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES) or any(_nonempty(run_dir / name) for name in RUN_FOLDERS)


def describe(run_dir: Path) -> str:
    """What the run in ``run_dir`` is: finished or not, at which step."""
    try:
        found = CheckpointStore(run_dir).find()
    except CheckpointError:
        found = None
    results = _results(run_dir)
    if found is not None:
        meta = found.manifest.meta
        where = f"epoch {meta.get('epoch', '?')}, step {meta.get('step', '?')}"
        if results is not None and results.get("steps") == meta.get("step"):
            top1 = results.get("val/top1")
            accuracy = f", val top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else ""
            return f"a finished run ({results.get('epochs')} epochs, step {results.get('steps')}{accuracy})"
        return f"an unfinished run (newest checkpoint at {where})"
    if results is not None:
        return f"a finished run ({results.get('epochs')} epochs, step {results.get('steps')}) whose checkpoints are gone"
    present = [name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists()]
    return f"files of an earlier run without a usable checkpoint ({', '.join(present)})"


def refusal(run_dir: Path) -> DistqError:
    return DistqError(
        f"run.dir {run_dir} holds {describe(run_dir)}: continue it with --resume auto, or choose a new run.dir; "
        "--overwrite deletes it and starts over"
    )


def clear(run_dir: Path) -> list[str]:
    """Delete the files of the run in ``run_dir`` (checkpoints, TensorBoard events, sample logs,
    configs and results) and nothing else; returns what was deleted."""
    deleted = []
    for name in RUN_FOLDERS:
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
            deleted.append(name + "/")
    for path in [*(run_dir / name for name in RUN_FILES), *sorted(run_dir.glob(RESUMED_CONFIG.format(n="*")))]:
        if path.exists():
            path.unlink()
            deleted.append(path.name)
    return deleted


def next_resumed_config(run_dir: Path) -> Path:
    n = 1
    while (run_dir / RESUMED_CONFIG.format(n=n)).exists():
        n += 1
    return run_dir / RESUMED_CONFIG.format(n=n)


def _nonempty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _results(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return None

