"""``distq export`` and ``distq predict``, and the integer path of ``distq eval --engine int``.

``add_commands`` is all that ``distq.cli`` calls, so the main parser stays one place to
read and this module owns its own options.
"""

from __future__ import annotations

import argparse
import json

from distq.export.onnx_format import FORMATS, ONNX_FORMATS, OPSET


def add_commands(sub) -> None:
    """Register ``export`` and ``predict`` on the main parser's subparsers."""
    export = sub.add_parser(
        "export",
        help="export a checkpoint: packed integers for distq's engine, or ONNX / QONNX",
        description="Export a trained checkpoint. safetensors (default): quantized weights packed at their bit-widths, "
        "scales, folded batch-norm, the architecture and the class names, for distq's integer engine. onnx: a standard "
        f"ONNX graph (opset {OPSET}) in the QCDQ style (QuantizeLinear -> Clip -> DequantizeLinear on int8/uint8) "
        "for standard ONNX runtimes (tested with onnxruntime's CPU provider); preprocessing and class names in its "
        "metadata. qonnx: the same graph with "
        "QONNX Quant/BipolarQuant nodes, for FINN-style FPGA flows. onnx and qonnx need 'pip install distq[deploy]'; "
        "AQE activations and AQE weights whose alpha is below 1 have no exact ONNX form and are refused.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint folder written by distq train")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    export.add_argument("--format", default="safetensors", metavar="FORMAT", help=f"{', '.join(FORMATS)} (default: %(default)s)")
    export.add_argument("--model", metavar="NAME", help="which model of the checkpoint (default: 'model', or its only one)")
    export.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        help="onnx/qonnx: keep batch-norms as BatchNormalization nodes instead of folding them into the convs",
    )
    export.set_defaults(func=_export)

    predict = sub.add_parser(
        "predict",
        help="top-5 classes of images with an exported model",
        description="Classify images with an export file: a .onnx file runs in onnxruntime, any other on distq's "
        "integer engine; prints the top-5 classes and probabilities.",
    )
    predict.add_argument("export_file", metavar="FILE", help="a file written by distq export (safetensors, or .onnx)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    predict.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> int:
    from distq.export.format import ExportError, check_writable

    if args.format not in FORMATS:
        raise ExportError(f"unknown export format {args.format!r}: choose one of {', '.join(FORMATS)}")
    check_writable(args.out)
    if args.format in ONNX_FORMATS:
        from distq.export.onnx_export import export_onnx

        print("\n".join(export_onnx(args.checkpoint, args.out, args.format, model_name=args.model, fold_bn=args.fold_bn)))
        return 0
    from distq.export.exporter import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, model_name=args.model)
    print("\n".join(summary.lines(args.out)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from distq.infer.evaluate import load_runner, predict
    from distq.infer.onnx_runtime import is_onnx_file

    runner = load_runner(args.export_file, "onnx" if is_onnx_file(args.export_file) else "int")
    names = runner.class_names
    results = predict(runner, args.images)
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
