"""Bit-level kernels of the integer engine, as vectorised torch integer ops.

Operands are *bit planes packed along the reduction dimension*: a row of K binary values
becomes ceil(K / 32) int32 words (bit k of the row is bit k % 32 of word k // 32; the
tail of the last word is zero). A dot product of two binary rows is then
``sum(popcount(a & b))`` over their words: 32 multiply-adds per AND.

A k-bit integer operand is a weighted sum of binary planes, ``x = sum_i c_i x_i`` with
c_i = +-2^s (unsigned: c_i = 2^i; two's complement: the top plane is negative), so

    x . w = sum_i sum_j c_i d_j popcount(x_i & w_j)              (bit-serial AND + popcount)

where every weight c_i d_j is +-2^s (a shift in hardware). Weights may add a constant (``w = sum_j d_j w_j +
w0``, e.g. DoReFa's 2q - L), which costs one popcount of each activation plane. For +-1
activations against +-1 weights the XNOR form is used instead:
``x . w = n_valid - 2 popcount((x ^ w) & valid)``.

torch has no popcount op: ``byte_counts_``/``sum_bytes_`` are the SWAR bit trick. Zero
padding is exact because a padded activation is the integer 0, whose planes are zero
bits (and, in the XNOR form, outside the ``valid`` mask).

Why int32 words and small chunks: on CPU, torch vectorises int32 add/multiply but not
int64 (measured 3-4x slower per bit), and fresh multi-megabyte tensors cost page faults
that can exceed the arithmetic, so every kernel works on row chunks whose temporaries
stay within ``CHUNK_ELEMENTS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WORD = torch.int32
WORD_BITS = 32
CHUNK_ELEMENTS = 1 << 17
"""Words (int32) in one chunk's largest temporary (512 KiB): it and its siblings stay in cache."""

_M1 = 0x55555555
_M2 = 0x33333333
_M4 = 0x0F0F0F0F
_M8 = 0x00FF00FF
_LANES16 = 0x00010001
_BYTE_LSBS = 0x0101010101010101
_GATHER = 0x0102040810204080
"""Multiplying an int64 whose 8 bytes are 0/1 by this moves byte b's bit to bit 56 + b
with no carries (every partial product lands on its own bit): ``>> 56`` is the packed byte."""
_FLUSH_WORDS = 31
"""Words whose per-byte counts can be added before a byte overflows (8 * 31 = 248 < 256)."""
_SHIFT = {n: torch.tensor(n, dtype=WORD) for n in (1, 2, 4, 8, 16)}
"""Shift amounts as int32 tensors: a Python int would be converted on every call."""


# --- popcount -----------------------------------------------------------------------------


def byte_counts_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In place: every byte of every int32 word becomes the number of its set bits (0..8).

    The first three SWAR steps. An arithmetic shift of a negative word only smears the
    sign into the top bit, which every mask clears, so signed words are exact.
    """
    torch.bitwise_right_shift(x, _SHIFT[1], out=tmp).bitwise_and_(_M1)
    x.sub_(tmp)
    torch.bitwise_right_shift(x, _SHIFT[2], out=tmp).bitwise_and_(_M2)
    x.bitwise_and_(_M2).add_(tmp)
    torch.bitwise_right_shift(x, _SHIFT[4], out=tmp)
    return x.add_(tmp).bitwise_and_(_M4)


def sum_bytes_(x: torch.Tensor) -> torch.Tensor:
    """In place: the sum of each word's 4 bytes (each up to 255), as int32.

    Bytes are added in pairs into 16-bit lanes (at most 510), so the multiply that
    gathers both lanes into the top one never carries."""
    tmp = torch.bitwise_right_shift(x, _SHIFT[8]).bitwise_and_(_M8)
    x.bitwise_and_(_M8).add_(tmp)
    return x.mul_(_LANES16).bitwise_right_shift_(_SHIFT[16]).bitwise_and_(0xFFFF)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of every int32 word (a new tensor; the input is kept)."""
    x = words.clone()
    return sum_bytes_(byte_counts_(x, torch.empty_like(x)))


def _popcount_sum(fill, shape: tuple[int, ...], n_words: int) -> torch.Tensor:
    """sum over k < n_words of popcount(word_k) (int32), where ``fill(k, buf)`` writes word_k.

    Per-byte counts of up to ``_FLUSH_WORDS`` words are added before the byte sum, so the
    tail of the popcount runs once per 31 words, not once per word. Everything stays
    int32 (a count is at most 32 * n_words), which torch vectorises and int64 it does not.
    """
    buf, tmp = torch.empty(shape, dtype=WORD), torch.empty(shape, dtype=WORD)
    byte_sums, out = torch.zeros(shape, dtype=WORD), torch.zeros(shape, dtype=WORD)
    for k in range(n_words):
        fill(k, buf)
        byte_sums.add_(byte_counts_(buf, tmp))
        if k % _FLUSH_WORDS == _FLUSH_WORDS - 1 or k == n_words - 1:
            out.add_(sum_bytes_(byte_sums))
            byte_sums.zero_()
    return out


# --- packing ------------------------------------------------------------------------------


def words_for(k: int) -> int:
    return -(-k // WORD_BITS)


def pad_to_words(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dimension to a whole number of words."""
    k = t.shape[-1]
    extra = words_for(k) * WORD_BITS - k
    return F.pad(t, (0, extra)) if extra else t


def _gather_bytes(lsbs: torch.Tensor) -> torch.Tensor:
    """int64s whose bytes are 0/1 -> one uint8 per int64 holding those 8 bits."""
    return ((lsbs * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) tensor of 0/1 -> (..., ceil(K / 32)) int32 words."""
    as_int64 = pad_to_words(bits.to(torch.uint8)).contiguous().view(torch.int64)
    return _gather_bytes(as_int64).view(WORD)


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: (..., W) words -> (..., k) uint8 of 0/1."""
    as_bytes = words.contiguous().view(torch.uint8)
    bits = (as_bytes.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :k]


def pack_byte_planes(ints: torch.Tensor, planes: int) -> torch.Tensor:
    """Bit planes of 8-bit integers (uint8, or int8 as two's complement), packed:
    (..., K) -> (..., planes, ceil(K / 32)) words.

    Eight codes are read as one int64, so plane i of all eight is ``(v >> i) & 0x0101..01``
    and one multiply packs them: a few ops per 8 codes and plane.
    """
    as_int64 = pad_to_words(ints).contiguous().view(torch.uint8).view(torch.int64)
    stacked = torch.stack([(as_int64 >> i).bitwise_and_(_BYTE_LSBS) for i in range(planes)], dim=-2)
    return _gather_bytes(stacked).view(WORD)


@dataclass(frozen=True)
class PlaneCode:
    """How integers are written as binary planes: ``x = sum_i coefs[i] * plane_i(x)``.

    ``unsigned``: bit i of x, coefficient 2^i. ``twos``: bit i of x in two's complement,
    the top plane weighted -2^(bits-1). ``sign``: x in {-1, 0, +1} with 0 only for
    padding, as the planes (x > 0, weight 2) and (x != 0, weight -1).
    """

    kind: str
    bits: int

    @property
    def coefs(self) -> tuple[int, ...]:
        if self.kind == "sign":
            return (2, -1)
        if self.kind == "twos":
            return tuple(1 << i for i in range(self.bits - 1)) + (-(1 << (self.bits - 1)),)
        return tuple(1 << i for i in range(self.bits))

    def planes(self, ints: torch.Tensor) -> torch.Tensor:
        """(..., K) integers -> (..., planes, ceil(K / 32)) packed words."""
        if self.kind == "sign":
            return pack_bits(torch.stack([ints > 0, ints != 0], dim=-2))
        if ints.element_size() == 1 and self.bits <= 8:
            return pack_byte_planes(ints, self.bits)
        shifts = torch.arange(self.bits, dtype=ints.dtype).unsqueeze(-1)
        return pack_bits((ints.unsqueeze(-2) >> shifts) & 1)  # arithmetic shift: two's complement bits


@dataclass
class PackedWeight:
    """An (out, K) weight as packed planes, ``w = sum_j coefs[j] w_j + offset``.

    Stored word-major, (words, planes, out): the kernels read one word position of every
    plane and output at a time, contiguously.
    """

    by_word: torch.Tensor
    in_features: int
    coefs: tuple[int, ...]
    offset: int = 0
    sign: bool = False
    """True when every weight is +-1 (one plane, coefficient 2, offset -1): XNOR applies."""

    @property
    def out_features(self) -> int:
        return self.by_word.shape[2]

    @property
    def planes(self) -> int:
        return self.by_word.shape[1]

    def integers(self) -> torch.Tensor:
        """The (out, K) int64 weight matrix back from its planes."""
        bits = unpack_bits(self.by_word.permute(2, 1, 0), self.in_features).to(torch.int64)  # (out, planes, K)
        return (bits * torch.tensor(self.coefs).view(1, -1, 1)).sum(1) + self.offset


def pack_weight(ints: torch.Tensor, offset_binary_bits: int | None = None) -> PackedWeight:
    """Pack an (out, K) integer weight matrix.

    ``offset_binary_bits=k``: the integers are 2q - (2^k - 1) for k-bit codes q (DoReFa,
    and +-1 weights), packed as the k planes of q with coefficients 2^(j+1) and offset
    -(2^k - 1). Otherwise two's complement with just enough planes.
    """
    if offset_binary_bits is not None:
        k = offset_binary_bits
        q = ((ints + ((1 << k) - 1)) // 2).to(torch.uint8)  # a byte per code: the fast packing path
        planes = PlaneCode("unsigned", k).planes(q)
        return PackedWeight(_word_major(planes), ints.shape[1], tuple(2 << j for j in range(k)), -((1 << k) - 1), sign=k == 1)
    code = PlaneCode("twos", twos_bits(int(ints.abs().max()) if ints.numel() else 0))
    return PackedWeight(_word_major(code.planes(ints)), ints.shape[1], code.coefs)


def _word_major(planes: torch.Tensor) -> torch.Tensor:
    return planes.permute(2, 1, 0).contiguous()  # (out, planes, words) -> (words, planes, out)


def twos_bits(max_abs: int) -> int:
    """Planes of a two's complement code holding -max_abs..max_abs."""
    return max(max_abs, 1).bit_length() + 1


# --- dot products -------------------------------------------------------------------------


def and_popcount(x: torch.Tensor, w_by_word: torch.Tensor) -> torch.Tensor:
    """counts[i, j, r, o] = sum over words k of popcount(x[r, i, k] & w[k, j, o]).

    x: (R, A, W) activation words; w_by_word: (W, B, O) weight words
    (``PackedWeight.by_word``); returns (A, B, R, O) int32, plane pairs outermost so
    that weighting and summing them runs over contiguous slabs.
    """
    rows, a, n_words = x.shape
    _, b, o = w_by_word.shape
    x_by_word = x.permute(2, 1, 0).contiguous()  # (W, A, R)

    def fill(k, buf):
        torch.bitwise_and(x_by_word[k].view(a, 1, rows, 1), w_by_word[k].view(1, b, 1, o), out=buf)

    return _popcount_sum(fill, (a, b, rows, o), n_words)


def xor_popcount(x: torch.Tensor, w_by_word: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mismatches[r, o] = sum over words k of popcount((x[r, k] ^ w[k, o]) & valid[r, k]).

    x, valid: (R, W); w_by_word: (W, O); returns (R, O) int64.
    """
    rows, n_words = x.shape
    o = w_by_word.shape[1]
    x_by_word, valid_by_word = x.t().contiguous(), valid.t().contiguous()

    def fill(k, buf):
        torch.bitwise_xor(x_by_word[k].view(rows, 1), w_by_word[k].view(1, o), out=buf).bitwise_and_(
            valid_by_word[k].view(rows, 1)
        )

    return _popcount_sum(fill, (rows, o), n_words)


def bitserial_dot(x_words: torch.Tensor, x_coefs: tuple[int, ...], weight: PackedWeight) -> torch.Tensor:
    """acc[r, o] = x[r] . w[o] (int64) for packed activations x (R, A, W) and a packed
    weight: AND + popcount over every pair of planes, each count weighted by c_i d_j."""
    rows, a, n_words = x_words.shape
    o, b = weight.out_features, weight.planes
    coefs = torch.tensor([[c * d for d in weight.coefs] for c in x_coefs], dtype=torch.int64)
    # The products stay in int32 (vectorised) unless the largest possible sum could overflow it.
    exact_in_int32 = n_words * WORD_BITS * int(coefs.abs().sum()) < 2**31
    counts = and_popcount(x_words, weight.by_word).view(a * b, rows * o)
    if not exact_in_int32:
        counts = counts.to(torch.int64)
    acc = counts.mul_(coefs.view(-1, 1).to(counts.dtype)).sum(0, dtype=counts.dtype).view(rows, o).to(torch.int64)
    if weight.offset:
        # sum_k x_k * offset: the popcount of each activation plane, weighted.
        plane_sums = popcount(x_words).sum(-1, dtype=torch.int64)  # (R, A)
        acc += weight.offset * (plane_sums * torch.tensor(x_coefs, dtype=torch.int64)).sum(-1, keepdim=True)
    return acc


def xnor_dot(x_ints: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """acc[r, o] = x[r] . w[o] for x in {-1, +1} (0 = padding) and +-1 weights:
    matches minus mismatches over the valid positions, by XOR + popcount."""
    planes = PlaneCode("sign", 1).planes(x_ints)  # (R, 2, W): (x > 0), valid
    positive, valid = planes[:, 0], planes[:, 1]
    mismatches = xor_popcount(positive, weight.by_word[:, 0], valid)
    return popcount(valid).sum(-1, keepdim=True, dtype=torch.int64) - 2 * mismatches.to(torch.int64)


def row_chunks(rows: int, per_row: int):
    """Row ranges whose temporaries hold at most ``CHUNK_ELEMENTS`` elements each."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


def int_dot_chunks(x_ints: torch.Tensor, code: PlaneCode, weight: PackedWeight):
    """Yield (rows, acc) over row chunks of the exact integer products (R, K) x (O, K)^T,
    acc int64 (chunk, O), computed with bit operations only. Chunks keep every
    temporary, and whatever the caller does with ``acc``, small enough to stay in cache."""
    rows, k = x_ints.shape
    o, b = weight.out_features, weight.planes
    xnor = code.kind == "sign" and weight.sign
    for rs in row_chunks(rows, max(k // 4, len(code.coefs) * o * b)):  # k bytes of codes per row
        chunk = x_ints[rs]
        yield rs, (xnor_dot(chunk, weight) if xnor else bitserial_dot(code.planes(chunk), code.coefs, weight))


def int_dot(x_ints: torch.Tensor, code: PlaneCode, weight: PackedWeight) -> torch.Tensor:
    """Exact integer products (R, K) x (O, K)^T -> (R, O) int64, with bit operations only."""
    out = torch.empty(x_ints.shape[0], weight.out_features, dtype=torch.int64)
    for rs, acc in int_dot_chunks(x_ints, code, weight):
        out[rs] = acc
    return out


def im2col(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """Zero-padded patches of an integer (N, C, H, W) tensor: (N * OH * OW, kh * kw * C),
    channels fastest (match with ``conv_weight_rows``); returns (patches, OH, OW).

    Channels-last makes each copied run C elements long instead of kw, which keeps this
    copy cheap."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    x = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (N, H', W', C)
    windows = x.unfold(1, kh, sh).unfold(2, kw, sw)  # (N, OH, OW, C, kh, kw), a view
    n, oh, ow, c = windows.shape[:4]
    patches = windows.permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c)
    return patches, oh, ow


def conv_weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, kh, kw) -> (O, kh * kw * C): the reduction order of ``im2col``."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
