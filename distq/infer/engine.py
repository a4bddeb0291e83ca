"""The network executor: an export file -> a runnable integer model.

The architecture is rebuilt from the header's model config with the model registry (the
one definition of each network's wiring: residual adds, pooling, flatten), and every
module the header describes is swapped for its engine counterpart:

    quantized conv/linear  -> BitConv2d / BitLinear (packed integer weights, bit kernels)
    QAct                   -> IntAct (integer activations)

Each record names its quantizer method (``record["method"]``); the method object
(``distq.quant.methods.build_method``) says what the codes and activations mean: the weight
integers of the file's codes (``integers``), how to pack them (``offset_bits``), the activation
from its record (``int_activation``, with the record's ``act_record`` entries).
    full-precision layer   -> FloatLayer (float conv/linear, bias and batch-norm as its affine)
    folded batch-norm      -> nn.Identity
    max-pool               -> CodedMaxPool2d (keeps integer activations integer)

Float parts run in ``dtype`` (float32; float64 makes them exact enough to compare the
integer path with a float64 fake-quantized model code for code).

``kernels`` picks the bit kernels: "auto" (the default) runs the native ones
(``distq.infer.native``) where they build and the torch reference ones otherwise, saying so
once; "native" requires them; "reference" forces the torch kernels. Both give the same
integers and the same floats, bit for bit. With the native kernels, ``fuse`` lets a conv
compute the activation that follows it (``distq.infer.fusion``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from distq.export.format import ExportError, ExportFile, read_export, unpack_planes
from distq.infer.fusion import fuse_conv_activations
from distq.infer.layers import BitConv2d, BitLinear, ChannelAffine, CodedMaxPool2d, FloatLayer, IntAct
from distq.infer.native import describe, use_native
from distq.quant.functional import FULL_PRECISION, VALID_BITS
from distq.quant.methods import build_method


class IntegerModel(nn.Module):
    """An exported model ready to run: ``model(images)`` -> float32 logits."""

    def __init__(self, net: nn.Module, header: dict, dtype: torch.dtype, kernels: str = "reference", fused=()):
        super().__init__()
        self.net, self.header, self.dtype = net, header, dtype
        self.classes: list[str] = list(header["classes"])
        self.kernels = kernels
        """Which bit kernels run: 'native (avx512)', 'native (avx2)', 'native (portable)' or 'reference'."""
        self.fused: list[tuple[str, ...]] = list(fused)
        """Module chains computed by one native call, (conv, activation) or (stem conv,
        activation, max-pool): the last module's output is the call's."""
        self.class_names: dict[str, str] = dict(zip(self.classes, header.get("class_names") or []))
        """Readable names of the classes that have one (ImageNet: wnid -> "tench, Tinca tinca")."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(images.to(self.dtype)).float()

    def layer_modes(self) -> dict[str, dict[str, int]]:
        """{quantized layer: {"bit": calls, "float": calls}}: which path each layer took."""
        return {name: dict(m.calls) for name, m in self.net.named_modules() if isinstance(m, (BitConv2d, BitLinear))}


def load_engine(path: str | Path, dtype: torch.dtype = torch.float32, kernels: str = "auto", fuse: bool = True) -> IntegerModel:
    return build_engine(read_export(path), dtype, source=str(path), kernels=kernels, fuse=fuse)


def build_engine(
    export: ExportFile, dtype: torch.dtype = torch.float32, source: str = "<export>", kernels: str = "auto", fuse: bool = True
) -> IntegerModel:
    what = f"export file {source!r}"
    native = use_native(kernels)
    try:
        net = _rebuild(export, dtype, what, native)
    except ExportError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise ExportError(
            f"{what} is corrupt: its header does not describe a runnable model ({type(exc).__name__}: {exc})"
        ) from None
    fused = []
    if native and fuse:
        net, fused = fuse_conv_activations(net)
    return IntegerModel(net.eval(), export.header, dtype, describe() if native else "reference", fused)


def _rebuild(export: ExportFile, dtype: torch.dtype, what: str, native: bool) -> nn.Module:
    from distq.models.registry import build_float_model, model_names

    model = export.header["model"]
    if model["arch"] not in model_names():
        raise ExportError(
            f"{what} is for architecture {model['arch']!r}, which this distq does not know ({', '.join(model_names())})"
        )
    net = build_float_model(model["arch"], int(model["num_classes"]), int(model["width"]), bool(model["small_input"]))
    modules = dict(net.named_modules())
    layers = export.header["layers"]
    for name, record in layers.items():
        if name not in modules:
            raise ExportError(f"{what} does not match architecture {model['arch']!r}: it has no layer {name!r}")
        _set_module(net, name, _engine_module(name, record, modules[name], export, dtype, what, native))
    stateful = [n for n, m in modules.items() if any(True for _ in m.parameters(recurse=False)) and n not in layers]
    if stateful:
        raise ExportError(f"{what} is incomplete: no record for layer(s) {', '.join(stateful[:3])}")
    for name, module in list(net.named_modules()):
        if type(module) is nn.MaxPool2d:
            pool = CodedMaxPool2d(
                module.kernel_size, module.stride, module.padding, module.dilation, ceil_mode=module.ceil_mode, native=native
            )
            _set_module(net, name, pool)
    return net


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _engine_module(name: str, record: dict, original: nn.Module, export: ExportFile, dtype, what: str, native: bool) -> nn.Module:
    op = record["op"]
    if op == "act":
        bits = int(record["bits"])
        if bits not in VALID_BITS:
            raise ExportError(f"{what} is corrupt: layer {name!r} has activation bits {bits}")
        return nn.ReLU() if bits == FULL_PRECISION else IntAct(bits, build_method(record["method"]), record, native)
    if op == "batchnorm":
        if record["folded_into"] is not None:
            return nn.Identity()
        tensors = record["tensors"]
        return ChannelAffine(export.tensor(tensors["scale"]).to(dtype), export.tensor(tensors["shift"]).to(dtype))
    if op not in ("conv", "linear"):
        raise ExportError(f"{what} is corrupt: layer {name!r} has unknown op {op!r}")
    kind = nn.Conv2d if op == "conv" else nn.Linear
    shape = tuple(record["shape"])
    if not isinstance(original, kind) or tuple(original.weight.shape) != shape:
        raise ExportError(f"{what} does not match its architecture: layer {name!r} is {op} {shape} in the file")
    tensors = record["tensors"]
    bits = int(record["weight_bits"])
    if bits == FULL_PRECISION:
        return FloatLayer(original, *(export.tensor(tensors[k]) for k in ("weight", "out_scale", "out_shift")), dtype, native)
    if bits not in VALID_BITS:
        raise ExportError(f"{what} is corrupt: layer {name!r} has weight bits {bits}")
    method = build_method(record["method"])
    if bits > method.max_engine_bits():
        raise ExportError(f"the integer engine runs {method} weights of 1..{method.max_engine_bits()} bits, not {bits} (layer {name!r})")
    codes = unpack_planes(export.tensor(tensors["weight_codes"]), bits, shape)
    args = (
        method.integers(codes, bits),
        bits,
        method.offset_bits(bits),
        export.tensor(tensors["weight_scale"]),
        export.tensor(tensors["out_scale"]),
        export.tensor(tensors["out_shift"]),
        dtype,
    )
    return BitConv2d(original, *args, native=native) if op == "conv" else BitLinear(*args, native=native)
