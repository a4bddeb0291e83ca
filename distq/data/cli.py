"""``distq data prepare | verify | pack``: the dataset commands.

``add_commands`` is all that ``distq.cli`` calls; each command imports its module when it runs.
"""

from __future__ import annotations

import argparse

MAX_PIXELS_HELP = "refuse images larger than N pixels (width x height), as training does (default: data.max_image_pixels's default)"
EPILOG = """examples:
  distq data prepare --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
      --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet
  distq data prepare --train ILSVRC/Data/CLS-LOC/train --val ILSVRC/Data/CLS-LOC/val --out /data/imagenet
  distq data verify /data/imagenet --fix
  distq data pack /data/imagenet --out /data/imagenet-shards
  distq train CONFIG data.format=shards data.root=/data/imagenet-shards
"""


def add_commands(sub) -> None:
    """Register ``data`` and its subcommands on the main parser's subparsers."""
    data = sub.add_parser(
        "data",
        help="prepare ImageNet from its archives, verify a dataset folder, pack it into shards",
        description="Dataset commands: lay ImageNet out as class folders, check a folder, pack it into webdataset shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="ImageNet's official archives (or the extracted layout) as ROOT/{train,val}/<wnid>/*.JPEG",
        description="Write ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG and ROOT/class_names.json, then verify ROOT. "
        "Idempotent; an interrupted run resumes without redoing finished classes.",
    )
    prepare.add_argument("--train", required=True, metavar="TAR|DIR", help="ILSVRC2012_img_train.tar, or a folder of extracted class folders")
    prepare.add_argument("--val", required=True, metavar="TAR|DIR", help="ILSVRC2012_img_val.tar, or a flat folder of val images (with LOC_val_solution.csv)")
    prepare.add_argument("--devkit", metavar="TGZ", help="ILSVRC2012_devkit_t12.tar.gz: class names and the val archive's labels")
    prepare.add_argument("--val-labels", metavar="CSV", help="LOC_val_solution.csv of a flat val folder (default: found next to it or above)")
    prepare.add_argument("--synsets", metavar="TXT", help="LOC_synset_mapping.txt, class names without a devkit (default: found next to the val folder or above)")
    prepare.add_argument("--out", required=True, metavar="ROOT", help="the dataset folder to write")
    prepare.add_argument("--skip-md5", action="store_true", help="do not compare the archives' MD5 with the official ones (test miniatures, copies you checked)")
    prepare.add_argument("--workers", type=int, metavar="N", help="processes decoding images for the verification (default: all cores)")
    prepare.set_defaults(func=_prepare)

    verify = commands.add_parser(
        "verify",
        help="report image counts, undecodable files, one-split classes and odd files (CMYK, grayscale, PNG as .JPEG)",
        description="Decode every image of ROOT/{train,val}/<class>/ and report in one place; of a shards folder (SHARDS/index.json), "
        "check it against its index and every shard's checksum (and with --decode decode every image). "
        "Exit status 1 when something is left to fix.",
    )
    verify.add_argument("root", metavar="ROOT", help="an ImageNet-layout folder, or a shards folder written by distq data pack")
    verify.add_argument("--fix", action="store_true", help="re-encode CMYK, grayscale and non-JPEG files as RGB JPEGs, in place")
    verify.add_argument("--decode", action="store_true", help="of a shards folder: also decode every image (a folder's images are always decoded)")
    verify.add_argument("--workers", type=int, metavar="N", help="decoding processes (default: all cores)")
    verify.add_argument("--max-image-pixels", type=int, metavar="N", help=MAX_PIXELS_HELP)
    verify.set_defaults(func=_verify)

    pack = commands.add_parser(
        "pack",
        help="pack a dataset folder into webdataset shards with DALI index files and index.json",
        description="Decode every image of ROOT, then write SHARDS/{train,val}-NNNNNN.tar (webdataset: KEY.jpg + KEY.cls), "
        "their DALI index files, and SHARDS/index.json (classes, samples per shard, checksums) last. A file that does not decode "
        "(or cannot be read, or is too large) stops the pack with nothing written. Train with data.format=shards data.root=SHARDS.",
    )
    pack.add_argument("root", metavar="ROOT", help="an ImageNet-layout folder (train/ and val/ of class folders)")
    pack.add_argument("--out", required=True, metavar="SHARDS", help="the shards folder to write (new or empty)")
    pack.add_argument("--shard-size", default="1GB", metavar="SIZE", help="about this many bytes per shard, e.g. 1GB, 500MB (default: 1GB)")
    pack.add_argument("--seed", type=int, default=0, help="seed of the order the training images are packed in (default: 0)")
    pack.add_argument("--no-decode", action="store_true", help="pack the files without decoding them (faster; check later with distq data verify SHARDS --decode)")
    pack.add_argument("--max-image-pixels", type=int, metavar="N", help=MAX_PIXELS_HELP)
    pack.set_defaults(func=_pack)


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _prepare(args: argparse.Namespace) -> int:
    from distq.data.imagenet import prepare
    from distq.data.verify import verify

    _print(prepare(args.out, args.train, args.val, args.devkit, args.val_labels, args.synsets, check_md5=not args.skip_md5))
    _print(verify(args.out, workers=args.workers).lines())
    return 0


def _max_pixels(args: argparse.Namespace) -> int:
    from distq.data.folder import MAX_PIXELS
    from distq.errors import DistqError

    if args.max_image_pixels is None:
        return MAX_PIXELS
    if args.max_image_pixels <= 0:
        raise DistqError(f"--max-image-pixels={args.max_image_pixels} must be > 0")
    return args.max_image_pixels


def _verify(args: argparse.Namespace) -> int:
    from distq.data.shards import is_shards_folder
    from distq.data.verify import verify, verify_shards
    from distq.errors import DistqError

    if is_shards_folder(args.root):
        if args.fix:
            raise DistqError(f"--fix re-encodes image files of a folder, not shards: fix the folder {args.root} was packed from, then pack it again")
        report = verify_shards(args.root, decode=args.decode, workers=args.workers, max_pixels=_max_pixels(args))
    else:
        report = verify(args.root, fix=args.fix, workers=args.workers, max_pixels=_max_pixels(args))
    _print(report.lines())
    return 0 if report.clean else 1


def _pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distq.data.pack import pack, parse_size, summary

    index = pack(args.root, args.out, parse_size(args.shard_size), seed=args.seed, decode=not args.no_decode, max_pixels=_max_pixels(args))
    _print(summary(index, Path(args.out), decoded=not args.no_decode))
    return 0
