"""The native kernels on torch tensors, in the engine's terms (``PackedWeight``, ``PlaneCode``).

A layer's weight is converted once from the reference engine's packing (``PackedWeight``:
32-bit words, planes of the export's codes) to the native layout: 64-bit words stored
[word][plane][output channel], the output channels padded to a multiple of 8 so that a
vector load of 8 channels never leaves the tensor. One native call per layer packs the
previous layer's channels-last integers line by line, does im2col on those bits, the
blocked AND/XNOR-popcount GEMM, the affine and, where fused, the next activation.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from distq.infer.bitops import PackedWeight, PlaneCode
from distq.native.library import ELEMENT_KINDS, MAX_PLANES, OUT_KINDS, Code, Layer, load

VECTOR_CHANNELS = 8
"""Output channels per widest vector (AVX-512: 8 x 64 bits): the padding of the weight layout."""


def _code(coefs: tuple[int, ...], sign: bool) -> Code:
    """Coefficients +-2^s -> a dq_code."""
    if len(coefs) > MAX_PLANES:
        raise ValueError(f"{len(coefs)} planes: the native kernels take at most {MAX_PLANES}")
    code = Code(planes=len(coefs), sign=int(sign))
    for i, c in enumerate(coefs):
        if c == 0 or abs(c) & (abs(c) - 1):
            raise ValueError(f"plane coefficient {c} is not +-2^s")
        code.shift[i], code.negative[i] = abs(c).bit_length() - 1, int(c < 0)
    return code


_activation_codes: dict[PlaneCode, Code] = {}


def activation_address(code: PlaneCode) -> int:
    """The address of ``code`` as a dq_code (made once per code and kept)."""
    if code not in _activation_codes:
        _activation_codes[code] = _code(code.coefs, code.kind == "sign")
    return ctypes.addressof(_activation_codes[code])


def _threads() -> int:
    return torch.get_num_threads()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {what} rejected its arguments (status {status})")


def pack_rows(ints: torch.Tensor, code: PlaneCode) -> torch.Tensor:
    """(rows, cols) integers -> (rows, planes, ceil(cols / 64)) int64 words of their planes."""
    ints = ints.contiguous()
    if ints.dtype not in ELEMENT_KINDS:
        raise TypeError(f"native packing takes {', '.join(map(str, ELEMENT_KINDS))} integers, not {ints.dtype}")
    rows, cols = ints.shape
    out = torch.empty(rows, len(code.coefs), -(-cols // 64), dtype=torch.int64)
    status = load().dq_pack(ints.data_ptr(), ELEMENT_KINDS[ints.dtype], rows, cols, activation_address(code), out.data_ptr(), _threads())
    _check(status, "packing")
    return out


class NativeWeight:
    """A layer's packed weight in the native layout, with its conv geometry (a linear is a
    1x1 conv over a 1x1 image whose channels are the in-features)."""

    def __init__(self, packed: PackedWeight, in_channels: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0)):
        if load() is None:
            raise RuntimeError("the native kernels are not available")
        words32, planes, out = packed.by_word.shape
        out_padded = -(-out // VECTOR_CHANNELS) * VECTOR_CHANNELS
        # Pairs of 32-bit words are one little-endian 64-bit word: bit k stays bit k.
        padded = F.pad(packed.by_word, (0, out_padded - out, 0, 0, 0, words32 % 2))
        pairs = padded.view(-1, 2, planes, out_padded).permute(0, 2, 3, 1).contiguous()
        self.words = pairs.view(torch.int64).view(-1, planes, out_padded)  # [word][plane][out]; kept alive for C
        self.out, self.in_channels = out, in_channels
        self.layer = Layer(
            words=self.words.data_ptr(),
            out=out,
            out_padded=out_padded,
            k_words=self.words.shape[0],
            offset=packed.offset,
            in_channels=in_channels,
            kernel_h=kernel[0],
            kernel_w=kernel[1],
            stride_h=stride[0],
            stride_w=stride[1],
            pad_h=padding[0],
            pad_w=padding[1],
            code=_code(packed.coefs, packed.sign),
        )
        self._address = ctypes.addressof(self.layer)
        self._bit_conv = load().dq_bit_conv
        self.kernel, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def conv(self, ints: torch.Tensor, code: PlaneCode, scale=None, shift=None, dtype=torch.int64, levels=0, residual=None):
        """(N, C, H, W) integers (any layout; channels-last is read in place) -> (N, out, OH, OW)
        with channels-last memory: the exact integer dot products (``dtype`` int64), or
        acc * scale + shift (float64 maths) as ``dtype``, plus ``residual`` (N, out, OH, OW)
        if given; with ``levels``, that quantized for DoReFa's next activation: (values, codes)."""
        n, _, h, w = ints.shape
        oh, ow = self.output_size(h, w)
        if residual is not None:
            residual = _channels_last_rows(residual, dtype)
        out = self._run(_channels_last_rows(ints), code, n, h, w, (n, oh, ow, self.out), scale, shift, dtype, levels, residual)
        return tuple(t.permute(0, 3, 1, 2) for t in out) if levels else out.permute(0, 3, 1, 2)

    def linear(self, rows: torch.Tensor, code: PlaneCode, scale=None, shift=None, dtype=torch.int64, levels=0, residual=None):
        """(R, in_features) integers -> (R, out), as ``conv``."""
        rows = rows.contiguous()
        if residual is not None:
            residual = residual.to(dtype).contiguous()
        return self._run(rows, code, rows.shape[0], 1, 1, (rows.shape[0], self.out), scale, shift, dtype, levels, residual)

    def _run(self, ints, code, n, h, w, out_shape, scale, shift, dtype, levels, residual):
        """One native call; the Python here runs once per layer and image batch, so it stays lean."""
        elem = ELEMENT_KINDS.get(ints.dtype)
        if elem is None:
            raise TypeError(f"native kernels take {', '.join(map(str, ELEMENT_KINDS))} integers, not {ints.dtype}")
        values = torch.empty(out_shape, dtype=dtype)
        codes = torch.empty(out_shape, dtype=torch.uint8) if levels else None
        status = self._bit_conv(
            self._address,
            activation_address(code),
            ints.data_ptr(),
            elem,
            n,
            h,
            w,
            None if scale is None else scale.data_ptr(),
            None if shift is None else shift.data_ptr(),
            None if residual is None else residual.data_ptr(),
            OUT_KINDS[dtype],
            levels,
            values.data_ptr(),
            None if codes is None else codes.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            _check(status, "conv")
        return (values, codes) if levels else values


def _channels_last_rows(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An (N, C, H, W) tensor's memory as channels-last rows, copied only if it is not already."""
    nhwc = t.permute(0, 2, 3, 1)
    if dtype is not None and nhwc.dtype != dtype:
        nhwc = nhwc.to(dtype)
    return nhwc if nhwc.is_contiguous() else nhwc.contiguous()


def int_dot(x_ints: torch.Tensor, code: PlaneCode, weight: PackedWeight) -> torch.Tensor:
    """Exact integer products (R, K) x (O, K)^T -> (R, O) int64, natively: the counterpart of
    ``distq.infer.bitops.int_dot``."""
    return NativeWeight(weight, in_channels=x_ints.shape[1]).linear(x_ints, code)


def affine_to_channels_last(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, levels: int = 0):
    """y * scale + shift per channel of an NCHW float tensor (two roundings, as torch computes
    it), returned with channels-last memory: what the native layers after it read best. With
    ``levels``: that quantized for DoReFa's next activation, (values, codes)."""
    n, c, h, w = y.shape
    y, scale, shift = y.contiguous(), scale.to(y.dtype).expand(c).contiguous(), shift.to(y.dtype).expand(c).contiguous()
    out = torch.empty(n, h, w, c, dtype=y.dtype)
    codes = torch.empty(n, h, w, c, dtype=torch.uint8) if levels else None
    status = load().dq_affine_to_channels_last(
        y.data_ptr(),
        int(y.dtype == torch.float64),
        n,
        c,
        h * w,
        scale.data_ptr(),
        shift.data_ptr(),
        levels,
        out.data_ptr(),
        None if codes is None else codes.data_ptr(),
        _threads(),
    )
    _check(status, "affine")
    return (out.permute(0, 3, 1, 2), codes.permute(0, 3, 1, 2)) if levels else out.permute(0, 3, 1, 2)


def affine_quantize_pool(y: torch.Tensor, scale, shift, levels: int, kernel, stride, padding):
    """A float conv's NCHW output -> its per-channel affine, DoReFa activation of ``levels``
    and max pool in one pass, as ``affine_to_channels_last`` then ``max_pool_codes`` compute
    them: (values, codes) of the pooled activation, channels-last. The full-size activation
    is never written."""
    n, c, h, w = y.shape
    y, scale, shift = y.contiguous(), scale.to(y.dtype).expand(c).contiguous(), shift.to(y.dtype).expand(c).contiguous()
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    values = torch.empty(n, oh, ow, c, dtype=y.dtype)
    codes = torch.empty(n, oh, ow, c, dtype=torch.uint8)
    status = load().dq_affine_quantize_pool(
        y.data_ptr(),
        int(y.dtype == torch.float64),
        n,
        c,
        h,
        w,
        scale.data_ptr(),
        shift.data_ptr(),
        levels,
        (ctypes.c_int32 * 6)(kh, kw, sh, sw, ph, pw),
        values.data_ptr(),
        codes.data_ptr(),
        _threads(),
    )
    _check(status, "affine + pool")
    return values.permute(0, 3, 1, 2), codes.permute(0, 3, 1, 2)


def max_pool_codes(ints: torch.Tensor, values: torch.Tensor, kernel, stride, padding) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of (N, C, H, W) uint8 codes, channels-last; ``values[code]`` (256 entries)
    is each code's value. Returns the pooled codes and their values, both channels-last."""
    n, c, h, w = ints.shape
    nhwc = ints.permute(0, 2, 3, 1).contiguous()
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = torch.empty(n, oh, ow, c, dtype=torch.uint8)
    out_values = torch.empty(n, oh, ow, c, dtype=values.dtype)
    geometry = (ctypes.c_int32 * 6)(kh, kw, sh, sw, ph, pw)
    status = load().dq_max_pool_codes(
        nhwc.data_ptr(),
        n,
        h,
        w,
        c,
        geometry,
        values.data_ptr(),
        int(values.dtype == torch.float64),
        out.data_ptr(),
        out_values.data_ptr(),
        _threads(),
    )
    _check(status, "max pool")
    return out.permute(0, 3, 1, 2), out_values.permute(0, 3, 1, 2)


class KernelTimes:
    """``with KernelTimes() as t:`` -> t.seconds = {"packing", "im2col", "gemm"}: the time the
    native convs spent in each part inside the block (for benchmarks)."""

    PARTS = ("packing", "im2col", "gemm")

    def __enter__(self):
        load().dq_profile(1, None)
        return self

    def __exit__(self, *exc):
        seconds = (ctypes.c_double * 3)()
        load().dq_profile(0, seconds)
        self.seconds = dict(zip(self.PARTS, seconds))


def quantize_unit(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DoReFa's activation integers and values in one pass: round(clamp(x, 0, 1) * levels) as
    uint8, and those integers / levels in x's dtype; both keep x's memory layout."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    ints = torch.empty_like(x, dtype=torch.uint8)
    values = torch.empty_like(x)
    status = load().dq_quantize_unit(
        x.data_ptr(), int(x.dtype == torch.float64), x.numel(), levels, ints.data_ptr(), values.data_ptr(), _threads()
    )
    _check(status, "quantizer")
    return ints, values
