"""Checkpoint -> export file: packed integer weights, scales, folded batch-norm.

One record per module that carries state or quantizes, in module order (the header's
``layers``):

- quantized conv/linear (``weight_bits`` < 32): its quantizer ``method`` (the registry key),
  ``per_channel``, the weight as bit-plane-packed k-bit codes and its ``weight_scale`` (the
  method's ``weight_codes``: what each code stands for is the method's, see
  ``distq.quant.methods``), and the affine ``out_scale``/``out_shift``
  that the layer's bias and the batch-norm after it fold into, so that
  ``output = conv(x, weight) * out_scale + out_shift`` per output channel. The integer
  accumulator of the engine meets floats only there, so the scales are float64.
- full-precision conv/linear: its float32 ``weight`` as trained, with the same affine
  ``out_scale``/``out_shift`` holding its bias and batch-norm. (Folding the batch-norm into
  the affine rather than the weight keeps the weight exact: w * g rounds in float32.)
- batch-norm: ``folded_into`` its conv, or (where nothing precedes it to fold into) its
  float parameters.
- activation: ``bits`` and ``method`` of the QAct (32 for a plain ReLU), and what the method
  needs to rebuild it (its ``act_record``: LSQ's step ``scale``, PACT's clipping level ``alpha``).

Pooling, dropout, residual adds and the wiring come from the architecture itself, which
the engine rebuilds from the header's model config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from distq.export.format import ExportError, ExportFile, pack_planes, write_export
from distq.models.dataflow import conv_bn_pairs
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QAct, QuantState

DEFAULT_MODEL = "model"
_STATELESS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.Flatten, nn.Sequential)


@dataclass
class ExportSummary:
    """Sizes of an export, in bytes."""

    file_bytes: int
    quantized_layers: int
    float_layers: int
    packed_bytes: int
    """Packed weight codes of the quantized layers."""
    packed_float32_bytes: int
    """The same weights as float32."""
    ideal_bytes: float
    """sum(n * bits / 8) over the quantized layers: the packed size with no rounding up."""
    side_bytes: int
    """Per-channel floats of the quantized layers (scales, folded batch-norm)."""
    float_bytes: int
    """Full-precision layers (weights, biases, unfolded batch-norm)."""
    model_float32_bytes: int = 0
    """The model's parameters as float32: what a float export would take."""
    warnings: dict[str, int] = dataclasses.field(default_factory=dict)
    """{a method's ``export_warning``: how many layers it applies to} (e.g. AQE layers whose
    alpha is below 1: the export keeps only their hard quantizer)."""

    @property
    def warned_layers(self) -> int:
        return sum(self.warnings.values())

    @property
    def ratio(self) -> float:
        return self.packed_bytes / max(self.packed_float32_bytes, 1)

    @property
    def ideal_ratio(self) -> float:
        return self.ideal_bytes / max(self.packed_float32_bytes, 1)

    def lines(self, path: str) -> list[str]:
        return [
            f"exported {path}: {self.file_bytes:,} bytes, {self.file_bytes / max(self.model_float32_bytes, 1):.4f} of the "
            f"float32 model's {self.model_float32_bytes:,} ({self.quantized_layers} quantized layers, "
            f"{self.float_layers} full-precision layers)",
            f"quantized weights: {self.packed_bytes:,} bytes packed vs {self.packed_float32_bytes:,} as float32: "
            f"ratio {self.ratio:.4f} (bits/32 = {self.ideal_ratio:.4f}, overhead x{self.ratio / max(self.ideal_ratio, 1e-12):.4f})",
            f"scales and folded batch-norm of quantized layers: {self.side_bytes:,} bytes; "
            f"full-precision layers: {self.float_bytes:,} bytes",
        ] + [f"warning: {count} {text}" for text, count in self.warnings.items()]


# --- from a checkpoint ----------------------------------------------------------------------


def export_checkpoint(path: str | Path, out: str | Path, model_name: str | None = None) -> ExportSummary:
    """Export one model of a training checkpoint to ``out``."""
    model, header = checkpoint_model(path, model_name)
    export, summary = export_model(model, header)
    summary.file_bytes = write_export(export, out)
    return summary


def checkpoint_model(path: str | Path, model_name: str | None = None) -> tuple[nn.Module, dict]:
    """One model of a training checkpoint, its weights and precision state loaded, and the
    header every export format writes: model config, quant config, preprocessing, classes, source."""
    from distq.models.trained import load_trained

    trained = load_trained(path)
    cfg, classes, state = trained.cfg, trained.classes, trained.state
    name = trained.default_name() if model_name is None else model_name
    model = trained.model(name)
    header = {
        "model": {
            "arch": cfg.model.arch,
            "width": cfg.model.width,
            "small_input": cfg.model.small_input,
            "num_classes": cfg.model.num_classes or len(classes),
        },
        "quant": dataclasses.asdict(cfg.quant),
        "preprocess": _preprocess(cfg.data),
        "classes": classes,
        **_readable_names(cfg.data.root, classes),
        "source": {"checkpoint": str(path), "model": name, "epoch": state.get("epoch"), "data_root": cfg.data.root, "data_format": cfg.data.format},
    }
    return model, header


def _readable_names(data_root: str | None, classes: list[str]) -> dict:
    """``{"class_names": [...]}`` when the training data root (still) has a class-name table."""
    from distq.data.bundle import class_name_table

    table = class_name_table(data_root) if data_root and Path(data_root).is_dir() else None
    return {"class_names": [table.get(c, "") for c in classes]} if table else {}


def _preprocess(data_cfg) -> dict:
    from distq.data.transforms import preprocess_description

    return preprocess_description(data_cfg.image_size, data_cfg.val_crop_ratio)


# --- from a model -----------------------------------------------------------------------------


@torch.no_grad()
def export_model(model: nn.Module, header: dict) -> tuple[ExportFile, ExportSummary]:
    """The export file of ``model`` (a distq model with its weights loaded); ``header``
    supplies model, preprocess and classes."""
    model = model.eval()
    folded = conv_bn_pairs(model)
    bn_of = {conv: bn for bn, conv in folded.items()}
    modules = dict(model.named_modules())
    layers: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    summary = ExportSummary(0, 0, 0, 0, 0, 0.0, 0, 0, model_float32_bytes=4 * sum(p.numel() for p in model.parameters()))
    for name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bn = modules[bn_of[name]] if name in bn_of else None
            record, new = _weight_layer(name, module, bn, bn_of.get(name))
            _count(summary, record, new)
        elif isinstance(module, nn.BatchNorm2d):
            if name in folded:
                record, new = {"op": "batchnorm", "folded_into": folded[name]}, {}
            else:
                record, new = _float_batchnorm(name, module)
                summary.float_bytes += sum(t.numel() * t.element_size() for t in new.values())
        elif isinstance(module, QAct):
            record, new = {"op": "act", "bits": module.bits, "method": module.method}, {}
            if module.bits != FULL_PRECISION:
                record.update(module.quantizer.act_record(module))
        elif isinstance(module, nn.ReLU):
            record, new = {"op": "act", "bits": FULL_PRECISION, "method": "relu"}, {}
        elif isinstance(module, _STATELESS) or not any(True for _ in module.parameters(recurse=False)):
            continue
        else:
            raise ExportError(
                f"cannot export module {name!r} of type {type(module).__name__}: the integer engine has no equivalent"
            )
        warning = module.quantizer.export_warning(module) if isinstance(module, QuantState) and module.bits != FULL_PRECISION else None
        if warning is not None:
            summary.warnings[warning] = summary.warnings.get(warning, 0) + 1
        layers[name] = record
        tensors.update(new)
    return ExportFile(header={**header, "layers": layers}, tensors=tensors), summary


def _count(summary: ExportSummary, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    if record["weight_bits"] == FULL_PRECISION:
        summary.float_layers += 1
        summary.float_bytes += sum(nbytes.values())
        return
    n = 1
    for d in record["shape"]:
        n *= d
    summary.quantized_layers += 1
    codes = record["tensors"]["weight_codes"]
    summary.packed_bytes += nbytes[codes]
    summary.packed_float32_bytes += 4 * n
    summary.ideal_bytes += n * record["weight_bits"] / 8
    summary.side_bytes += sum(v for k, v in nbytes.items() if k != codes)


def bn_affine(bn: nn.BatchNorm2d | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, h) in float64 with bn(z) = z * g + h; identity when there is no batch-norm."""
    if bn is None:
        return torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    if bn.running_mean is None:
        raise ExportError("cannot fold a batch-norm without running statistics (track_running_stats=False)")
    g = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight.double()
    h = -bn.running_mean.double() * g
    if bn.bias is not None:
        h = h + bn.bias.double()
    return g, h


def _geometry(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return {"op": "linear", "shape": list(module.weight.shape)}
    if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ExportError(
            f"cannot export conv with groups={module.groups}, dilation={module.dilation}, padding={module.padding!r}, "
            f"padding_mode={module.padding_mode!r}: the integer engine supports groups=1, dilation=1, numeric zero padding"
        )
    return {"op": "conv", "shape": list(module.weight.shape), "stride": list(module.stride), "padding": list(module.padding)}


def _weight_layer(name: str, module: nn.Module, bn: nn.BatchNorm2d | None, bn_name: str | None) -> tuple[dict, dict]:
    record = {**_geometry(module), "batchnorm": bn_name}
    out_channels = module.weight.shape[0]
    g, h = bn_affine(bn, out_channels)
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    bits = module.bits if isinstance(module, QuantState) else FULL_PRECISION
    if bits == FULL_PRECISION:
        names = {k: f"{name}.{k}" for k in ("weight", "out_scale", "out_shift")}
        tensors = {names["weight"]: module.weight.detach().float(), names["out_scale"]: g, names["out_shift"]: bias * g + h}
        record.update(weight_bits=FULL_PRECISION, tensors=names)
        return record, tensors
    codes = module.quantizer.weight_codes(module)
    names = {k: f"{name}.{k}" for k in ("weight_codes", "weight_scale", "out_scale", "out_shift")}
    # Scales in float64: the integer accumulator is exact, so the affine is the only
    # rounding between it and the next quantizer (1/3 in float32 is off by 3e-8).
    tensors = {
        names["weight_codes"]: pack_planes(codes.codes, bits),
        names["weight_scale"]: codes.scale.double(),
        names["out_scale"]: g,
        names["out_shift"]: bias * g + h,
    }
    record.update(weight_bits=bits, method=module.method, per_channel=bool(getattr(module, "per_channel", False)), tensors=names)
    return record, tensors


def _float_batchnorm(name: str, bn: nn.BatchNorm2d) -> tuple[dict, dict]:
    g, h = bn_affine(bn, bn.num_features)
    tensors = {f"{name}.scale": g.float(), f"{name}.shift": h.float()}
    return {"op": "batchnorm", "folded_into": None, "tensors": {"scale": f"{name}.scale", "shift": f"{name}.shift"}}, tensors
