"""``distq export`` and ``distq predict``, and the integer path of ``distq eval --engine int``.

``add_commands`` is all that ``distq.cli`` calls, so the main parser stays one place to
read and this module owns its own options.
"""

from __future__ import annotations

import argparse
import json


def add_commands(sub) -> None:
    """Register ``export`` and ``predict`` on the main parser's subparsers."""
    export = sub.add_parser(
        "export",
        help="pack a checkpoint's weights at their bit-widths into one self-describing file",
        description="Export a trained checkpoint for the integer engine: quantized weights packed at their "
        "bit-widths, scales, folded batch-norm, the architecture and the class names.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint folder written by distq train")
    export.add_argument("--out", required=True, metavar="FILE", help="the export file to write (safetensors with a distq header)")
    export.add_argument("--model", metavar="NAME", help="which model of the checkpoint (default: 'model', or its only one)")
    export.set_defaults(func=_export)

    predict = sub.add_parser(
        "predict",
        help="top-5 classes of images with the integer engine",
        description="Classify images with an export file on the integer engine; prints the top-5 classes and probabilities.",
    )
    predict.add_argument("export_file", metavar="FILE", help="a file written by distq export")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    predict.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> int:
    from distq.export.exporter import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, model_name=args.model)
    print("\n".join(summary.lines(args.out)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from distq.infer.engine import load_engine
    from distq.infer.evaluate import predict

    engine = load_engine(args.export_file)
    names = engine.class_names
    results = predict(engine, args.images)
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


def eval_int(args: argparse.Namespace) -> int:
    """``distq eval --engine int FILE``: the integer engine on the val split."""
    from distq.infer.evaluate import evaluate_export

    print(json.dumps(evaluate_export(args.checkpoint, data_root=args.data)))
    return 0
