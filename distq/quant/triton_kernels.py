"""Fused Triton kernels of the quantizers (``quant.kernels: triton``; ``auto`` on CUDA tensors).

One kernel per elementwise pass, one per reduction. Each kernel performs the float operations
of the eager formulas in ``distq.quant.eager`` in the same order, each rounded to the tensor's
dtype as PyTorch rounds it (bf16 inputs: computed in fp32, rounded to bf16 after every
operation), and FMA fusion is disabled at launch, so forward outputs are bit-for-bit those
of the eager code on every device. Only the reductions of the weight quantizer's backward
sum in another order (a few units in the last place).

Division by a Python number follows the device's PyTorch: on CUDA, ``tensor / scalar`` is
``tensor * (1 / scalar)`` with the reciprocal rounded to fp32 (ATen's ``div_true_kernel_cuda``
does this "optimization"); on the CPU it is a true division. ``_divide`` does what the tensor's
device does, so the kernels stay bit-exact on both.

Rounding half to even is the float trick ``(v + 1.5 * 2^m) - 1.5 * 2^m`` (m = 23 in fp32,
52 in fp64), exact for |v| < 2^(m-1): libdevice's ``rint`` does not run under Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which the default test suite uses.

Divisions are IEEE-rounded (``_div``: Triton's ``/`` is approximate on CUDA) and max/min keep
NaN as PyTorch's clamp and amax do (``_max``, ``_min``); the interpreter does both anyway, so
tests/quant/test_triton_cuda_build.py checks the PTX the CUDA compiler makes of each kernel.

``tanh`` and the mean-based scales (binary weights' mean|w|, AQE's ternary threshold) are
computed by PyTorch before the kernels: PyTorch's own ``tanh`` and summation order are part
of the reference, and the interpreter has no ``tanh``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 1024
ROW_BLOCK = 1024
SPLIT = 32 * ROW_BLOCK
"""Elements of one row per program in the weight quantizer's reductions (see "DoReFa k-bit weights")."""
NO_FMA = {"enable_fp_fusion": False}  # an FMA rounds once where PyTorch rounds twice


def _magic(dtype: torch.dtype) -> float:
    return 1.5 * 2.0**52 if dtype == torch.float64 else 1.5 * 2.0**23


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


@triton.jit
def _round_to(v, out_dtype: tl.constexpr, compute: tl.constexpr):
    """``v`` (fp32) rounded to ``out_dtype``, kept in fp32 (a no-op for fp32). bf16: round to
    nearest even on the bits, written out because Triton's CPU interpreter truncates instead."""
    if out_dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _rint(v, magic):
    return (v + magic) - magic


@triton.jit
def _max(a, b):
    """max(a, b), NaN if either is NaN, as torch's clamp and amax: CUDA's max.f32 would drop the NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min(a, b):
    """min(a, b), NaN if either is NaN (see ``_max``)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _div(a, b):
    """a / b rounded to nearest, as PyTorch divides tensors. Triton's ``/`` on fp32 compiles to
    an approximate division on CUDA (``div.full.f32``, up to 2 units in the last place); the
    interpreter divides exactly, so only a CUDA build shows it (tests/quant/test_triton_cuda_build.py)."""
    if a.dtype == tl.float64:
        return a / b  # div.rn.f64
    return tl.math.div_rn(a, b)


@triton.jit
def _divide(v, divisor, reciprocal, RECIPROCAL: tl.constexpr):
    """v / divisor as PyTorch computes a tensor divided by a Python number on this device."""
    if RECIPROCAL:
        return v * reciprocal
    return _div(v, divisor)


def _scalar_division(x: torch.Tensor, divisor: float) -> dict:
    """The arguments of ``_divide`` for a tensor on ``x``'s device."""
    import numpy as np

    return {"RECIPROCAL": x.is_cuda, "reciprocal": float(np.float32(1.0) / np.float32(divisor))}


# --- activations ------------------------------------------------------------------------


@triton.jit
def _act_forward(x_ptr, y_ptr, mask_ptr, n, levels, reciprocal, magic, NEED_MASK: tl.constexpr, RECIPROCAL: tl.constexpr,
                 COMPUTE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    out_dtype = x.dtype
    v = x.to(COMPUTE)
    clamped = _min(_max(v, 0.0), 1.0)
    t = _round_to(clamped * levels, out_dtype, COMPUTE)
    y = _divide(_rint(t, magic), levels, reciprocal, RECIPROCAL)
    tl.store(y_ptr + offs, _round_to(y, out_dtype, COMPUTE).to(out_dtype), mask=inb)
    if NEED_MASK:
        tl.store(mask_ptr + offs, (clamped == v).to(tl.uint8), mask=inb)


@triton.jit
def _masked_grad(g_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """g * mask (mask: 0/1 bytes), in g's dtype: the product with 0 or 1 is exact."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    keep = tl.load(mask_ptr + offs, mask=inb, other=0)
    tl.store(out_ptr + offs, tl.where(keep != 0, g, tl.zeros_like(g)), mask=inb)


def act_quant_forward(x: torch.Tensor, bits: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    y = torch.empty_like(x)
    mask = torch.empty(x.shape if need_mask else (0,), dtype=torch.uint8, device=x.device)
    n = x.numel()
    if n:
        levels = float((1 << bits) - 1)
        _act_forward[_grid(n)](x, y, mask, n, levels, magic=_magic(x.dtype), NEED_MASK=need_mask, COMPUTE=_compute_dtype(x.dtype),
                               BLOCK=BLOCK, **_scalar_division(x, levels), **NO_FMA)  # fmt: skip
    return y, mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _masked_grad[_grid(n)](grad, mask, out, n, BLOCK=BLOCK, **NO_FMA)
    return out


# --- DoReFa k-bit weights -------------------------------------------------------------------
# The scale is a reduction over a row (the whole tensor, or one output channel). A row longer
# than SPLIT elements is reduced by several programs, one per SPLIT-long piece (a per-tensor
# scale over millions of weights would otherwise stream through one SM), each writing a partial
# result; the elementwise kernel that follows combines the row's partials itself, in a fixed
# order (deterministic, and no kernel in between).


@triton.jit
def _row_max_abs(t_ptr, part_ptr, row_len, splits, SPLIT: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """part[row, k] = max |t| over the k-th SPLIT elements of the row."""
    row = tl.program_id(0)
    piece = tl.program_id(1)
    best = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    end = tl.minimum(piece * SPLIT + SPLIT, row_len)
    for start in range(piece * SPLIT, end, ROW_BLOCK):
        offs = start + tl.arange(0, ROW_BLOCK)
        t = tl.load(t_ptr + row * row_len + offs, mask=offs < end, other=0.0).to(tl.float32)
        best = _max(best, tl.abs(t))
    tl.store(part_ptr + row * splits + piece, tl.reduce(best, 0, _max))


@triton.jit
def _row_scale(part_ptr, row, splits, inb, ONE_ROW: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """The scale of ``row`` from its partial maxima: their maximum, 1 where that is 0 (an
    all-zero row, which quantizes to the level nearest 0 instead of 0 / 0). One row (a
    per-tensor scale): the partials are read once per program, as one vector."""
    if ONE_ROW:
        pieces = tl.arange(0, MAX_SPLITS)
        s = tl.reduce(tl.load(part_ptr + pieces, mask=pieces < splits, other=0.0), 0, _max)
    else:
        s = tl.load(part_ptr + row * splits, mask=inb, other=1.0)
        for piece in range(1, splits):
            s = _max(s, tl.load(part_ptr + row * splits + piece, mask=inb, other=1.0))
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def _row_share(part_ptr, row, splits, inb, out_dtype: tl.constexpr, ONE_ROW: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """-4 sum / max(peaks, 1) of ``row`` from its partial sums and peak counts, each rounded to
    the dtype as the eager code's tensors are (-4 x is exact). The partials are added in a
    fixed order (deterministic); one row: read once per program, as one vector."""
    if ONE_ROW:
        pieces = tl.arange(0, MAX_SPLITS)
        total = tl.sum(tl.load(part_ptr + 2 * pieces, mask=pieces < splits, other=0.0), axis=0)
        count = tl.sum(tl.load(part_ptr + 2 * pieces + 1, mask=pieces < splits, other=0.0), axis=0)
    else:
        total = tl.zeros(row.shape, dtype=tl.float32)
        count = tl.zeros(row.shape, dtype=tl.float32)
        for piece in range(0, splits):
            at = 2 * (row * splits + piece)
            total += tl.load(part_ptr + at, mask=inb, other=0.0)
            count += tl.load(part_ptr + at + 1, mask=inb, other=0.0)
    grad_s = _round_to(-4.0 * _round_to(total, out_dtype, tl.float32), out_dtype, tl.float32)
    return _round_to(_div(grad_s, _max(_round_to(count, out_dtype, tl.float32), 1.0)), out_dtype, tl.float32)


@triton.jit
def _dorefa_forward(t_ptr, part_ptr, s_ptr, q_ptr, n, row_len, splits, levels, half_levels, reciprocal, magic,
                    RECIPROCAL: tl.constexpr, COMPUTE: tl.constexpr, ONE_ROW: tl.constexpr, MAX_SPLITS: tl.constexpr,
                    BLOCK: tl.constexpr):  # fmt: skip
    """q = round((t / (2 s) + 1/2) * levels) / (levels / 2) - 1, each step rounded as eager; the
    first element of each row also writes the row's scale to s."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    t_raw = tl.load(t_ptr + offs, mask=inb, other=0.0)
    out_dtype = t_raw.dtype
    t = t_raw.to(COMPUTE)
    row = offs // row_len
    s = _row_scale(part_ptr, row, splits, inb, ONE_ROW, MAX_SPLITS).to(COMPUTE)  # the max of |t| is one of its elements: exact in t's dtype
    tl.store(s_ptr + row, s.to(out_dtype), mask=inb & (offs % row_len == 0))
    q = _round_to(_div(t, 2.0 * s), out_dtype, COMPUTE)
    q = _round_to(q + 0.5, out_dtype, COMPUTE)
    q = _round_to(q * levels, out_dtype, COMPUTE)
    q = _round_to(_divide(_rint(q, magic), half_levels, reciprocal, RECIPROCAL), out_dtype, COMPUTE)
    tl.store(q_ptr + offs, _round_to(q - 1.0, out_dtype, COMPUTE).to(out_dtype), mask=inb)


@triton.jit
def _dorefa_backward_sums(t_ptr, s_ptr, g_ptr, part_ptr, row_len, splits, SPLIT: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Per row and SPLIT-long piece: sum((t / d) / d * g) and the number of peaks (|t| == s);
    d = 2 s. Each term is rounded to the dtype as the eager code's in-place buffer rounds it;
    the sums are in fp32."""
    row = tl.program_id(0)
    piece = tl.program_id(1)
    s = tl.load(s_ptr + row).to(tl.float32)
    d = 2.0 * s
    acc = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    peaks = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    end = tl.minimum(piece * SPLIT + SPLIT, row_len)
    for start in range(piece * SPLIT, end, ROW_BLOCK):
        offs = start + tl.arange(0, ROW_BLOCK)
        inb = offs < end
        t_raw = tl.load(t_ptr + row * row_len + offs, mask=inb, other=0.0)
        dtype = t_raw.dtype
        t = t_raw.to(tl.float32)
        g = tl.load(g_ptr + row * row_len + offs, mask=inb, other=0.0).to(tl.float32)
        term = _round_to(_div(_round_to(_div(t, d), dtype, tl.float32), d), dtype, tl.float32)
        acc += _round_to(term * g, dtype, tl.float32)
        peaks += tl.where(inb & (tl.abs(t) == s), 1.0, 0.0)
    at = 2 * (row * splits + piece)
    tl.store(part_ptr + at, tl.sum(acc, axis=0))
    tl.store(part_ptr + at + 1, tl.sum(peaks, axis=0))


@triton.jit
def _dorefa_backward(t_ptr, s_ptr, g_ptr, part_ptr, out_ptr, n, row_len, splits, FMA_IN_FP64: tl.constexpr, COMPUTE: tl.constexpr,
                     ONE_ROW: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """dL/dw = (share * sign(t) at the peaks + g / s) * (1 - t^2), rounded as eager rounds it.
    share (``_row_share``) from the row's partial sums; ``addcdiv`` once (in fp32, then to
    the dtype), ``tanh_backward`` as ``g * fma(-t, t, 1)`` (PyTorch's compiled kernel contracts
    1 - t t into one FMA) then once to the dtype. The interpreter's ``tl.fma`` rounds twice;
    there the product is taken exactly in fp64 instead."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g_raw = tl.load(g_ptr + offs, mask=inb, other=0.0)
    out_dtype = g_raw.dtype
    g = g_raw.to(COMPUTE)
    t = tl.load(t_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    row = offs // row_len
    s = tl.load(s_ptr + row, mask=inb, other=1.0).to(COMPUTE)
    share = _row_share(part_ptr, row, splits, inb, out_dtype, ONE_ROW, MAX_SPLITS).to(COMPUTE)
    peak = tl.abs(t) == s
    signed = tl.where(t < 0.0, -share, share)
    grad_t = _round_to(tl.where(peak, signed, 0.0) + _div(g, s), out_dtype, COMPUTE)
    if FMA_IN_FP64:
        wide = t.to(tl.float64)
        one_minus_t2 = (1.0 - wide * wide).to(COMPUTE)
    else:
        one_minus_t2 = tl.fma(-t, t, 1.0)
    tl.store(out_ptr + offs, _round_to(grad_t * one_minus_t2, out_dtype, COMPUTE).to(out_dtype), mask=inb)


def _rows(w: torch.Tensor, per_channel: bool) -> int:
    return w.shape[0] if per_channel and w.dim() > 1 else 1


def _scale_shape(w: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    return (w.shape[0],) + (1,) * (w.dim() - 1) if per_channel and w.dim() > 1 else ()


def _splits(row_len: int) -> int:
    """How many programs reduce one row (each SPLIT elements; read at call time, tests shrink SPLIT)."""
    return max(1, triton.cdiv(row_len, SPLIT))


def _row_layout(rows: int, splits: int) -> dict:
    """The elementwise kernels' view of the partials: one row (read as one vector) or many."""
    return {"ONE_ROW": rows == 1, "MAX_SPLITS": triton.next_power_of_2(splits) if rows == 1 else 1}


def dorefa_forward(t: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) from t = tanh(w): s has the eager code's shape (keepdim per channel, 0-dim per tensor)."""
    t = t.contiguous()
    rows, n = _rows(t, per_channel), t.numel()
    row_len = n // rows
    splits = _splits(row_len)
    parts = torch.empty(rows * splits, dtype=torch.float32, device=t.device)
    _row_max_abs[(rows, splits)](t, parts, row_len, splits, SPLIT=SPLIT, ROW_BLOCK=ROW_BLOCK, **NO_FMA)
    s = torch.empty(rows, dtype=t.dtype, device=t.device)
    q = torch.empty_like(t)
    levels = (1 << bits) - 1
    _dorefa_forward[_grid(n)](t, parts, s, q, n, row_len, splits, float(levels), levels / 2, magic=_magic(t.dtype),
                              COMPUTE=_compute_dtype(t.dtype), **_row_layout(rows, splits), BLOCK=BLOCK, **_scalar_division(t, levels / 2),
                              **NO_FMA)  # fmt: skip
    return q, s.view(_scale_shape(t, per_channel))


def dorefa_backward(grad: torch.Tensor, t: torch.Tensor, s: torch.Tensor, per_channel: bool) -> torch.Tensor:
    grad, t = grad.contiguous(), t.contiguous()
    rows, n = _rows(t, per_channel), t.numel()
    row_len = n // rows
    splits = _splits(row_len)
    flat_s = s.reshape(rows).contiguous()
    parts = torch.empty(rows * splits * 2, dtype=torch.float32, device=t.device)
    _dorefa_backward_sums[(rows, splits)](t, flat_s, grad, parts, row_len, splits, SPLIT=SPLIT, ROW_BLOCK=ROW_BLOCK, **NO_FMA)
    out = torch.empty_like(grad)
    _dorefa_backward[_grid(n)](t, flat_s, grad, parts, out, n, row_len, splits, FMA_IN_FP64=os.environ.get("TRITON_INTERPRET") == "1",
                               COMPUTE=_compute_dtype(t.dtype), **_row_layout(rows, splits), BLOCK=BLOCK, **NO_FMA)  # fmt: skip
    return out


# --- binary weights and AQE -------------------------------------------------------------------


@triton.jit
def _binary_forward(w_ptr, e_ptr, q_ptr, n, row_len, BLOCK: tl.constexpr):
    """E * sign(w), sign(0) = +1."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    e = tl.load(e_ptr + offs // row_len, mask=inb, other=0.0).to(tl.float32)  # exact; negated in fp32
    tl.store(q_ptr + offs, tl.where(w.to(tl.float32) >= 0, e, -e).to(w.dtype), mask=inb)


@triton.jit
def _inside_unit(x_ptr, mask_ptr, n, BLOCK: tl.constexpr):
    """1 where |x| <= 1 (the straight-through window of binary weights and AQE)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(mask_ptr + offs, (tl.abs(x) <= 1.0).to(tl.uint8), mask=inb)


def binary_forward(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    w = w.contiguous()
    q = torch.empty_like(w)
    n = w.numel()
    rows = scale.numel()
    _binary_forward[_grid(n)](w, scale.reshape(rows).contiguous(), q, n, n // rows, BLOCK=BLOCK, **NO_FMA)
    return q


def inside_unit(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = x.numel()
    if n:
        _inside_unit[_grid(n)](x, mask, n, BLOCK=BLOCK, **NO_FMA)
    return mask


@triton.jit
def _aqe_forward(x_ptr, thr_ptr, y_ptr, mask_ptr, n, row_len, alpha, one_minus_alpha, BITS: tl.constexpr, MIX: tl.constexpr,
                 NEED_MASK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """alpha * h(x) + (1 - alpha) * x; h: sign (1 bit), ternary with the threshold given per
    row (2 bits), or the nearest power-of-two level 1, 1/2, ... (>= 3 bits)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x_raw = tl.load(x_ptr + offs, mask=inb, other=0.0)
    out_dtype = x_raw.dtype
    x = x_raw.to(COMPUTE)
    sign = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
    if BITS == 1:
        hard = tl.where(x >= 0.0, 1.0, -1.0)
    elif BITS == 2:
        threshold = tl.load(thr_ptr + offs // row_len, mask=inb, other=0.0).to(COMPUTE)
        hard = sign * tl.where(tl.abs(x) > threshold, 1.0, 0.0)
    else:
        mag = _min(tl.abs(x), 1.0)
        level = tl.zeros_like(mag)
        below = 0.0
        for p in tl.static_range((1 << (BITS - 1)) - 2, -1, -1):  # levels 2^-p from the smallest up
            value = 1.0 / (1 << p)
            level = tl.where(mag >= (below + value) / 2, value, level)
            below = value
        hard = sign * level
    if MIX:
        y = _round_to(_round_to(alpha * hard, out_dtype, COMPUTE) + _round_to(one_minus_alpha * x, out_dtype, COMPUTE), out_dtype, COMPUTE)
    else:
        y = hard
    tl.store(y_ptr + offs, _round_to(y, out_dtype, COMPUTE).to(out_dtype), mask=inb)
    if NEED_MASK:
        tl.store(mask_ptr + offs, (tl.abs(x) <= 1.0).to(tl.uint8), mask=inb)


def aqe_forward(x: torch.Tensor, bits: int, alpha: float, threshold: torch.Tensor | None, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mask); ``threshold``: 0.5 * mean|x| per row (2 bits only), computed by the caller."""
    x = x.contiguous()
    y = torch.empty_like(x)
    mask = torch.empty(x.shape if need_mask else (0,), dtype=torch.uint8, device=x.device)
    n = x.numel()
    rows = threshold.numel() if threshold is not None else 1
    thr = threshold.reshape(rows).contiguous() if threshold is not None else x.new_zeros(1)
    if n:
        _aqe_forward[_grid(n)](x, thr, y, mask, n, n // rows, alpha, 1.0 - alpha, BITS=bits, MIX=alpha != 1.0, NEED_MASK=need_mask,
                               COMPUTE=_compute_dtype(x.dtype), BLOCK=BLOCK, **NO_FMA)  # fmt: skip
    return y, mask
