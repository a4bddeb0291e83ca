"""The per-sample log (``log.samples``): which training samples each rank used at each step.

A debugging aid that makes "every training sample exactly once per epoch" checkable across
kills, resumes and changes of the number of processes. Process start number A (counted over
the run) appends ``RUN_DIR/samples/start<A>-step<S>-rank<R>.jsonl`` on each rank R, S being the
step it started from; one line per micro-batch: ``{"epoch": E, "step": K, "indices": [...]}``.
A run that was killed trained its steps from S on again after the resume, so of start A only
the steps before the first step of every later start count (``read_sample_log``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FOLDER = "samples"
NAME = re.compile(r"start(\d+)-step(\d+)-rank(\d+)\.jsonl$")


def next_start(run_dir: Path) -> int:
    """The number of this process start (0 for the first): one more than any logged so far."""
    folder = Path(run_dir) / FOLDER
    starts = [int(m[1]) for p in folder.iterdir() if (m := NAME.search(p.name))] if folder.is_dir() else []
    return max(starts, default=-1) + 1


class SampleLog:
    def __init__(self, run_dir: Path, start: int, step: int, rank: int, enabled: bool):
        self.file = None
        if enabled:
            folder = Path(run_dir) / FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / f"start{start:03d}-step{step:08d}-rank{rank:05d}.jsonl", "a")

    def write(self, epoch: int, step: int, indices) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"epoch": epoch, "step": step, "indices": [int(i) for i in indices]}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_sample_log(run_dir: Path) -> dict[int, list[int]]:
    """Every sample index the finished run trained on, per epoch, over all ranks and starts."""
    files = [(int(m[1]), int(m[2]), p) for p in (Path(run_dir) / FOLDER).iterdir() if (m := NAME.search(p.name))]
    first_step = {start: step for start, step, _ in files}
    used: dict[int, list[int]] = {}
    for start, step, path in sorted(files):
        end = min((s for later, s in first_step.items() if later > start), default=float("inf"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if step <= record["step"] < end:
                used.setdefault(record["epoch"], []).extend(record["indices"])
    return used
