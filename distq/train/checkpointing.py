"""Writing a training checkpoint as one atomic unit over all ranks, and choosing the one to resume.

Order of a save (every rank runs ``save``; the phases are ``distq.checkpoint.faults``'s)::

    rank 0 empties the tag's folder            barrier
    rank 0 writes state.pt; every rank its optimizer shard     <- mid-shards (the last rank has not)
    rank 0 gathers every file's size and sha256                <- before-commit
    rank 0 writes TAG/manifest.json, then latest.json          <- after-commit
    rank 0 deletes checkpoints beyond run.keep_checkpoints     barrier
"""

from __future__ import annotations

from pathlib import Path

from distq.checkpoint import CheckpointStore, Found, save_tensors, tag_for
from distq.checkpoint.faults import KillSwitch
from distq.checkpoint.store import STATE
from distq.data.order import BatchLayout
from distq.distributed import Engine
from distq.errors import DistqError


class Checkpointing:
    def __init__(self, run_dir: Path, keep: int):
        self.store = CheckpointStore(run_dir)
        self.keep = keep
        self.kill = KillSwitch()

    def save(self, engine: Engine, state: dict | None, meta: dict, epoch_progress: float) -> Path:
        """Every rank: write this rank's part of the checkpoint of ``meta["step"]``; ``state``
        (the rank-0 training state) is used on rank 0 only."""
        self.kill.begin_checkpoint(epoch_progress)
        tag = tag_for(meta["step"])
        main = engine.env.is_main
        folder = self.store.root / tag
        if main:
            self.store.begin(tag)
        engine.barrier()
        files = {}
        if main:
            files[STATE] = save_tensors(state, folder / STATE)
        if engine.env.rank == engine.env.world - 1:
            self.kill.reached("mid-shards")  # the last rank dies before writing its shard ...
        files.update(engine.save_optimizer(folder))
        self.kill.reached("mid-shards")  # ... the others after theirs
        every_rank = engine.gather_objects(files)
        self.kill.reached("before-commit")
        if main:
            self.store.commit(tag, engine.env.world, {k: v for f in every_rank for k, v in f.items()}, meta)
            self.kill.reached("after-commit")
            self.store.prune(self.keep)
        else:
            self.kill.reached("after-commit")
        engine.barrier()
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
