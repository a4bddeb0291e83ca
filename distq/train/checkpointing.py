"""Writing a training checkpoint as one atomic unit over all ranks, and choosing the one to resume.

Order of a save (every rank runs ``save``; the phases are ``distq.checkpoint.faults``'s)::

    every rank checks that what it saves is finite (rank 0: that run.dir is still its job's)   gather
    rank 0 empties the tag's folder            barrier
    rank 0 writes state.pt; every rank its optimizer shard     <- mid-shards (the last rank has not)
    rank 0 gathers every file's size and sha256 (and every rank's write error)   <- before-commit
    rank 0 writes TAG/manifest.json, then latest.json          <- after-commit
    rank 0 deletes checkpoints beyond run.keep_checkpoints     gather (its write error)

A refusal or a failed write (a full disk) is raised on every rank at the same point, so no
rank waits for another that has stopped.
"""

from __future__ import annotations

import errno
from pathlib import Path

from distq.checkpoint import CheckpointStore, Found, save_tensors, tag_for
from distq.checkpoint.faults import KillSwitch
from distq.checkpoint.finite import describe_nonfinite, nonfinite_entries
from distq.checkpoint.store import STATE
from distq.data.order import BatchLayout
from distq.distributed import Engine
from distq.errors import DistqError, SaidByRankZero
from distq.train.nonfinite import NONFINITE_EXIT_CODE, NonFiniteTraining


class Checkpointing:
    def __init__(self, run_dir: Path, keep: int):
        self.store = CheckpointStore(run_dir)
        self.keep = keep
        self.kill = KillSwitch()

    def save(self, engine: Engine, state: dict | None, meta: dict, epoch_progress: float, owner_check=None) -> Path:
        """Every rank: write this rank's part of the checkpoint of ``meta["step"]``; ``state``
        (the rank-0 training state) is used on rank 0 only. Nothing is written when a tensor to
        be saved is not finite, or when ``owner_check`` (rank 0) says run.dir is no longer this
        job's; a write that fails (a full disk) leaves the previous checkpoints as they were.
        Every rank raises the same error."""
        self.kill.begin_checkpoint(epoch_progress)
        tag = tag_for(meta["step"])
        main = engine.env.is_main
        folder = self.store.root / tag
        refusal = None
        if main and owner_check is not None:
            refusal = _attempt(owner_check, folder)
        bad = nonfinite_entries(state["models"], "models") if main else []
        bad += nonfinite_entries(engine.optimizer_fragments(), "optimizer")
        if bad and refusal is None:
            refusal = ("nonfinite", f"checkpoint {tag} not written: {describe_nonfinite(bad)}: the run diverged; "
                       "train again with a lower train.lr (a new run.dir, or --overwrite)")
        _raise_first(engine.gather_objects(refusal), main)

        error = _attempt(lambda: self.store.begin(tag), folder) if main else None
        engine.barrier()
        files = {}
        if main and error is None:
            error = _attempt(lambda: files.update({STATE: save_tensors(state, folder / STATE)}), folder)
        if engine.env.rank == engine.env.world - 1:
            self.kill.reached("mid-shards")  # the last rank dies before writing its shard ...
        if error is None:
            error = _attempt(lambda: files.update(engine.save_optimizer(folder)), folder)
        self.kill.reached("mid-shards")  # ... the others after theirs
        every_rank = engine.gather_objects((files, error))
        _raise_first([e for _, e in every_rank], main)
        self.kill.reached("before-commit")
        error = None
        if main:
            error = _attempt(lambda: self.store.commit(tag, engine.env.world, {k: v for f, _ in every_rank for k, v in f.items()}, meta), folder)
            if error is None:
                self.kill.reached("after-commit")
                self.store.prune(self.keep)
        else:
            self.kill.reached("after-commit")
        _raise_first(engine.gather_objects(error), main)
        return folder

    def find(self, resume: str | None) -> Found | None:
        """The checkpoint ``--resume`` asks for: None (fresh), "auto" (the run's newest complete
        one, if any) or the path of a run directory or checkpoint folder."""
        if resume is None:
            return None
        if resume == "auto":
            return self.store.find()
        path = Path(resume)
        if path.is_file() and path.name == STATE:
            path = path.parent
        store = CheckpointStore(path.parent if path.name == "checkpoints" else path)
        if (path / "manifest.json").is_file():  # one checkpoint folder: exactly that one
            store = CheckpointStore(path.parent.parent)
            found = store.find_tag(path.name)
        else:
            found = store.find()
        if found is None:
            raise DistqError(f"--resume {resume}: no checkpoint there: pass 'auto', a run directory or a checkpoint folder (RUN_DIR/checkpoints/step_*)")
        return found


def _attempt(write, folder: Path) -> tuple[str, str] | None:
    """Run ``write``; a refusal or a failed write becomes (kind, one-line message)."""
    try:
        write()
    except DistqError as exc:
        return ("refused", str(exc))
    except OSError as exc:
        why = "no space left on the device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        return (
            "write",
            f"checkpoint {folder} could not be written ({why}): nothing is lost, the checkpoints before it are intact; "
            "free the space (or fix the folder) and continue with --resume auto",
        )
    return None


def _raise_first(errors: list, main: bool) -> None:
    """Every rank: raise the first rank's error, if any rank has one (rank 0 reports it)."""
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    kind, message = first
    if not main:
        raise SaidByRankZero(message, NONFINITE_EXIT_CODE if kind == "nonfinite" else 2)
    raise NonFiniteTraining(message) if kind == "nonfinite" else DistqError(message)


def resume_layout(found: Found, configured: BatchLayout, max_micro_batch: int, explicit_global_batch: int | None) -> BatchLayout:
    """The batch layout that continues ``found`` on this run's processes: its global batch is kept."""
    saved = int(found.manifest.meta["global_batch"])
    if explicit_global_batch is not None and explicit_global_batch != saved:
        raise DistqError(
            f"checkpoint {found.folder} trained with a global batch of {saved} and a resumed run keeps it: "
            f"remove train.global_batch={explicit_global_batch}, or start a fresh run.dir to change it"
        )
    if configured.global_batch == saved:
        return configured
    return BatchLayout.split(saved, configured.world, max_micro_batch, f"checkpoint {found.folder}")
