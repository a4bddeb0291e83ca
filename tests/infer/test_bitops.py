"""The bit kernels compute exact integer dot products and convolutions.

Every check compares with torch's own integer or float64 arithmetic on the same
integers, which is exact at these sizes, so the assertions are equalities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distq.infer.bitops import (
    WORD_BITS,
    PlaneCode,
    conv_weight_rows,
    im2col,
    int_dot,
    pack_bits,
    pack_weight,
    popcount,
    unpack_bits,
)


def test_popcount_matches_python_on_edge_and_random_words():
    words = torch.cat(
        [
            torch.tensor([0, -1, 1, -(2**31), 2**31 - 1, 0x55555555], dtype=torch.int32),
            torch.randint(-(2**31), 2**31 - 1, (2000,), dtype=torch.int32),
        ]
    )
    expected = torch.tensor([bin(int(w) & 0xFFFFFFFF).count("1") for w in words])
    assert torch.equal(popcount(words).long(), expected)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_bits_round_trips(rows, k, seed):
    bits = torch.randint(0, 2, (rows, k), generator=torch.Generator().manual_seed(seed))
    words = pack_bits(bits)
    assert words.shape == (rows, -(-k // WORD_BITS))
    assert torch.equal(unpack_bits(words, k), bits.to(torch.uint8))
    assert torch.equal(popcount(words).sum(-1).long(), bits.sum(-1))


def _dorefa_weights(out, k, bits, g):
    return 2 * torch.randint(0, 1 << bits, (out, k), generator=g) - ((1 << bits) - 1)


@settings(max_examples=40, deadline=None)
@given(a_bits=st.integers(1, 8), w_bits=st.integers(1, 8), k=st.integers(1, 1100), seed=st.integers(0, 2**16))
def test_bitserial_and_popcount_equals_integer_matmul(a_bits, w_bits, k, seed):
    """Unsigned k-bit activations (DoReFa) x 2q - L weights, K up to past 31 words."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << a_bits, (9, k), generator=g, dtype=torch.uint8)
    w = _dorefa_weights(5, k, w_bits, g)
    acc = int_dot(x, PlaneCode("unsigned", a_bits), pack_weight(w, w_bits))
    assert torch.equal(acc, x.long() @ w.T)


def test_xnor_popcount_for_plus_minus_one_with_padding_zeros():
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randint(0, 2, (20, 1500), generator=g) - 1
    x[:, ::7] = 0  # padding: contributes nothing
    w = 2 * torch.randint(0, 2, (6, 1500), generator=g) - 1
    weight = pack_weight(w, 1)
    assert weight.sign
    assert torch.equal(int_dot(x.to(torch.int8), PlaneCode("sign", 1), weight), x @ w.T)


@pytest.mark.parametrize("a_code", [PlaneCode("twos", 2), PlaneCode("twos", 4), PlaneCode("twos", 8), PlaneCode("sign", 1)])
@pytest.mark.parametrize("w_max", [1, 4, 64])
def test_signed_two_complement_operands(a_code, w_max):
    """AQE: ternary and power-of-two integers on both sides."""
    g = torch.Generator().manual_seed(1)
    if a_code.kind == "sign":
        x = 2 * torch.randint(0, 2, (11, 300), generator=g) - 1
    else:
        top = 1 << (a_code.bits - 2)
        x = torch.randint(-top, top + 1, (11, 300), generator=g)
    w = torch.randint(-w_max, w_max + 1, (4, 300), generator=g)
    assert torch.equal(int_dot(x.to(torch.int8), a_code, pack_weight(w)), x @ w.T)


GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1)),
    ((1, 1), (2, 2), (0, 0)),
    ((5, 5), (1, 2), (2, 1)),
    ((3, 3), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("a_bits,w_bits", [(1, 1), (2, 2), (4, 4), (3, 1)])
def test_bit_conv_equals_float_conv_of_the_integers(kernel, stride, padding, a_bits, w_bits):
    g = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    x = torch.randint(0, 1 << a_bits, (2, 7, 9, 10), generator=g, dtype=torch.uint8)
    w = _dorefa_weights(5, 7 * kernel[0] * kernel[1], w_bits, g).view(5, 7, *kernel)
    patches, oh, ow = im2col(x, kernel, stride, padding)
    acc = int_dot(patches, PlaneCode("unsigned", a_bits), pack_weight(conv_weight_rows(w), w_bits))
    expected = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)
    assert torch.equal(acc.view(2, oh, ow, 5).permute(0, 3, 1, 2).double(), expected)


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_xnor_conv_zero_padding_contributes_nothing(kernel, stride, padding):
    """+-1 activations cannot encode 0 in one bit: the valid mask makes padding exact."""
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randint(0, 2, (2, 6, 8, 8), generator=g) - 1).to(torch.int8)
    w = 2 * torch.randint(0, 2, (4, 6, *kernel), generator=g) - 1
    patches, oh, ow = im2col(x, kernel, stride, padding)
    acc = int_dot(patches, PlaneCode("sign", 1), pack_weight(conv_weight_rows(w), 1))
    expected = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)
    assert torch.equal(acc.view(2, oh, ow, 4).permute(0, 3, 1, 2).double(), expected)


def test_plane_coefficients():
    assert PlaneCode("unsigned", 3).coefs == (1, 2, 4)
    assert PlaneCode("twos", 3).coefs == (1, 2, -4)
    w = pack_weight(torch.tensor([[-3, -1, 1, 3]]), 2)  # 2q - 3 for q = 0..3
    assert (w.coefs, w.offset) == ((2, 4), -3)


@pytest.mark.parametrize("offset_binary_bits,high", [(1, 1), (3, 7), (None, 64)])
def test_packed_weight_gives_back_its_integers(offset_binary_bits, high):
    g = torch.Generator().manual_seed(5)
    if offset_binary_bits is None:
        ints = torch.randint(-high, high + 1, (6, 77), generator=g)
    else:
        ints = 2 * torch.randint(0, high + 1, (6, 77), generator=g) - high
    assert torch.equal(pack_weight(ints, offset_binary_bits).integers(), ints)
