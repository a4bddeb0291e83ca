"""``distq export``.

``add_commands`` is all that ``distq.cli`` calls, so the main parser stays one place to
read and this module owns its own options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distq.export.onnx_format import FORMATS, ONNX_FORMATS, OPSET


def add_commands(sub) -> None:
    """Register ``export`` on the main parser's subparsers."""
    export = sub.add_parser(
        "export",
        help="export a checkpoint: packed integers for distq's engine, or ONNX / QONNX",
        description="Export a trained checkpoint. safetensors (default): quantized weights packed at their bit-widths, "
        "scales, folded batch-norm, the architecture and the class names, for distq's integer engine. onnx: a standard "
        f"ONNX graph (opset {OPSET}) in the QCDQ style (QuantizeLinear -> Clip -> DequantizeLinear on int8/uint8) "
        "for standard ONNX runtimes (tested with onnxruntime's CPU provider); preprocessing and class names in its "
        "metadata. onnx-int: quantized convs and linears as integer matrix products (uint8 activation codes x int8 "
        "weights -> MatMulInteger, int32, then a float per-channel scale and shift), which onnxruntime runs with its "
        "integer kernels and which computes what distq's integer engine computes. qonnx: the QCDQ graph with "
        "QONNX Quant/BipolarQuant nodes, for FINN-style FPGA flows. The ONNX formats need 'pip install distq[deploy]'; "
        "AQE activations and AQE weights whose alpha is below 1 have no exact ONNX form and are refused.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint folder written by distq train")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write (not an existing one: see --force)")
    export.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists (never a file among a run's checkpoints, nor the checkpoint exported)",
    )
    export.add_argument("--format", default="safetensors", metavar="FORMAT", help=f"{', '.join(FORMATS)} (default: %(default)s)")
    export.add_argument("--model", metavar="NAME", help="which model of the checkpoint (default: 'model', or its only one)")
    export.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        help="onnx/qonnx: keep batch-norms as BatchNormalization nodes instead of folding them into the convs (onnx-int always folds)",
    )
    export.add_argument(
        "--batch",
        type=_positive_int,
        metavar="N",
        help=f"{'/'.join(ONNX_FORMATS)}: a fixed batch dimension N, for tools that need static shapes (qonnx's cleanup_model, FINN); default: dynamic",
    )
    export.set_defaults(func=_export)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _export(args: argparse.Namespace) -> int:
    from distq.export.format import ExportError, check_writable

    if args.format not in FORMATS:
        raise ExportError(f"unknown export format {args.format!r}: choose one of {', '.join(FORMATS)}")
    check_writable(args.out, overwrite=args.force)
    if Path(args.checkpoint).is_file() and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ExportError(f"refusing to write {args.out!r}: it is the checkpoint being exported; choose another --out")
    if args.batch is not None and args.format == "safetensors":
        raise ExportError(f"--batch applies to --format {', '.join(ONNX_FORMATS)}: a safetensors export has no fixed batch size")
    if args.format in ONNX_FORMATS:
        from distq.export.onnx_export import export_onnx

        lines = export_onnx(args.checkpoint, args.out, args.format, model_name=args.model, fold_bn=args.fold_bn, batch=args.batch)
        print("\n".join(lines))
        return 0
    from distq.export.exporter import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, model_name=args.model)
    print("\n".join(summary.lines(args.out)))
    return 0
