"""``distq export --format onnx|onnx-int|qonnx``: a checkpoint -> one ONNX file that stands alone
(onnx: QCDQ, ``onnx_graph`` + ``onnx_qcdq``; onnx-int: integer matrix products, ``onnx_int``;
qonnx: ``onnx_graph`` + ``qonnx``).

The file's ``metadata_props`` carry what a runtime needs besides the graph, as JSON strings:

    preprocess   the validation transform, complete (``distq.data.transforms.preprocess_description``,
                 the same dict as the packed file's header): image_size, resize (shorter side
                 before the centre crop) and interpolation, val_crop_ratio, [0, 1] scaling, mean,
                 std, RGB, NCHW float32
    classes      class names in logit order
    distq        format ("onnx", "onnx-int" or "qonnx"), opset, fold_bn, the model and quant configs,
                 and the source checkpoint (its data root is ``distq eval``'s default dataset);
                 onnx-int also ``integer``: the layers written as integer matrix products and
                 those written in the QCDQ form, with the reason

The batch dimension is dynamic, or fixed with ``batch`` (``--batch N``). The graph is checked with ``onnx.checker`` (``full_check``: types and shapes inferred
through every node) before anything is written, and written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from distq.export.format import ExportError
from distq.export.onnx_format import DEPLOY_HINT, INT_FORMAT, ONNX_FORMATS, OPSET


def require(module: str, what: str):
    """Import an optional deploy dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{what} needs the {module} package: {DEPLOY_HINT}") from None


def export_onnx(
    checkpoint: str | Path, out: str | Path, fmt: str = "onnx", model_name: str | None = None, fold_bn: bool = True, batch: int | None = None
) -> list[str]:
    """Export one model of ``checkpoint`` as ``fmt`` to ``out``; returns the summary lines.
    ``batch``: a fixed batch dimension (None: dynamic)."""
    from distq.export.exporter import checkpoint_model
    from distq.export.format import check_writable, write_file

    check_writable(out)
    model, header = checkpoint_model(checkpoint, model_name)
    proto = model_to_onnx(model, header, fmt, fold_bn, batch)
    data = proto.SerializeToString()
    write_file(out, data)
    return summary_lines(proto, out, len(data), fmt)


def model_to_onnx(model, header: dict, fmt: str = "onnx", fold_bn: bool = True, batch: int | None = None):
    """The checked ``ModelProto`` of ``model``; ``header`` as ``checkpoint_model`` makes it;
    ``batch``: a fixed batch dimension (None: dynamic)."""
    if fmt not in ONNX_FORMATS:
        raise ExportError(f"unknown ONNX format {fmt!r}: choose one of {', '.join(ONNX_FORMATS)}")
    onnx = require("onnx", f"--format {fmt}")
    from onnx import helper

    from distq.export.onnx_graph import build_graph
    from distq.export.onnx_qcdq import QCDQWriter
    from distq.export.qonnx import QONNXWriter

    preprocess = header["preprocess"]
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ExportError(f"--batch {batch!r}: the batch size must be a positive integer (or left out for a dynamic batch)")
    size, classes, integer = int(preprocess["image_size"]), int(header["model"]["num_classes"]), None
    if fmt == INT_FORMAT:
        from distq.export.onnx_int import build_int_graph

        if not fold_bn:
            raise ExportError(f"--no-fold-bn does not apply to --format {INT_FORMAT}: its integer layers always fold their batch-norm into the float epilogue")
        graph, integer = build_int_graph(model, size, classes, batch)
        domains = {}
    else:
        writer = QCDQWriter() if fmt == "onnx" else QONNXWriter()
        graph, domains = build_graph(model, size, classes, writer, fold_bn, batch), writer.domains
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="distq", producer_version=_version())
    # The IR version of opset 13's ONNX release: runtimes older than the installed onnx read it.
    proto.ir_version = 7
    proto.doc_string = (
        f"{header['model']['arch']} trained with distq, {fmt} export. Input 'images': RGB float32 NCHW, "
        "resized, centre-cropped and normalised as metadata 'preprocess' says; output 'logits' in the order of metadata 'classes'."
    )
    metadata = {
        "preprocess": _preprocess(preprocess),
        "classes": header["classes"],
        **({"class_names": header["class_names"]} if header.get("class_names") else {}),
        "distq": {
            "format": fmt,
            "opset": OPSET,
            "fold_bn": fold_bn,
            "model": header["model"],
            "quant": header.get("quant"),
            "source": header.get("source"),
            **({"integer": integer.as_dict()} if integer is not None else {}),
        },
    }
    helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
    try:
        # QONNX's Quant nodes have no schema in onnx: their types cannot be inferred strictly.
        onnx.checker.check_model(proto, full_check=fmt != "qonnx")
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the {fmt} graph built for this model is invalid ({str(exc).splitlines()[0]}): please report it") from None
    return proto


def _preprocess(preprocess: dict) -> dict:
    """The header's preprocessing, complete (the packed file's header carries the same dict)."""
    from distq.data.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess_description

    return preprocess_description(
        int(preprocess["image_size"]),
        float(preprocess["val_crop_ratio"]),
        preprocess.get("mean", IMAGENET_MEAN),
        preprocess.get("std", IMAGENET_STD),
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distq")
    except PackageNotFoundError:
        return "unknown"


def summary_lines(proto, out, size: int, fmt: str) -> list[str]:
    from collections import Counter

    ops = Counter(node.op_type for node in proto.graph.node)
    quant_ops = ("MatMulInteger", "QuantizeLinear", "DequantizeLinear", "Clip", "Quant", "BipolarQuant")
    listed = ", ".join(f"{ops[op]} {op}" for op in quant_ops if ops[op])
    lines = [
        f"exported {out}: {size:,} bytes, {fmt} (opset {proto.opset_import[0].version}), {len(proto.graph.node)} nodes"
        + (f": {listed}" if listed else ": no quantizers (full precision)")
    ]
    integer = json.loads({p.key: p.value for p in proto.metadata_props}.get("distq", "{}")).get("integer")
    if integer is not None:
        lines.append(f"  {len(integer['integer_layers'])} quantized conv/linear layer(s) as integer matrix products (MatMulInteger)")
        for name, reason in integer["qcdq_layers"].items():
            lines.append(f"  layer {name!r} in the QCDQ form (float kernels): {reason}")
    return lines
