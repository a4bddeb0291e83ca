"""Training-loader throughput: DALI (``data.loader=dali``) against torchvision, same files and settings.

    python benchmarks/data_loading.py [--images 2000] [--workers 2] [--batch-size 64] [--epochs 3]

Writes (once, cached under ``$DISTQ_CACHE`` or ~/.cache/distq) an ImageNet-layout folder of
synthetic photo-like JPEGs around 500x375 (about 100 KB each, like ImageNet's), then times
one warm-up epoch and ``--epochs`` timed epochs of each loader's train split (224 px
RandomResizedCrop + flip + normalize), as built for training by ``distq.data.build_loaders``.
torchvision gets ``--workers`` worker processes, DALI as many threads. Prints images per second
and per CPU second with their DALI/torchvision ratios, and appends a section to BENCHMARKS.md
at the repository root.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distq.cache import default_cache_dir
from distq.config.schema import DataConfig
from distq.data import build_loaders

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10
VAL_PER_CLASS = 2  # the builders need a val split; it is not timed


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour regions, texture and grain: decodes and compresses like a photo, not like noise."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    fine = rng.integers(0, 256, (height // 3, width // 3, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(fine).resize((width, height), Image.BILINEAR), dtype=np.float32) - 128
    pixels = base + 0.5 * texture + rng.normal(0, 8, (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photo(job: tuple[Path, int]) -> None:
    """One JPEG of the benchmark folder, from its own seed: any worker can write any image."""
    path, index = job
    rng = np.random.default_rng((0, index))
    width, height = int(rng.integers(440, 501)), int(rng.integers(330, 376))
    if index % 5 == 0:  # some portrait images, as in ImageNet
        width, height = height, width
    photo_like(rng, width, height).save(path, quality=90)


def ensure_dataset(num_images: int) -> Path:
    """The benchmark folder, written on first use (by all cores) under a temporary name and renamed into place."""
    root = default_cache_dir() / f"bench-photos-{num_images}-v2"
    if (root / "COMPLETE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bench-photos-", dir=root.parent))
    total = num_images + CLASSES * VAL_PER_CLASS
    print(f"writing {total} JPEGs to {root} (once, {os.cpu_count()} processes) ...", flush=True)
    jobs = []
    for index in range(total):
        folder = staging / ("train" if index < num_images else "val") / f"class_{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{index:06d}.JPEG", index))
    try:
        with multiprocessing.get_context("spawn").Pool() as pool:
            for done, _ in enumerate(pool.imap_unordered(write_photo, jobs, chunksize=16), 1):
                if done % 1000 == 0:
                    print(f"  {done}/{total}", flush=True)
        (staging / "COMPLETE").write_text("ok\n")
        os.rename(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def cpu_seconds() -> float:
    """CPU time of this process (DALI's threads) and of its finished children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(cfg: DataConfig, epochs: int) -> dict[str, float]:
    """Images per wall-clock second and per CPU second over the timed epochs, set-up included.

    On a machine shared with other jobs, wall-clock rates depend on their load; CPU time per
    image hardly does, so both are reported.
    """
    bundle = build_loaders(cfg, seed=0)

    def epoch(number: int) -> None:
        bundle.start_epoch(0, number)
        for images, *_ in bundle.train:  # workers exit at the end of the epoch, so their CPU time counts
            assert images.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)

    start = time.perf_counter()
    epoch(0)
    warm_up = time.perf_counter() - start
    wall, cpu = time.perf_counter(), cpu_seconds()
    for number in range(1, epochs + 1):
        epoch(number)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    images = epochs * len(bundle.train) * cfg.batch_size
    return {"images/s": images / wall, "images/CPU-s": images / cpu, "warm-up epoch (s)": warm_up}


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {gpu}"


def append_report(text: str) -> Path:
    path = REPO_ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured numbers, each with the machine and the exact command behind it.\n")
    with open(path, "a") as f:
        f.write("\n" + text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="training images (10 classes)")
    parser.add_argument("--workers", type=int, default=2, help="torchvision worker processes = DALI threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    root = ensure_dataset(args.images)
    load_before = os.getloadavg()[0]
    results = {}
    for loader in ("torchvision", "dali"):
        cfg = DataConfig(root=str(root), loader=loader, image_size=224, batch_size=args.batch_size, workers=args.workers)
        results[loader] = throughput(cfg, args.epochs)
        print(f"{loader:12s}", "  ".join(f"{value:7.1f} {name}" for name, value in results[loader].items()), flush=True)
    load_after = os.getloadavg()[0]
    ratios = {name: results["dali"][name] / results["torchvision"][name] for name in ("images/s", "images/CPU-s")}
    print("DALI / torchvision:", ", ".join(f"{ratio:.2f}x in {name}" for name, ratio in ratios.items()))

    if args.no_report:
        return
    import nvidia.dali
    import torchvision

    command = "python benchmarks/data_loading.py" + (
        f" --images {args.images} --workers {args.workers} --batch-size {args.batch_size} --epochs {args.epochs}"
    )
    report = "\n".join(
        [
            f"## Training data loading: DALI vs torchvision ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            f"- Machine: {machine()}; DALI runs CPU-only pipelines. Load average {load_before:.1f} before, "
            f"{load_after:.1f} after (other jobs were {'running' if max(load_before, load_after) > 1.0 else 'idle'}).",
            f"- Versions: DALI {nvidia.dali.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}.",
            f"- Command: `{command}`",
            f"- Data: {args.images} synthetic photo-like JPEGs of about 500x375 (~100 KB), 10 classes; 224 px "
            f"RandomResizedCrop + flip + normalize, batch {args.batch_size}, {args.workers} workers / threads; "
            f"one warm-up epoch, then {args.epochs} timed epochs (per-epoch set-up included).",
            "",
            "| loader | " + " | ".join(results["dali"]) + " |",
            "|---|" + "---:|" * len(results["dali"]),
            *(f"| {loader} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |" for loader, row in results.items()),
            "",
            f"DALI / torchvision: **{ratios['images/s']:.2f}x** in images/s (target >= 1.5x), "
            f"{ratios['images/CPU-s']:.2f}x in images per CPU second.",
            "",
        ]
    )
    print(f"appended to {append_report(report)}")


if __name__ == "__main__":
    main()
