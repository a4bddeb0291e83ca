"""Where does accuracy go when a run moves from one process to two? Guided W4A4 on the digits
(FP guide + W4A4 student, global batch 64, 15 epochs), several seeds, in five settings:

    one        1 process, 64 images per step (the reference)
    one-32x2   1 process, 32 images x 2 accumulation steps (batch-norm over 32 images)
    two        2 processes x 32 images (DeepSpeed ZeRO-1), plain batch-norm
    two-sync   2 processes x 32 images, dist.sync_bn=true
    two-clip1  2 processes x 32 images, train.grad_clip=1.0: what DeepSpeed 0.19 did by default
               before distq set its gradient clipping explicitly

    python benchmarks/scaling_accuracy.py [--seeds 0 1 2] [--settings one two ...] [--out DIR]

Each run is `distq train configs/digits_resnet18_w4a4_guided.yaml` (torchrun for two
processes, one thread per process); results (student and guide val top-1) go to
DIR/results.json, and finished runs are not repeated. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits_resnet18_w4a4_guided.yaml"
COMMON = ["data.workers=0", "log.progress=false", "log.tensorboard=false"]
SETTINGS = {
    "one": (1, ["data.batch_size=64"]),
    "one-32x2": (1, ["data.batch_size=32", "dist.grad_accum=2"]),
    "two": (2, ["data.batch_size=32"]),
    "two-sync": (2, ["data.batch_size=32", "dist.sync_bn=true"]),
    "two-clip1": (2, ["data.batch_size=32", "train.grad_clip=1.0"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(setting: str, seed: int, out: Path) -> dict:
    processes, overrides = SETTINGS[setting]
    run_dir = out / f"{setting}-seed{seed}"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}", "-m", "distq"]
    command = [*(launcher if processes > 1 else [sys.executable, "-m", "distq"]), "train", CONFIG, *COMMON, *overrides, f"seed={seed}", f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out / f"{setting}-seed{seed}.log", "w") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{setting} seed {seed} failed: see {out / f'{setting}-seed{seed}.log'}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"student": results["val/top1"], "guide": results["models"]["guide"]["val/top1"], "wall_time_s": results["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "scaling_accuracy")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for setting in args.settings:
        for seed in args.seeds:
            key = f"{setting}/{seed}"
            if key not in results:
                results[key] = run(setting, seed, args.out)
                store.write_text(json.dumps(results, indent=1))
                print(f"{key}: {results[key]}", flush=True)
    print("\n| setting | student val top-1 (mean ± std) | per seed | guide val top-1 (mean) |")
    print("|---|---|---|---|")
    for setting in args.settings:
        rows = [results[f"{setting}/{seed}"] for seed in args.seeds]
        students = [r["student"] for r in rows]
        spread = statistics.stdev(students) if len(students) > 1 else 0.0
        print(f"| {setting} | {statistics.mean(students):.2f} ± {spread:.2f} | {' / '.join(f'{s:.2f}' for s in students)} | "
              f"{statistics.mean(r['guide'] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
