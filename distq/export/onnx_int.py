"""``distq export --format onnx-int``: quantized convs and linears as integer matrix products
that onnxruntime runs with its integer kernels, computing what distq's integer engine computes.

The graph is standard ONNX (opset 13, no custom domain), walked from the model like the QCDQ
graph (``distq.export.onnx_graph``; batch-norm pairing, weight integers and refusals from
``distq.export.onnx_quant``), with three kinds of tensors: float tensors in torch's layout
(NCHW), float tensors channels-last (NHWC) and activation *codes*: the uint8 integers of a
quantized activation (value = code * scale). A quantized activation is

    QuantizeLinear(x, scale, uint8 zero point 0) -> Clip(0, high)      (the Clip only below 255)

i.e. the method's ``clamp(round(x / scale), 0, high)`` (``QuantMethod.act_codes``), and stays
codes as long as its readers allow: max pools (uint8 MaxPool), pass-throughs, and the quantized
convs and linears after it; an activation read only by max pools is quantized after them
instead (max commutes with a monotone quantizer; onnxruntime's float MaxPool is ~20x faster
than its uint8 one). Each quantized conv or linear is one integer GEMM on the codes:

    conv     codes (NHWC) -> [Pad] -> Reshape (N, pixels, C) -> Gather(patch pixels) -> Reshape
             (im2col on uint8: (N, OH, OW, kh * kw * C) in (kh, kw, c) order; below 64 channels
             kw Slices -> Concat first, so that the Gather copies kw * C bytes; a 1x1 stride-1
             conv needs none)
    both     MatMulInteger(codes uint8, integers int8, zero points 0) -> int32 accumulator
             -> Cast -> Mul(Mul(DequantizeLinear(1, act_scale), weight_scale * g)) -> Add(b * g + h)

a float tensor, channels-last for a conv: ``acc * (act_scale * weight_scale * g) + shift`` per
output channel, the integer engine's affine (``distq.infer.layers``), with the layer's bias and
its batch-norm (g, h) folded in (the sign of g stays in the float scale, so every batch-norm
folds). Residual adds, and the dequantized identity (DequantizeLinear), are float adds
channels-last; the next QuantizeLinear reads their sum. Layouts meet by Transpose (uint8 where
codes) only where a reader needs torch's layout (the float stem before the first quantized
conv, the final pooling), and everything without an integer form (full-precision first conv
and last linear, batch-norms without a conv, average pools) is the QCDQ graph's float node.

onnxruntime fuses MatMulInteger -> Cast -> Mul(Mul(a_scale, b_scale)) -> Add into one integer
kernel with the float epilogue in its output loop (``com.microsoft.MatMulIntegerToFloat``,
graph optimisation level extended or all, the default). Its constant folding would fold the
scale product first and so spoil the pattern; the activation scale is therefore written as
DequantizeLinear(1, scale), the value of code 1, which onnxruntime keeps unfolded for its
quantization fusions (one scalar per layer per run). Another runtime computes the same
unfused. Not used, measured on one 64-channel 3x3 conv at 56x56 (1 thread, AVX512-VNNI):
ConvInteger (onnxruntime's kernel is 4x slower than its float Conv with int8 weights, 1.3x
faster with uint8 ones shifted by 128), and QLinearConv (3.6x faster than float, but it
rounds the float shift to the accumulator's unit and rounds to 8 bits before a residual add:
not the engine's arithmetic).

Exactness: the codes are the integer engine's activation integers and the accumulators its
integer dot products, exactly; only the epilogue's float32 (the engine's is float64 before
its float32 output) may round a pre-activation that sits on a quantization boundary to the
other level.

Weights must fit int8: every method at 1..7 bits, and 8-bit LSQ/PACT weights ([-128, 127]).
8-bit DoReFa weights, odd integers n of [-255, 255], are stored as m = (n - 1) / 2 in
[-128, 127] with one extra weight column of ones, whose accumulator is the sum of the input
codes: the int32 accumulator is then 2 * acc_m + sum, exact (two int32 Adds and two Slices
after the MatMulInteger; the fused kernel does not apply to those layers). Other weights beyond
int8 are refused, naming the layer, as are weights the method refuses for ONNX
(``onnx_refusal``: AQE below alpha 1). A quantized conv or linear whose input is not a quantized
activation (AlexNet's first classifier linear reads full-precision features) is written as in
the QCDQ graph (DequantizeLinear weights, float Gemm/Conv) and listed in the export summary;
so is a grouped conv. Activations without a uniform quantizer (``act_codes`` raises
``Unsupported``: AQE's) are refused as by ``--format onnx``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.utils import _pair

from distq.export.format import ExportError
from distq.export.onnx_format import INPUT, OUTPUT
from distq.export.onnx_graph import _PASS_THROUGH, Graph, _rename_output, _trace, _Walk
from distq.export.onnx_qcdq import INT8_MAX, INT8_MIN, UINT8_MAX, QCDQWriter
from distq.export.onnx_quant import (
    SAFETENSORS_HINT,
    ActQuant,
    WeightQuant,
    activation_quant,
    batchnorm_affine,
    quantized_weight,
    weight_bits,
)
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QAct

INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv", "QLinearMatMul")
"""onnxruntime operators that compute a conv or linear on integers (in a profile: ``op_name``)."""
TORCH, NHWC = "torch", "nhwc"
_TO_NHWC, _TO_TORCH = [0, 2, 3, 1], [0, 3, 1, 2]


@dataclass(frozen=True)
class _Tensor:
    layout: str = TORCH
    codes: ActQuant | None = None
    """Set: the tensor holds uint8 codes of this activation (value = code * scale)."""


@dataclass
class IntReport:
    """What the integer graph did with the model's quantized layers (stored in the metadata)."""

    integer: list[str] = field(default_factory=list)
    """Quantized convs and linears written as integer matrix products."""
    qcdq: dict[str, str] = field(default_factory=dict)
    """Quantized layers written as in the QCDQ graph (float kernels), with the reason."""

    def as_dict(self) -> dict:
        return {"integer_layers": self.integer, "qcdq_layers": self.qcdq}


def build_int_graph(model: nn.Module, image_size: int, num_classes: int, batch: int | None = None):
    """(``GraphProto``, ``IntReport``) of ``model`` (eval mode): input ``images`` (N, 3, S, S)
    float32, output ``logits`` (N, classes); N is ``batch``, or dynamic when None."""
    from onnx import TensorProto, helper

    model = model.eval()
    traced = _trace(model, image_size)
    walk = _IntWalk(dict(model.named_modules()), Graph(names={INPUT}))
    with torch.no_grad():
        result = walk.torch_float(walk.run(traced))
    _rename_output(walk.graph, result, OUTPUT)
    n = "batch" if batch is None else int(batch)
    graph = helper.make_graph(
        walk.graph.nodes,
        "distq",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [n, num_classes])],
        walk.graph.initializers,
    )
    return graph, walk.report


class _IntWalk(_Walk):
    """The QCDQ walk (``onnx_graph._Walk``) with integer convs and linears: it tracks which
    tensors are codes and which are channels-last, and converts them for the float nodes."""

    def __init__(self, modules: dict[str, nn.Module], graph: Graph):
        super().__init__(modules, QCDQWriter(), graph, fold_bn=True)
        self.tensors: dict[str, _Tensor] = {}
        self.converted: dict[tuple[str, str], str] = {}
        self.report = IntReport()
        self.pending: dict[fx.Node, tuple[str, QAct]] = {}
        """Activations read only by max pools: written after the pool (uint8 MaxPool is slow in onnxruntime)."""

    # --- tensors ------------------------------------------------------------------------

    def kind(self, x: str) -> _Tensor:
        return self.tensors.get(x, _Tensor())

    def _mark(self, x: str, layout: str, codes: ActQuant | None = None) -> str:
        self.tensors[x] = _Tensor(layout, codes)
        return x

    def in_layout(self, x: str, layout: str) -> str:
        """``x`` (codes or float, as it is) in ``layout`` (a Transpose, once per tensor)."""
        kind = self.kind(x)
        if kind.layout == layout:
            return x
        key = (x, layout)
        if key not in self.converted:
            out = self.graph.add("Transpose", [x], f"{x}.{layout}", perm=_TO_NHWC if layout == NHWC else _TO_TORCH)
            self.converted[key] = self._mark(out, layout, kind.codes)
        return self.converted[key]

    def as_float(self, x: str) -> str:
        """The values of ``x``: DequantizeLinear of codes (once per tensor), else ``x``."""
        kind = self.kind(x)
        if kind.codes is None:
            return x
        key = (x, "float")
        if key not in self.converted:
            scale = self.graph.constant(f"{x}.scale", np.array(kind.codes.scale, dtype=np.float32))
            zero = self.graph.constant(f"{x}.zero_point", np.array(0, dtype=np.uint8))
            out = self.graph.add("DequantizeLinear", [x, scale, zero], f"{x}.value")
            self.converted[key] = self._mark(out, kind.layout)
        return self.converted[key]

    def torch_float(self, x: str) -> str:
        return self.as_float(self.in_layout(x, TORCH))

    def _with_inputs(self, node: fx.Node, convert, emit) -> str:
        """``emit()`` with the values of ``node``'s tensor arguments replaced by ``convert(x)``."""
        saved = {a: self.values[a] for a in node.args if isinstance(a, fx.Node)}
        try:
            for a, x in saved.items():
                self.values[a] = convert(x)
            return emit()
        finally:
            self.values.update(saved)

    # --- modules ------------------------------------------------------------------------

    def module(self, node: fx.Node, module: nn.Module) -> str:
        name, x = node.target, self.values[node.args[0]]
        if isinstance(module, _PASS_THROUGH) or (isinstance(module, nn.BatchNorm2d) and node in self.folded):
            return x
        if isinstance(module, QAct):
            if self._pooled_only(node) and self.kind(x).codes is None:
                self.pending[node] = (name, module)  # quantized after the pool: max commutes with the monotone quantizer
                return x
            return self.activation(name, module, x)
        if node.args[0] in self.pending:  # the max pool of a pending activation, then the activation
            act_name, act = self.pending[node.args[0]]
            pooled = self.max_pool(name, module, self.in_layout(x, TORCH))
            return self.activation(act_name, act, self._mark(pooled, TORCH), after_pool=True)
        codes = self.kind(x).codes
        if isinstance(module, (nn.Conv2d, nn.Linear)) and weight_bits(module) != FULL_PRECISION:
            reason = "its input is not a quantized activation" if codes is None else _no_integer_form(module)
            if reason is None:
                return self.integer_layer(node, name, module, x)
            self.report.qcdq[name] = reason
        if codes is not None and isinstance(module, nn.MaxPool2d):  # max of codes: the code of the max value
            return self._mark(self.max_pool(name, module, self.in_layout(x, TORCH)), TORCH, codes)
        if codes is not None and isinstance(module, nn.Flatten) and module.end_dim == -1:
            flat = self.graph.add("Flatten", [self.in_layout(x, TORCH)], name, axis=module.start_dim)
            return self._mark(flat, TORCH, codes)
        return self._with_inputs(node, self.torch_float, lambda: super(_IntWalk, self).module(node, module))

    def _pooled_only(self, node: fx.Node) -> bool:
        users = list(node.users)
        return bool(users) and all(u.op == "call_module" and type(self.modules[u.target]) is nn.MaxPool2d for u in users)

    def activation(self, name: str, act: QAct, x: str, after_pool: bool = False) -> str:
        """QuantizeLinear -> Clip. ``after_pool``: its scale is DequantizeLinear(1, scale), so that
        onnxruntime does not move the QuantizeLinear above the max pool (its QDQ propagation
        wants constant scales), which would run the pool on uint8, ~20x slower than on float."""
        quant = activation_quant(name, act)
        layout = self.kind(x).layout
        if quant is None:  # full precision: a ReLU (codes are never negative)
            return x if self.kind(x).codes is not None else self._mark(self.graph.add("Relu", [x], name), layout)
        if quant.high > UINT8_MAX:
            raise ExportError(f"cannot export layer {name!r} to ONNX: its activation integers reach {quant.high}, beyond uint8; {SAFETENSORS_HINT}")
        scale = self.graph.constant(f"{name}.scale", np.array(quant.scale, dtype=np.float32))
        zero = self.graph.constant(f"{name}.zero_point", np.array(0, dtype=np.uint8))
        if after_pool:
            scale = self.scale_value(name, scale)
        q = self.graph.add("QuantizeLinear", [self.as_float(x), scale, zero], f"{name}.quant" if quant.high < UINT8_MAX else name)
        if quant.high < UINT8_MAX:
            high = self.graph.constant(f"{name}.max", np.array(quant.high, dtype=np.uint8))
            q = self.graph.add("Clip", [q, zero, high], name)
        return self._mark(q, layout, quant)

    def integer_layer(self, node: fx.Node, name: str, module: nn.Module, x: str) -> str:
        """MatMulInteger on the input's codes, then the float affine: float32, channels-last
        for a conv (N, OH, OW, out), (N, out) for a linear."""
        codes = self.kind(x).codes
        weight = quantized_weight(name, module)
        conv = isinstance(module, nn.Conv2d)
        channels = module.weight.shape[0]
        bn = self.foldable_batchnorm(node) if conv else None
        g, h = batchnorm_affine(bn) if bn is not None else (np.ones(channels), np.zeros(channels))
        bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(channels)
        scale = np.broadcast_to(weight.scale, (channels,)) * g
        shift = bias * g + h
        stored, odd = _int8_weight(name, weight)
        # (K, out) with K in im2col's (kh, kw, c) order
        matrix = stored.transpose(2, 3, 1, 0).reshape(-1, channels) if conv else stored.T
        if odd:
            matrix = np.concatenate([matrix, np.ones((matrix.shape[0], 1), dtype=matrix.dtype)], axis=1)
        a = self.im2col(node, name, module, x) if conv else self.in_layout(x, TORCH)
        inputs = [
            a,
            self.graph.constant(f"{name}.weight_int8", np.ascontiguousarray(matrix).astype(np.int8)),
            self.graph.constant(f"{name}.input_zero_point", np.array(0, dtype=np.uint8)),
            self.graph.constant(f"{name}.weight_zero_point", np.array(0, dtype=np.int8)),
        ]
        acc = self.graph.add("MatMulInteger", inputs, name if not odd else f"{name}.acc_half")
        if odd:
            acc = self._odd_accumulator(name, acc, channels)
        self.report.integer.append(name)
        y = self.graph.add("Cast", [acc], f"{name}.acc_float", to=1)
        act_scale = self.graph.constant(f"{name}.input_scale_value", np.array(codes.scale, dtype=np.float32))
        a_scale = self.scale_value(f"{name}.input", act_scale)
        b_scale = self.graph.constant(f"{name}.out_scale", scale.astype(np.float32))
        multiplier = self.graph.add("Mul", [a_scale, b_scale], f"{name}.multiplier")
        y = self.graph.add("Mul", [y, multiplier], f"{name}.scaled")
        y = self.graph.add("Add", [y, self.graph.constant(f"{name}.shift", shift.astype(np.float32))], f"{name}.affine")
        return self._mark(y, NHWC if conv else TORCH)

    def scale_value(self, name: str, scale: str) -> str:
        """DequantizeLinear(1, scale): the scale, as a tensor that onnxruntime's constant folding
        and QDQ propagation leave where it is (module docstring)."""
        one = self.graph.constant(f"{name}.one", np.array(1, dtype=np.uint8))
        return self.graph.add("DequantizeLinear", [one, scale], f"{name}.scale_value")

    def _odd_accumulator(self, name: str, acc: str, channels: int) -> str:
        """2 * acc_m + sum of the input codes (the last column): the accumulator of the odd integers 2m + 1."""
        def part(start, end, hint):
            bounds = [self.graph.constant(f"{name}.{hint}_{k}", np.array([v], dtype=np.int64)) for k, v in (("start", start), ("end", end))]
            axis = self.graph.constant(f"{name}.{hint}_axis", np.array([-1], dtype=np.int64))
            return self.graph.add("Slice", [acc, *bounds, axis], f"{name}.{hint}")

        half, total = part(0, channels, "acc_m"), part(channels, channels + 1, "input_sum")
        doubled = self.graph.add("Add", [half, half], f"{name}.acc_2m")
        return self.graph.add("Add", [doubled, total], f"{name}.acc")

    def im2col(self, node: fx.Node, name: str, conv: nn.Conv2d, x: str) -> str:
        """(N, OH, OW, kh * kw * C) uint8 patches of the NHWC codes, in (kh, kw, c) order, by
        Gather of the zero-padded codes seen as (N, pixels, C): one pass, one C-byte copy per tap.
        Below 64 channels such small copies dominate, so the kw taps of each row are first
        concatenated (kw Slices -> Concat: (N, H, OW, kw * C)) and the Gather then copies
        kw * C bytes per kh tap (2x faster at 16 channels, slower from 64 on)."""
        _, channels, height, width = node.args[0].meta["tensor_meta"].shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        oh, ow = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        src = self.in_layout(x, NHWC)
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            return src
        if ph or pw:
            pads = self.graph.constant(f"{name}.pads", np.array([0, ph, pw, 0, 0, ph, pw, 0], dtype=np.int64))
            zero = self.graph.constant(f"{name}.pad_value", np.array(0, dtype=np.uint8))
            src = self.graph.add("Pad", [src, pads, zero], f"{name}.padded", mode="constant")
        rows = (np.arange(oh) * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
        if kw > 1 and channels < 64:
            axis = self.graph.constant(f"{name}.tap_axis", np.array([2], dtype=np.int64))
            step = self.graph.constant(f"{name}.tap_step", np.array([sw], dtype=np.int64))
            taps = []
            for j in range(kw):
                bounds = [self.graph.constant(f"{name}.tap{j}_{k}", np.array([v], dtype=np.int64)) for k, v in (("start", j * dw), ("end", j * dw + (ow - 1) * sw + 1))]
                taps.append(self.graph.add("Slice", [src, *bounds, axis, step], f"{name}.tap{j}"))
            src = self.graph.add("Concat", taps, f"{name}.row_taps", axis=3)  # (N, H + 2ph, OW, kw * C)
            index, chunk = rows * ow + np.arange(ow)[None, :, None, None], kw * channels
        else:
            cols = (np.arange(ow) * sw)[None, :, None, None] + (np.arange(kw) * dw)[None, None, None, :]
            index, chunk = rows * (width + 2 * pw) + cols, channels
        flat_shape = self.graph.constant(f"{name}.flat_shape", np.array([0, -1, chunk], dtype=np.int64))
        flat = self.graph.add("Reshape", [src, flat_shape], f"{name}.flat")  # (N, pixels, chunk)
        taken = self.graph.add("Gather", [flat, self.graph.constant(f"{name}.patch_index", index.reshape(-1).astype(np.int32))], f"{name}.patches", axis=1)
        shape = self.graph.constant(f"{name}.im2col_shape", np.array([0, oh, ow, -1], dtype=np.int64))
        return self.graph.add("Reshape", [taken, shape], f"{name}.im2col")

    # --- functions ----------------------------------------------------------------------

    def function(self, node: fx.Node) -> str:
        tensors = [self.values[a] for a in node.args if isinstance(a, fx.Node)]
        if node.target in (operator.add, torch.add, operator.iadd) and len(node.args) == 2 and len(tensors) == 2 and not node.kwargs:
            ranks = {len(a.meta["tensor_meta"].shape) for a in node.args}
            layout = NHWC if ranks == {4} and any(self.kind(x).layout == NHWC for x in tensors) else TORCH
            operands = [self.as_float(self.in_layout(x, layout)) for x in tensors]
            return self._mark(self.graph.add("Add", operands, "add"), layout)
        return self._with_inputs(node, self.torch_float, lambda: super(_IntWalk, self).function(node))


def _no_integer_form(module: nn.Module) -> str | None:
    """Why a quantized conv is written with float kernels, or None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped conv (groups={module.groups})"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    return None


def _int8_weight(name: str, weight: WeightQuant) -> tuple[np.ndarray, bool]:
    """The int8 integers to store, and whether they are (n - 1) / 2 of odd integers n."""
    if weight.low >= INT8_MIN and weight.high <= INT8_MAX:
        return weight.integers, False
    odd = weight.offset_bits is not None or bool((weight.integers % 2 != 0).all())
    if odd and (weight.low - 1) // 2 >= INT8_MIN and (weight.high - 1) // 2 <= INT8_MAX:
        return (weight.integers - 1) // 2, True
    raise ExportError(
        f"cannot export layer {name!r} to --format onnx-int: its {weight.what} weight has integers in "
        f"[{weight.low}, {weight.high}], beyond int8; {SAFETENSORS_HINT}"
    )
