"""``distq export --format onnx|qonnx``: a checkpoint -> one ONNX file that stands alone.

The file's ``metadata_props`` carry what a runtime needs besides the graph, as JSON strings:

    preprocess   image_size, resize (shorter side before the centre crop), val_crop_ratio,
                 mean, std: RGB in [0, 1], resized, centre-cropped, normalised, NCHW float32
    classes      class names in logit order
    distq        format ("onnx" or "qonnx"), opset, fold_bn, the model and quant configs,
                 and the source checkpoint (its data root is ``distq eval``'s default dataset)

The graph is checked with ``onnx.checker`` (``full_check``: types and shapes inferred
through every node) before anything is written, and written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from distq.export.format import ExportError
from distq.export.onnx_format import DEPLOY_HINT, ONNX_FORMATS, OPSET


def require(module: str, what: str):
    """Import an optional deploy dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{what} needs the {module} package: {DEPLOY_HINT}") from None


def export_onnx(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", model_name: str | None = None, fold_bn: bool = True) -> list[str]:
    """Export one model of ``checkpoint`` as ``fmt`` to ``out``; returns the summary lines."""
    from distq.export.exporter import checkpoint_model
    from distq.export.format import check_writable, write_file

    check_writable(out)
    model, header = checkpoint_model(checkpoint, model_name)
    proto = model_to_onnx(model, header, fmt, fold_bn)
    data = proto.SerializeToString()
    write_file(out, data)
    return summary_lines(proto, out, len(data), fmt)


def model_to_onnx(model, header: dict, fmt: str = "onnx", fold_bn: bool = True):
    """The checked ``ModelProto`` of ``model``; ``header`` as ``checkpoint_model`` makes it."""
    if fmt not in ONNX_FORMATS:
        raise ExportError(f"unknown ONNX format {fmt!r}: choose one of {', '.join(ONNX_FORMATS)}")
    onnx = require("onnx", f"--format {fmt}")
    from onnx import helper

    from distq.export.onnx_graph import build_graph
    from distq.export.onnx_qcdq import QCDQWriter
    from distq.export.qonnx import QONNXWriter

    writer = QCDQWriter() if fmt == "onnx" else QONNXWriter()
    preprocess = header["preprocess"]
    graph = build_graph(model, int(preprocess["image_size"]), int(header["model"]["num_classes"]), writer, fold_bn)
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in writer.domains.items()]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="distq", producer_version=_version())
    # The IR version of opset 13's ONNX release: runtimes older than the installed onnx read it.
    proto.ir_version = 7
    proto.doc_string = (
        f"{header['model']['arch']} trained with distq, {fmt} export. Input 'images': RGB float32 NCHW, "
        "resized, centre-cropped and normalised as metadata 'preprocess' says; output 'logits' in the order of metadata 'classes'."
    )
    metadata = {
        "preprocess": {**preprocess, "resize": _resize(preprocess)},
        "classes": header["classes"],
        **({"class_names": header["class_names"]} if header.get("class_names") else {}),
        "distq": {
            "format": fmt,
            "opset": OPSET,
            "fold_bn": fold_bn,
            "model": header["model"],
            "quant": header.get("quant"),
            "source": header.get("source"),
        },
    }
    helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
    try:
        # QONNX's Quant nodes have no schema in onnx: their types cannot be inferred strictly.
        onnx.checker.check_model(proto, full_check=fmt == "onnx")
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the {fmt} graph built for this model is invalid ({str(exc).splitlines()[0]}): please report it") from None
    return proto


def _resize(preprocess: dict) -> int:
    from distq.data.transforms import val_resize_size

    return val_resize_size(int(preprocess["image_size"]), float(preprocess["val_crop_ratio"]))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distq")
    except PackageNotFoundError:
        return "unknown"


def summary_lines(proto, out, size: int, fmt: str) -> list[str]:
    from collections import Counter

    ops = Counter(node.op_type for node in proto.graph.node)
    quant_ops = ("QuantizeLinear", "DequantizeLinear", "Clip", "Quant", "BipolarQuant")
    listed = ", ".join(f"{ops[op]} {op}" for op in quant_ops if ops[op])
    return [
        f"exported {out}: {size:,} bytes, {fmt} (opset {proto.opset_import[0].version}), {len(proto.graph.node)} nodes"
        + (f": {listed}" if listed else ": no quantizers (full precision)")
    ]
