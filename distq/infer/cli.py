"""``distq predict`` and ``distq eval --engine int|onnx``: commands that run an export file.

``add_commands`` is all that ``distq.cli`` calls for ``predict``; ``eval_export`` is the
export-file branch of ``distq eval``.
"""

from __future__ import annotations

import argparse
import json


def add_commands(sub) -> None:
    """Register ``predict`` on the main parser's subparsers."""
    predict = sub.add_parser(
        "predict",
        help="top-5 classes of images with an exported model",
        description="Classify images with an export file: a .onnx file runs in onnxruntime, any other on distq's "
        "integer engine; prints the top-5 classes and probabilities.",
    )
    predict.add_argument("export_file", metavar="FILE", help="a file written by distq export (safetensors, or .onnx)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    predict.add_argument(
        "--max-image-pixels", type=int, metavar="N", help="refuse images larger than N pixels, width x height (default: data.max_image_pixels's default)"
    )
    predict.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from distq.errors import DistqError
    from distq.infer.evaluate import load_runner, predict
    from distq.infer.onnx_runtime import is_onnx_file

    runner = load_runner(args.export_file, "onnx" if is_onnx_file(args.export_file) else "int")
    names = runner.class_names
    if args.max_image_pixels is not None and args.max_image_pixels <= 0:
        raise DistqError(f"--max-image-pixels={args.max_image_pixels} must be > 0")
    results = predict(runner, args.images, max_pixels=args.max_image_pixels)
    for path, top in zip(args.images, results):
        if args.json:
            top5 = [{"class": c, **({"name": names[c]} if names.get(c) else {}), "probability": p} for c, p in top]
            print(json.dumps({"image": path, "top5": top5}))
            continue
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            label = f"{name} {names[name]}" if names.get(name) else name
            print(f"  {rank}. {label:<24} {prob:.4f}")
    return 0


def eval_export(args: argparse.Namespace) -> int:
    """``distq eval --engine int|onnx FILE``: an export file on the val split."""
    from distq.infer.evaluate import evaluate_export

    print(json.dumps(evaluate_export(args.checkpoint, data_root=args.data, engine_name=args.engine)))
    return 0
