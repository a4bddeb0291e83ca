"""Run an ONNX export with onnxruntime: ``distq eval --engine onnx`` and ``distq predict FILE.onnx``.

``OnnxModel`` looks like the integer engine to ``distq.infer.evaluate`` (``header`` with
``preprocess``, ``classes`` and ``source``; called on a float image batch, it returns
logits), so evaluation and prediction share one code path. The header comes from the
file's metadata (``distq.export.onnx_export``); onnxruntime is an optional dependency
(``pip install 'distq[deploy]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from distq.export.format import ExportError, nonfinite_export, not_a_file
from distq.export.onnx_export import require

ONNX_SUFFIX = ".onnx"
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"
"""onnxruntime's default level, so ``distq eval`` measures what a user's session computes."""


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


class OnnxModel:
    """An ONNX export in an onnxruntime CPU session: ``model(images)`` -> float32 logits."""

    def __init__(self, path: str | Path, threads: int = 0):
        path = Path(path)
        what = f"ONNX file {str(path)!r}"
        if not path.is_file():
            raise not_a_file(path, what, "write one with 'distq export CHECKPOINT --format onnx --out FILE'")
        ort = require("onnxruntime", "running an ONNX file")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION)
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for bad files and custom ops
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if "qonnx" in reason:
                raise ExportError(f"{what} is a QONNX export (Quant nodes), which onnxruntime cannot run: export with --format onnx") from None
            raise ExportError(f"{what} cannot be run by onnxruntime ({reason[:300]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.header = self._header(meta, what)
        _check_initializers(path, what)
        self.classes: list[str] = list(self.header["classes"])
        self.class_names: dict[str, str] = dict(zip(self.classes, json.loads(meta.get("class_names", "[]"))))
        """Readable names of the classes that have one (ImageNet: wnid -> "tench, Tinca tinca")."""
        self.input = self.session.get_inputs()[0].name
        first = self.session.get_inputs()[0].shape[0]
        self.batch: int | None = first if isinstance(first, int) and first > 0 else None
        """The file's fixed batch size (``distq export --batch N``), or None for a dynamic batch."""

    @staticmethod
    def _header(meta: dict[str, str], what: str) -> dict:
        try:
            distq = json.loads(meta["distq"])
            header = {"preprocess": json.loads(meta["preprocess"]), "classes": json.loads(meta["classes"])}
        except (KeyError, json.JSONDecodeError):
            raise ExportError(f"{what} has no distq metadata (preprocess, classes): export it with 'distq export --format onnx'") from None
        if distq.get("format") == "qonnx":
            raise ExportError(f"{what} is a QONNX export (Quant nodes), which onnxruntime cannot run: export with --format onnx")
        return {**header, "source": distq.get("source") or {}, "distq": distq}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().float().cpu().numpy())
        if self.batch is None or len(batch) == self.batch:
            return torch.from_numpy(self.session.run(None, {self.input: batch})[0])
        # A fixed batch size: run in chunks of it, the last one padded with zeros.
        n = self.batch
        out = []
        for start in range(0, len(batch), n):
            chunk = batch[start : start + n]
            if len(chunk) < n:
                chunk = np.concatenate([chunk, np.zeros((n - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            out.append(self.session.run(None, {self.input: chunk})[0][: len(batch) - start])
        return torch.from_numpy(np.concatenate(out))


def _check_initializers(path: Path, what: str) -> None:
    """ExportError if a float initializer (weights, scales) holds NaN or infinite values: a
    diverged model, which onnxruntime would run without a word."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # onnxruntime alone: nothing to read the initializers with
        return
    bad = []
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad.append(init.name)
    if bad:
        raise nonfinite_export(what, bad)
