"""Does an export file (integer engine, or ONNX in onnxruntime) compute what its checkpoint's
fake-quantized model computes?

``compare`` runs both on the validation split and reports how often the predicted class
agrees and how far the logits are apart. The reference is the checkpoint's model with
every AQE alpha at 1 (the end of the AQE schedule): inference uses only the hard
quantizer, and that is what the export holds.
"""

from __future__ import annotations

import torch

from distq.infer.engine import load_engine
from distq.infer.evaluate import load_runner
from distq.quant.layers import quant_layers


def exact_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The exact (float64) counterpart of a fake-quantized model, in place: every quantized
    weight becomes the float64 value of its exported codes, its quantizer off.

    The float32 fake-quantized weights are the level values rounded to float32 (2q/15 - 1 is
    not exact), and re-quantizing in float64 can round a weight on a level boundary the
    other way; the codes are the weights the export holds (tests check they match the
    training quantizer). What remains is the arithmetic, which float64 does exactly enough.
    """
    from distq.quant.functional import FULL_PRECISION
    from distq.quant.layers import QAct

    model.double()
    with torch.no_grad():
        for _, layer in quant_layers(model):
            if isinstance(layer, QAct) or layer.bits == FULL_PRECISION:
                continue
            codes = layer.quantizer.weight_codes(layer)  # from the float32 weight, as the export
            values = codes.integers.double()
            layer.weight.copy_(values * codes.scale.double().view((-1,) + (1,) * (values.dim() - 1)))
            layer.bits = FULL_PRECISION
    return model


def reference_model(checkpoint: str, model_name: str = "model", dtype: torch.dtype = torch.float32):
    """The fake-quantized PyTorch model of a checkpoint, as exported (AQE alpha = 1);
    in float64, its ``exact_reference``."""
    from distq.models.trained import load_trained

    trained = load_trained(checkpoint)
    model, cfg = trained.model(model_name), trained.cfg
    for _, layer in quant_layers(model):
        layer.alpha = 1.0
    if dtype == torch.float64:
        exact_reference(model)
    return model.eval().to(dtype), cfg


def compare(
    checkpoint: str,
    export_file: str,
    dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    limit: int | None = None,
    engine_name: str = "int",
) -> dict:
    """Agreement of the integer engine (float parts in ``dtype``), or of onnxruntime
    (``engine_name="onnx"``, float32), and the fake-quantized model (in ``reference_dtype``,
    default ``dtype``; float64 makes it ``exact_reference``) on the val split, or its first
    ``limit`` images.

    Returns counts, top-1 of each, the largest and 99th-percentile per-image max |logit
    difference|, how many images differ by more than 1e-3, and the largest |logit|.
    """
    from distq.data import build_val_loader, resolve_root

    engine = load_runner(export_file, "onnx") if engine_name == "onnx" else load_engine(export_file, dtype)
    reference_dtype = reference_dtype or dtype
    model, cfg = reference_model(checkpoint, engine.header["source"]["model"], reference_dtype)
    cfg.data.workers = 0
    loader = build_val_loader(cfg.data, resolve_root(cfg.data))
    agree = seen = right_ref = right_int = 0
    gaps, scale = [], 0.0
    with torch.inference_mode():
        for images, labels in loader:
            if limit is not None and seen >= limit:
                break
            ref = model(images.to(reference_dtype)).double()
            got = engine(images).double()
            agree += (ref.argmax(1) == got.argmax(1)).sum().item()
            right_ref += (ref.argmax(1) == labels).sum().item()
            right_int += (got.argmax(1) == labels).sum().item()
            gaps.append((ref - got).abs().amax(1))
            scale = max(scale, ref.abs().max().item())
            seen += labels.numel()
    gap = torch.cat(gaps)
    return {
        "images": seen,
        "agree": agree,
        "agree_fraction": agree / seen,
        "top1_fake_quant": 100.0 * right_ref / seen,
        "top1_int": 100.0 * right_int / seen,
        "max_logit_gap": gap.max().item(),
        "p99_logit_gap": gap.quantile(0.99).item(),
        "images_with_gap_over_1e-3": int((gap > 1e-3).sum()),
        "max_abs_logit": scale,
    }
