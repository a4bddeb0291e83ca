"""Checkpoint write and resume: time and bytes on disk, for ResNet-50 guided training (FP guide
+ W4A4 student, 1000 classes: 2 x 25.6M parameters), 2 processes on the CPU (gloo, ZeRO-2).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/checkpoint_io.py [--optimizer sgd|adamw] [--rounds 3]

Measured, after one real training step (so the optimizer has its state):

- distq's checkpoint (``Trainer.save``: rank 0's training state + every rank's share of the
  engine-independent optimizer state + the manifest), and its resume on 2 processes
  (``Checkpointing.find``, which checks every file's sha256, + ``Trainer.resume``) and on 1
  process (another process, the merged state re-partitioned for a plain PyTorch optimizer);
- DeepSpeed's own checkpoint (``save_checkpoint``: ZeRO shards + model states), its resume on the
  same 2 processes (``load_checkpoint``), and what another world size needs: the conversion to a
  universal checkpoint (``deepspeed.checkpoint.ds_to_universal``) and ``load_universal``.

Times are medians over ``--rounds`` (rank 0's wall time, ranks synchronised before and after).
Prints a Markdown table; ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distq.config import load_config  # noqa: E402
from distq.distributed import close_process_group  # noqa: E402
from distq.train.trainer import Trainer  # noqa: E402


def tiny_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for n in range(8):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{n}.JPEG")
    return root


def config(run_dir: Path, data: Path, optimizer: str):
    return load_config(
        REPO / "configs" / "imagenet_resnet50_w4a4_guided.yaml",
        [f"run.dir={run_dir}", f"data.root={data}", "data.loader=torchvision", "data.image_size=32", "data.batch_size=2",
         "data.workers=0", "model.num_classes=1000", "dist.zero_stage=2", f"train.optimizer={optimizer}", "log.tensorboard=false",
         "log.progress=false", "run.keep_checkpoints=1"],
    )  # fmt: skip


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed(trainer: Trainer, fn) -> float:
    trainer.engine.barrier()
    start = time.perf_counter()
    fn()
    trainer.engine.barrier()
    return time.perf_counter() - start


def one_step(trainer: Trainer) -> None:
    trainer.data.start_epoch(0)
    images, labels, _ = next(iter(trainer.data.train))
    trainer.engine.team.train()
    trainer.train_step(images, labels)


def resume_in_another_process(run_dir: Path, data: Path, optimizer: str) -> float:
    """distq's resume of the 2-process checkpoint on 1 process, in a fresh interpreter."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from benchmarks.checkpoint_io import config\nfrom distq.train.trainer import Trainer\nfrom pathlib import Path\n"
        f"t = Trainer(config(Path({str(run_dir)!r}), Path({str(data)!r}), {optimizer!r}), resume='auto')\n"
        "start = time.perf_counter(); t.found = t.checkpoints.find('auto'); t.resume(); print(time.perf_counter() - start)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    work = Path(os.environ.get("CHECKPOINT_BENCH_DIR") or tempfile.gettempdir()) / f"distq-checkpoint-bench-{args.optimizer}"
    data = tiny_folder(work / f"data-{rank}")
    run_dir = work / "run"
    if rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = config(run_dir, data, args.optimizer)
    trainer = Trainer(cfg)
    one_step(trainer)
    rows: dict[str, dict] = {}

    saves = [timed(trainer, trainer.save) for _ in range(args.rounds)]
    distq_folder = trainer.checkpoints.store.find().folder
    rows["distq: write (2 processes)"] = {"seconds": statistics.median(saves), "bytes": folder_bytes(distq_folder)}

    again = Trainer(cfg, resume="auto")  # built once: the models and engine are not the checkpoint's cost

    def distq_resume():
        again.found = again.checkpoints.find("auto")  # with every file's checksum
        again.resume()

    rows["distq: resume on 2 processes"] = {"seconds": statistics.median(timed(trainer, distq_resume) for _ in range(args.rounds))}
    if rank == 0:
        rows["distq: resume on 1 process"] = {"seconds": statistics.median(resume_in_another_process(run_dir, data, args.optimizer) for _ in range(args.rounds))}

    ds_engine = trainer.engine.engine
    # DeepSpeed's converter needs this attribute (Megatron-style clients set it; nothing to declare here).
    ds_engine.module.universal_checkpoint_info = {}
    ds_dir = run_dir / "deepspeed"
    ds_saves = [timed(trainer, lambda: ds_engine.save_checkpoint(str(ds_dir), tag="bench")) for _ in range(args.rounds)]
    rows["DeepSpeed: write (2 processes)"] = {"seconds": statistics.median(ds_saves), "bytes": folder_bytes(ds_dir / "bench")}
    loads = [timed(trainer, lambda: ds_engine.load_checkpoint(str(ds_dir), tag="bench", load_module_strict=False)) for _ in range(args.rounds)]
    rows["DeepSpeed: resume on 2 processes"] = {"seconds": statistics.median(loads)}

    failure = None
    if rank == 0:
        start = time.perf_counter()
        converted = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_dir / "bench"),
             "--output_folder", str(ds_dir / "bench_universal"), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if converted.returncode == 0:
            rows["DeepSpeed: universal conversion (1 process)"] = {"seconds": seconds, "bytes": folder_bytes(ds_dir / "bench_universal")}
        else:
            failure = next((line for line in reversed(converted.stderr.splitlines()) if line.strip()), "failed")
            rows["DeepSpeed: universal conversion (1 process)"] = {"failed": failure}
    failure = trainer.engine.gather_objects(failure)[0]
    if failure is None:
        ds_engine._config.load_universal_checkpoint = True
        seconds = timed(trainer, lambda: ds_engine.load_checkpoint(str(ds_dir), tag="bench_universal", load_module_strict=False))
        rows["DeepSpeed: resume universal on 2 processes"] = {"seconds": seconds}

    if rank == 0:
        print(f"\nResNet-50 guided (guide + W4A4 student, 1000 classes), {args.optimizer}, 2 CPU processes, ZeRO-2, median of {args.rounds}\n")
        print("| what | seconds | MB on disk |")
        print("|---|---|---|")
        for what, row in rows.items():
            seconds = f"{row['seconds']:.2f}" if "seconds" in row else f"failed: {row['failed'][:120]}"
            size = f"{row['bytes'] / 1e6:.0f}" if "bytes" in row else ""
            print(f"| {what} | {seconds} | {size} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"optimizer": args.optimizer, "rounds": args.rounds, "rows": rows}, indent=1))
    close_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
