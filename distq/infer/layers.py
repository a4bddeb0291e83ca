"""The integer engine's layers: activations as integers, convs and linears as bit operations.

A quantized activation travels as a ``CodedActivation``: a float tensor (its exact value,
which residual adds, pooling and float layers use as is) carrying the integers behind it
(``ints``, with ``value = ints * scale``), how those integers split into bit planes
(``code``), and the quantizer's map back from integers to values (``value_of``). What an
activation's integers are is its quantizer method's business (``QuantMethod.int_activation``,
``distq.quant.methods``); these layers only carry them. A ``BitConv2d``/``BitLinear`` that receives one computes its integer dot
products with ``distq.infer.bitops`` and meets floats only once, in the per-channel affine
that holds the activation scale, the weight scale and the folded batch-norm::

    y = acc * (act_scale * weight_scale * out_scale) + out_shift

A quantized layer that receives a plain float tensor (AlexNet's first classifier layer
reads the full-precision final features) multiplies by its integer weights in float.

Each layer runs one of two kernel sets with identical results: the native kernels
(``distq.infer.native``: packed 64-bit words, hardware popcount, the affine fused into the
GEMM's output) when ``native`` is set, else the torch reference kernels of
``distq.infer.bitops``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distq.export.format import ExportError
from distq.infer.bitops import PlaneCode, conv_weight_rows, im2col, int_dot_chunks, pack_weight
from distq.infer.native.ops import (
    NativeWeight,
    affine_quantize_pool,
    affine_to_channels_last,
    max_pool_codes,
    quantize_unit,
)
from distq.quant.methods import QuantMethod, build_method


class CodedActivation(torch.Tensor):
    """A quantized activation's float value with its integers attached (``ints``, ``code``,
    ``scale``, ``value_of``). Any torch op on it returns a plain tensor, so the integers can
    never go stale: only the engine's layers read them, straight from a QAct's output."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    ints: torch.Tensor
    code: PlaneCode
    scale: float
    value_of: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None
    """``value_of(ints, dtype)``: the values of integers, computed as the activation computed
    them (the producing ``IntAct.int_values``); None where unknown."""


def coded(values: torch.Tensor, ints: torch.Tensor, code: PlaneCode, scale: float, value_of=None) -> CodedActivation:
    out = values.as_subclass(CodedActivation)
    out.ints, out.code, out.scale, out.value_of = ints, code, scale, value_of
    return out


class IntAct(nn.Module):
    """The QAct of an exported model, producing integers: its quantizer method's
    ``int_activation`` from the header ``record`` (DoReFa k bits: round(clamp(x, 0, 1) * (2^k - 1)),
    the expression of ``distq.quant.functional.quantize_unit``; AQE: the hard quantizer h,
    per-sample ternary threshold as in QAct, times 2^P; LSQ: round(x / s) in [0, 2^k - 1];
    PACT: round(min(relu(x), alpha) * L / alpha)).

    With ``native``, an activation of the form round(clamp(x, 0, 1) * L) / L (the method's
    ``unit_levels``) runs the native ``quantize_unit``: the same expression in one pass."""

    def __init__(self, bits: int, method: QuantMethod | str, record: dict | None = None, native: bool = False):
        super().__init__()
        method = method if isinstance(method, QuantMethod) else build_method(method)
        if bits > method.max_engine_bits():
            raise ExportError(f"the integer engine runs {method} activations of 1..{method.max_engine_bits()} bits, not {bits}")
        self.bits, self.method, self.record, self.native = bits, method, dict(record or {}), native
        self.unit_levels = method.unit_levels(bits)
        """L where the activation is round(clamp(x, 0, 1) * L) / L (natively fusable), else None."""
        self.computed_by: str | None = None
        """The conv whose native output is already this activation (``distq.infer.fusion``)."""

    def int_values(self, ints: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values of this activation's integers, as ``forward`` computes them."""
        return self.method.int_values(ints, self.bits, self.record, dtype)

    def forward(self, x: torch.Tensor) -> CodedActivation:
        if self.computed_by is not None and isinstance(x, CodedActivation):
            return x
        x = x.as_subclass(torch.Tensor)
        if self.native and self.unit_levels is not None:
            n = self.unit_levels
            ints, values = quantize_unit(x, n)
            return coded(values, ints, PlaneCode("unsigned", self.bits), 1.0 / n, self.int_values)
        act = self.method.int_activation(x, self.bits, self.record)
        return coded(act.values, act.ints, PlaneCode(*act.planes), act.scale, self.int_values)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}"


class _BitLayer(nn.Module):
    """Shared by BitConv2d and BitLinear: packed weights, the affine, the two input paths."""

    def __init__(
        self, ints: torch.Tensor, bits, offset_bits, weight_scale, out_scale, out_shift, dtype, native=False, conv_geometry=()
    ):
        """``ints``: the weight's integers (the method's ``integers`` of the file's codes);
        ``offset_bits``: the method's ``offset_bits(bits)``: k when they are 2q - (2^k - 1)
        (DoReFa, +-1 weights: q is packed and the constant added), None to pack them as two's
        complement (AQE n >= 2, LSQ). ``native``: also pack the weight for the native kernels and
        run them on integer inputs; ``conv_geometry``: (kernel, stride, padding) of a conv (a
        linear is a 1x1 conv over a 1x1 image whose channels are its in-features)."""
        super().__init__()
        self.bits, self.offset_bits = bits, offset_bits
        rows = conv_weight_rows(ints) if ints.dim() == 4 else ints  # the reduction order of im2col
        self.packed = pack_weight(rows, offset_bits)
        weight_scale, out_scale = weight_scale.double(), out_scale.double()
        self.acc_scale = weight_scale * out_scale  # float64: the accumulator may exceed float32's 2^24
        self.out_shift = out_shift.double()
        self.weight_scale, self.dtype = weight_scale, dtype
        self.out_scale_f, self.out_shift_f = out_scale.to(dtype), out_shift.to(dtype)
        self._float_weight: torch.Tensor | None = None
        self.calls = {"bit": 0, "float": 0}
        self.native: NativeWeight | None = None
        if native:
            self.native = NativeWeight(self.packed, ints.shape[1], *conv_geometry)
            self._native_shift = self.out_shift.expand(self.native.out).contiguous()
            self._native_scale: tuple[float, torch.Tensor] | None = None
        self.fused_act_bits = 0
        """> 0: this layer's native output is the activation of that many bits that follows it
        (``distq.infer.fusion``: one with ``unit_levels``): values and integers, not the affine's floats."""
        self.fused_levels = 0
        self.fused_code: PlaneCode | None = None
        self.fused_values = None
        self.takes_residual = False
        """True: ``forward(x, residual)`` adds the residual to its output (``distq.infer.fusion``
        moved a following ``+`` into this layer)."""

    def float_weight(self) -> torch.Tensor:
        """The dequantized weight, for float inputs only; made on first use so that an
        engine whose layers all get integers holds no float copy of its weights."""
        if self._float_weight is None:
            ints = self._weight_shape(self.packed.integers())
            self._float_weight = (ints.double() * self.weight_scale.view((-1,) + (1,) * (ints.dim() - 1))).to(self.dtype)
        return self._float_weight

    def _weight_shape(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def _bit_forward(self, ints: torch.Tensor, x: CodedActivation) -> torch.Tensor:
        """(R, K) activation integers -> (R, out) floats: bit-op dot products, then the
        affine in float64 (the accumulator may exceed float32's 2^24), chunk by chunk."""
        self.calls["bit"] += 1
        scale = x.scale * self.acc_scale
        y = torch.empty(ints.shape[0], self.packed.out_features, dtype=x.dtype)
        for rows, acc in int_dot_chunks(ints, x.code, self.packed):
            y[rows] = acc.double().mul_(scale).add_(self.out_shift)
        return y

    def fuse_activation(self, act: IntAct) -> None:
        """From now on the native output is ``act``, the activation that follows (one with
        ``unit_levels``: round(clamp(y, 0, 1) * L) / L)."""
        if act.unit_levels is None:
            raise ValueError(f"the native kernels fuse only activations round(clamp(x, 0, 1) * L) / L, not {act.method}'s")
        self.fused_act_bits, self.fused_levels = act.bits, act.unit_levels
        self.fused_code, self.fused_values = PlaneCode("unsigned", act.bits), act.int_values

    def _native_forward(self, x: CodedActivation, ints: torch.Tensor, residual=None):
        """Integer activations -> the native GEMM with the affine (and the residual) fused into
        its output, in the reference's arithmetic: floats (conv: channels-last NCHW; linear:
        rows), or with a fused activation its CodedActivation."""
        self.calls["bit"] += 1
        if self._native_scale is None or self._native_scale[0] != x.scale:  # the same scale on every call
            self._native_scale = (x.scale, (x.scale * self.acc_scale).expand(self.native.out).contiguous())
        run = self.native.conv if ints.dim() == 4 else self.native.linear
        n = self.fused_levels if self.fused_act_bits else 0
        if residual is not None:
            residual = residual.as_subclass(torch.Tensor)
        y = run(ints, x.code, self._native_scale[1], self._native_shift, x.dtype, n, residual)
        return coded(y[0], y[1], self.fused_code, 1.0 / n, self.fused_values) if n else y

    def _float_affine(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        return channel_affine(y, self.out_scale_f, self.out_shift_f, channel_dim)


def channel_affine(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """y * scale + shift with one value per channel (dimension ``channel_dim``)."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y * scale.view(shape) + shift.view(shape)


class BitConv2d(_BitLayer):
    def __init__(
        self, conv: nn.Conv2d, ints, bits, offset_bits, weight_scale, out_scale, out_shift, dtype=torch.float32, native=False
    ):
        geometry = (conv.kernel_size, conv.stride, conv.padding)
        super().__init__(ints, bits, offset_bits, weight_scale, out_scale, out_shift, dtype, native, geometry)
        self.kernel_size, self.stride, self.padding = geometry

    def _weight_shape(self, rows: torch.Tensor) -> torch.Tensor:
        """(out, kh * kw * C) rows -> (out, C, kh, kw), undoing ``conv_weight_rows``."""
        kh, kw = self.kernel_size
        return rows.view(rows.shape[0], kh, kw, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual``: added to the output (see ``takes_residual``)."""
        if self.native is not None and isinstance(x, CodedActivation):
            return self._native_forward(x, x.ints, residual)
        if isinstance(x, CodedActivation):
            patches, oh, ow = im2col(x.ints, self.kernel_size, self.stride, self.padding)
            # NCHW view of channels-last memory (N * OH * OW, out): the next im2col reads it without a transpose.
            y = self._bit_forward(patches, x).view(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2)
        else:
            self.calls["float"] += 1
            y = self._float_affine(F.conv2d(x, self.float_weight(), None, self.stride, self.padding), 1)
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        return f"out={self.packed.out_features}, kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, bits={self.bits}"


class BitLinear(_BitLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, CodedActivation):
            self.calls["float"] += 1
            return self._float_affine(F.linear(x, self.float_weight()), -1)
        if self.native is not None:
            y = self._native_forward(x, x.ints.reshape(-1, x.shape[-1]))
            return y.view(*x.shape[:-1], -1) if x.dim() != 2 else y
        return self._bit_forward(x.ints.reshape(-1, x.shape[-1]), x).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"out={self.packed.out_features}, bits={self.bits}"


class CodedMaxPool2d(nn.MaxPool2d):
    """Max pooling that keeps a quantized activation's integers: the quantizers are
    monotone, so the max of the values is the value of the max integer.

    ``native``: unsigned codes (uint8) are pooled as integers by the native kernel, and each
    pooled value is looked up from its code in a table the producing activation's
    ``value_of`` made, which gives exactly the max of the values."""

    def __init__(self, *args, native: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.native = native
        self._value_tables: dict = {}
        self.computed_by: str | None = None
        """The float conv whose native output is already this pool's (``distq.infer.fusion``)."""

    def native_geometry(self):
        """(kernel, stride, padding) pairs where the native kernel applies, else None."""
        if self.dilation not in (1, (1, 1)) or self.ceil_mode:
            return None
        pair = nn.modules.utils._pair
        return pair(self.kernel_size), pair(self.stride if self.stride is not None else self.kernel_size), pair(self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, CodedActivation):
            return super().forward(x)
        if self.computed_by is not None:
            return x
        geometry = self.native_geometry() if self.native else None
        value_of = getattr(x, "value_of", None)
        if geometry is not None and value_of is not None and x.code.kind == "unsigned" and x.ints.dtype == torch.uint8:
            key = (value_of, x.dtype)
            if key not in self._value_tables:
                self._value_tables[key] = value_of(torch.arange(256, dtype=torch.uint8), x.dtype)
            ints, values = max_pool_codes(x.ints, self._value_tables[key], *geometry)
            return coded(values, ints, x.code, x.scale, value_of)
        y, idx = F.max_pool2d(
            x.as_subclass(torch.Tensor),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
            return_indices=True,
        )
        ints = x.ints.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        return coded(y, ints, x.code, x.scale, getattr(x, "value_of", None))


class FloatLayer(nn.Module):
    """A full-precision conv or linear with its bias and batch-norm folded into a
    per-channel affine: y = op(x, weight) * out_scale + out_shift.

    ``native``: a conv's affine runs natively and writes channels-last (the same roundings),
    the layout the native layers after it read; torch's broadcast affine and later
    mixed-layout adds cost more than the conv itself at small sizes."""

    def __init__(self, original: nn.Module, weight: torch.Tensor, out_scale: torch.Tensor, out_shift: torch.Tensor, dtype, native=False):
        super().__init__()
        self.native = native
        self.fused_act_bits = 0
        """> 0: the output is the activation of that many bits that follows (``distq.infer.fusion``)."""
        self.fused_levels, self.fused_values = 0, None
        self.fused_pool: tuple | None = None
        """(kernel, stride, padding) of a max pool after that activation, also fused."""
        self.weight, self.out_scale, self.out_shift = weight.to(dtype), out_scale.to(dtype), out_shift.to(dtype)
        self.conv = isinstance(original, nn.Conv2d)
        if self.conv:
            self.stride, self.padding = original.stride, original.padding

    def fuse_activation(self, act: IntAct, pool: tuple | None = None) -> None:
        """From now on a conv's output is ``act``, the activation that follows (one with
        ``unit_levels``), or that activation max-pooled with ``pool`` = (kernel, stride, padding)."""
        if act.unit_levels is None:
            raise ValueError(f"the native kernels fuse only activations round(clamp(x, 0, 1) * L) / L, not {act.method}'s")
        self.fused_act_bits, self.fused_levels, self.fused_values, self.fused_pool = act.bits, act.unit_levels, act.int_values, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_subclass(torch.Tensor)
        if self.conv:
            y = F.conv2d(x, self.weight, None, self.stride, self.padding)
            if self.native and self.fused_act_bits:
                n = self.fused_levels
                if self.fused_pool is not None:
                    values, codes = affine_quantize_pool(y, self.out_scale, self.out_shift, n, *self.fused_pool)
                else:
                    values, codes = affine_to_channels_last(y, self.out_scale, self.out_shift, n)
                return coded(values, codes, PlaneCode("unsigned", self.fused_act_bits), 1.0 / n, self.fused_values)
            if self.native:
                return affine_to_channels_last(y, self.out_scale, self.out_shift)
            return channel_affine(y, self.out_scale, self.out_shift, 1)
        return channel_affine(F.linear(x, self.weight), self.out_scale, self.out_shift, -1)

    def extra_repr(self) -> str:
        return f"{'conv' if self.conv else 'linear'} {tuple(self.weight.shape)}"


class ChannelAffine(nn.Module):
    """A batch-norm that had no conv to fold into: y = x * scale + shift per channel."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_affine(x, self.scale, self.shift, 1)
