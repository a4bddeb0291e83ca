"""Training-loader throughput from shards (``data.format=shards``) against folders, DALI and
torchvision, and the number of files each layout puts on disk.

    python benchmarks/shard_loading.py [--images 2000] [--workers 2] [--batch-size 64] [--rounds 3] [--shard-size 50MB]

Uses the photo-like JPEGs of ``data_loading.py`` (about 500x375, ~100 KB, written once under
``$DISTQ_CACHE``), packs them once with ``distq data pack`` (``--shard-size``: small enough for
several shards), then times one training epoch of each of the four loaders (224 px
RandomResizedCrop + flip + normalize, as built for training by ``distq.data.build_loaders``),
round-robin for ``--rounds`` rounds after a warm-up epoch each (``timing.time_interleaved``):
images per second and per CPU second (DataLoader workers included), and the shards / folders
ratio per loader (median over rounds of the per-round ratio). Files on disk are counted here and
computed at ImageNet-1k's size (1,281,167 + 50,000 images, 1 GB shards, this pack's bytes per
image). Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_loading import ensure_dataset  # noqa: E402
from timing import REPORT, context_lines, time_interleaved, write_section  # noqa: E402

from distq.config.schema import DataConfig  # noqa: E402
from distq.data import build_loaders  # noqa: E402
from distq.data.pack import DEFAULT_SHARD_BYTES, pack, parse_size  # noqa: E402
from distq.data.shards import INDEX  # noqa: E402

TITLE = "Training data loading: shards vs folders"
# ImageNet-1k: images and bytes of the official archives' images per split.
IMAGENET = {"train": (1_281_167, 147_897_477_120), "val": (50_000, 6_744_924_160)}
LOADERS, FORMATS = ("dali", "torchvision"), ("folders", "shards")


def cpu_seconds_with_children() -> float:
    """CPU time of this process (DALI's threads) and of its finished children (DataLoader workers, which exit each epoch)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ensure_shards(root: Path, shard_bytes: int) -> Path:
    """``root`` packed into shards of ``shard_bytes``, once (next to it in the cache)."""
    out = root.parent / f"{root.name}-shards-{shard_bytes}"
    if not (out / INDEX).is_file():
        print(f"packing {root} into {out} ...", flush=True)
        pack(root, out, shard_bytes=shard_bytes, progress=False)
    return out


def files_under(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``, its COMPLETE marker aside."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETE"]
    return len(files), sum(p.stat().st_size for p in files)


def imagenet_files(root: Path, shards: Path) -> tuple[int, int]:
    """Files of ImageNet-1k as folders and as 1 GB shards: its images' bytes plus this pack's
    tar overhead per image (headers, label member, padding)."""
    import json

    index = json.loads((shards / INDEX).read_text())
    folders, packed = 0, 1  # + index.json
    for split, (images, image_bytes) in IMAGENET.items():
        entry = index["splits"][split]
        overhead = (sum(s["bytes"] for s in entry["shards"]) - files_under(root / split)[1]) / entry["samples"]
        folders += images
        packed += 2 * math.ceil((image_bytes + images * overhead) / DEFAULT_SHARD_BYTES)  # a tar and its DALI index each
    return folders, packed


def epoch_runner(cfg: DataConfig):
    bundle = build_loaders(cfg, seed=0)
    state = {"epoch": 0, "images": 0}

    def run() -> None:
        bundle.start_epoch(state["epoch"])
        state["epoch"] += 1
        images = 0
        for batch, *_ in bundle.train:
            assert batch.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
            images += batch.shape[0]
        state["images"] = images

    return run, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="training images (10 classes)")
    parser.add_argument("--workers", type=int, default=2, help="torchvision worker processes = DALI threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs of each loader, round-robin, after one warm-up epoch each")
    parser.add_argument("--shard-size", default="50MB", help="shard size of the pack (several shards of the benchmark's images)")
    parser.add_argument("--report", type=Path, default=REPORT, help="the BENCHMARKS.md to write the section into")
    parser.add_argument("--no-report", action="store_true", help="print only")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    roots = {"folders": ensure_dataset(args.images)}
    roots["shards"] = ensure_shards(roots["folders"], parse_size(args.shard_size))
    variants, states = {}, {}
    for loader in LOADERS:
        for fmt in FORMATS:
            cfg = DataConfig(root=str(roots[fmt]), format=fmt, loader=loader, image_size=224, batch_size=args.batch_size, workers=args.workers)
            variants[f"{loader}|{fmt}"], states[f"{loader}|{fmt}"] = epoch_runner(cfg)
    timings = time_interleaved(variants, args.rounds, cpu_clock=cpu_seconds_with_children)

    rows, ratios = [], {}
    for name in variants:
        images = states[name]["images"]
        rows.append((*name.split("|"), images / timings.median(name, "wall"), images / timings.median(name, "cpu")))
    for loader in LOADERS:
        ratios[loader] = {clock: 1 / timings.ratio(f"{loader}|shards", f"{loader}|folders", clock) for clock in ("wall", "cpu")}
        per_round = [b / a for a, b in zip(timings.runs[f"{loader}|shards"]["wall"], timings.runs[f"{loader}|folders"]["wall"])]
        ratios[loader]["range"] = f"{min(per_round):.2f}..{max(per_round):.2f}"
    disk = {fmt: files_under(root) for fmt, root in roots.items()}
    at_imagenet = imagenet_files(roots["folders"], roots["shards"])
    lines = [f"{loader:12s} {fmt:8s} {wall:7.1f} images/s {cpu:7.1f} images/CPU-s" for loader, fmt, wall, cpu in rows]
    lines += [f"{loader}: shards / folders {r['wall']:.2f}x images/s (rounds {r['range']}), {r['cpu']:.2f}x images/CPU-s" for loader, r in ratios.items()]
    lines += [f"files on disk: folders {disk['folders'][0]}, shards {disk['shards'][0]}; at ImageNet-1k size {at_imagenet[0]} vs {at_imagenet[1]} ({at_imagenet[0] / at_imagenet[1]:.0f}x fewer)"]
    print("\n".join(lines), flush=True)
    if args.no_report:
        return

    import nvidia.dali
    import torchvision

    command = f"python benchmarks/shard_loading.py --images {args.images} --workers {args.workers} --batch-size {args.batch_size} --rounds {args.rounds} --shard-size {args.shard_size}"
    body = [
        *context_lines(command, None, load_before),
        f"- Also: DALI {nvidia.dali.__version__} (CPU-only pipelines), torchvision {torchvision.__version__}, commit {commit()}.",
        f"- Data: {args.images} photo-like JPEGs of about 500x375 (~100 KB, `data_loading.py`'s), 10 classes; shards of {args.shard_size} "
        f"written by `distq data pack`. 224 px RandomResizedCrop + flip + normalize, batch {args.batch_size}, {args.workers} workers / threads; "
        f"one warm-up epoch per loader, then {args.rounds} epochs of each, round-robin (per-epoch set-up included).",
        "",
        "| loader | format | images/s | images/CPU-s |",
        "|---|---|---:|---:|",
        *(f"| {loader} | {fmt} | {wall:.1f} | {cpu:.1f} |" for loader, fmt, wall, cpu in rows),
        "",
        *(f"- {loader}: shards / folders **{r['wall']:.2f}x** in images/s (median of the per-round ratios; rounds {r['range']}), "
          f"{r['cpu']:.2f}x in images per CPU second." for loader, r in ratios.items()),  # fmt: skip
        f"- Files on disk: folders {disk['folders'][0]} ({disk['folders'][1] / 1e6:.0f} MB), shards {disk['shards'][0]} "
        f"({disk['shards'][1] / 1e6:.0f} MB: tars, DALI index files, index.json). At ImageNet-1k size (1,331,167 images, "
        "the official archives' 154.6 GB of images plus this pack's tar overhead per image) with 1 GB shards: "
        f"{at_imagenet[0]:,} files vs {at_imagenet[1]:,}, **{at_imagenet[0] / at_imagenet[1]:.0f}x fewer** (target >= 1000x).",
        "- Target: shards at least as fast as folders with DALI (>= 1.0x).",
    ]
    print(f"wrote {write_section(TITLE, chr(10).join(body), args.report)}")


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
