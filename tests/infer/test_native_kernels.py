"""The native bit kernels equal the torch reference kernels bit for bit.

Every check computes its expectation once, from the reference engine's own kernels
(``distq.infer.bitops``) or torch's exact integer arithmetic on the same integers, then
runs the native kernels on every instruction set this CPU supports (AVX-512 VPOPCNTDQ,
AVX2, portable C++) and asks for the same bits.
Shapes are chosen to be awkward: reductions that are not a multiple of the 64-bit word,
output channel counts that do not fill a vector or a tile, odd spatial sizes, stride 2,
padding, batch 1 and more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distq.infer.bitops import PlaneCode, conv_weight_rows, im2col, int_dot, pack_weight
from distq.infer.layers import channel_affine
from distq.infer.native import ops
from distq.native.library import load, on_every_isa
from distq.quant.methods.dorefa import unit_values as dorefa_values

pytestmark = pytest.mark.skipif(load() is None, reason="native kernels unavailable (no C++ compiler)")

def assert_equal_on_every_isa(run, expected):
    for name, got in on_every_isa(run).items():
        assert torch.equal(got, expected), f"{name}: {(got != expected).sum().item()} of {expected.numel()} differ"


def _dorefa_weights(out, k, bits, g):
    return 2 * torch.randint(0, 1 << bits, (out, k), generator=g) - ((1 << bits) - 1)


# (rows, K, out): K around word and tile boundaries, outputs that fill no vector or tile.
SHAPES = [(1, 1, 1), (3, 63, 5), (7, 64, 8), (13, 65, 9), (5, 130, 17), (2, 200, 33), (6, 577, 40)]


@pytest.mark.parametrize("a_bits", range(1, 9))
@pytest.mark.parametrize("w_bits", range(1, 9))
def test_every_bit_width_pair_equals_the_reference_dot_product(a_bits, w_bits):
    """DoReFa: unsigned a-bit activations x (2q - (2^w - 1)) weights, every pair 1..8."""
    g = torch.Generator().manual_seed(a_bits * 16 + w_bits)
    rows, k, out = SHAPES[(a_bits + w_bits) % len(SHAPES)]
    x = torch.randint(0, 1 << a_bits, (rows, k), generator=g, dtype=torch.uint8)
    weight = pack_weight(_dorefa_weights(out, k, w_bits, g), w_bits)
    code = PlaneCode("unsigned", a_bits)
    expected = int_dot(x, code, weight)
    assert torch.equal(expected, x.long() @ weight.integers().T)
    assert_equal_on_every_isa(lambda: ops.int_dot(x, code, weight), expected)


@pytest.mark.parametrize("rows,k,out", SHAPES)
def test_xnor_with_padding_zeros(rows, k, out):
    """+-1 activations (0 = padding) x +-1 weights: the XNOR kernel and its valid mask."""
    g = torch.Generator().manual_seed(k)
    x = 2 * torch.randint(0, 2, (rows, k), generator=g) - 1
    x[:, ::7] = 0
    weight = pack_weight(2 * torch.randint(0, 2, (out, k), generator=g) - 1, 1)
    assert weight.sign
    expected = int_dot(x.to(torch.int8), PlaneCode("sign", 1), weight)
    assert torch.equal(expected, x @ weight.integers().T)
    assert_equal_on_every_isa(lambda: ops.int_dot(x.to(torch.int8), PlaneCode("sign", 1), weight), expected)


@pytest.mark.parametrize(
    "a_code,dtype",
    [
        (PlaneCode("twos", 2), torch.int8),
        (PlaneCode("twos", 3), torch.int8),
        (PlaneCode("twos", 8), torch.int8),
        (PlaneCode("twos", 16), torch.int16),  # AQE 5-bit activations: +-2^14
        (PlaneCode("sign", 1), torch.int8),
    ],
)
@pytest.mark.parametrize("w_max", [1, 4, 64, 2**15])
def test_signed_codes_on_both_sides(a_code, dtype, w_max):
    """AQE: ternary, power-of-two and sign integers, two's complement weights up to 17 planes."""
    g = torch.Generator().manual_seed(w_max)
    if a_code.kind == "sign":
        x = 2 * torch.randint(0, 2, (11, 300), generator=g) - 1
    else:
        top = 1 << (a_code.bits - 2)
        x = torch.randint(-top, top + 1, (11, 300), generator=g)
    weight = pack_weight(torch.randint(-w_max, w_max + 1, (9, 300), generator=g))
    assert_equal_on_every_isa(lambda: ops.int_dot(x.to(dtype), a_code, weight), x @ weight.integers().T)


GEOMETRIES = [  # kernel, stride, padding
    ((3, 3), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1)),
    ((1, 1), (2, 2), (0, 0)),
    ((1, 1), (1, 1), (0, 0)),
    ((5, 5), (1, 2), (2, 1)),
    ((3, 3), (1, 1), (0, 0)),
    ((7, 7), (2, 2), (3, 3)),
]
CHANNELS = [1, 3, 17, 64, 65, 130]


def rows(y: torch.Tensor) -> torch.Tensor:
    """A native conv's (N, out, OH, OW) output as the reference's (N * OH * OW, out) rows."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _reference_conv(x, code, weight, kernel, stride, padding):
    """The reference engine's conv: im2col of the integers, then its bit kernels."""
    patches, oh, ow = im2col(x, kernel, stride, padding)
    return int_dot(patches, code, weight), oh, ow


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_conv_equals_the_reference_engine(kernel, stride, padding, channels):
    g = torch.Generator().manual_seed(channels * 7 + kernel[0])
    a_bits, w_bits = (1, 1) if channels % 2 else (2, 3)
    batch, h, w, out = (1, 7, 9, 5) if channels > 64 else (2, 9, 10, 11)
    x = torch.randint(0, 1 << a_bits, (batch, channels, h, w), generator=g, dtype=torch.uint8)
    ints = _dorefa_weights(out, channels * kernel[0] * kernel[1], w_bits, g).view(out, *kernel, channels).permute(0, 3, 1, 2)
    weight = pack_weight(conv_weight_rows(ints), w_bits)
    code = PlaneCode("unsigned", a_bits)
    expected, oh, ow = _reference_conv(x, code, weight, kernel, stride, padding)
    conv = F.conv2d(x.double(), ints.double(), stride=stride, padding=padding)
    assert torch.equal(expected.view(batch, oh, ow, out).permute(0, 3, 1, 2).double(), conv)
    native = ops.NativeWeight(weight, channels, kernel, stride, padding)
    assert native.output_size(h, w) == (oh, ow)
    assert_equal_on_every_isa(lambda: rows(native.conv(x, code)), expected)


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES[:3])
def test_xnor_conv_zero_padding_contributes_nothing(kernel, stride, padding):
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randint(0, 2, (2, 67, 8, 8), generator=g) - 1).to(torch.int8)
    ints = 2 * torch.randint(0, 2, (4, 67, *kernel), generator=g) - 1
    weight, code = pack_weight(conv_weight_rows(ints), 1), PlaneCode("sign", 1)
    expected, _, _ = _reference_conv(x, code, weight, kernel, stride, padding)
    native = ops.NativeWeight(weight, 67, kernel, stride, padding)
    assert_equal_on_every_isa(lambda: rows(native.conv(x, code)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_affine_rounds_like_the_reference(dtype):
    """acc * scale + shift in float64, stored as dtype: the reference engine's expression."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 16, (3, 37, 6, 5), generator=g, dtype=torch.uint8)
    ints = _dorefa_weights(21, 37 * 9, 4, g).view(21, 3, 3, 37).permute(0, 3, 1, 2)
    weight, code = pack_weight(conv_weight_rows(ints), 4), PlaneCode("unsigned", 4)
    scale = torch.rand(21, generator=g, dtype=torch.float64) / 7
    shift = torch.randn(21, generator=g, dtype=torch.float64)
    native = ops.NativeWeight(weight, 37, (3, 3), (1, 1), (1, 1))
    acc, _, _ = _reference_conv(x, code, weight, (3, 3), (1, 1), (1, 1))
    expected = acc.double().mul_(scale).add_(shift).to(dtype)
    assert_equal_on_every_isa(lambda: rows(native.conv(x, code, scale, shift, dtype)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layers_larger_than_a_chunk_of_rows(dtype):
    """A conv whose bit rows outgrow one 256 KiB chunk (608 bytes a row here: 18 output lines
    a chunk, 40 lines) is made chunk by chunk; every output, with a residual and a fused
    activation too, lands where the reference puts it."""
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 16, (2, 130, 20, 23), generator=g, dtype=torch.uint8)
    ints = _dorefa_weights(21, 130 * 9, 2, g).view(21, 3, 3, 130).permute(0, 3, 1, 2)
    weight, code = pack_weight(conv_weight_rows(ints), 2), PlaneCode("unsigned", 4)
    scale = torch.rand(21, generator=g, dtype=torch.float64) / 3000
    shift = torch.rand(21, generator=g, dtype=torch.float64) - 0.2
    residual = torch.rand(2, 21, 20, 23, generator=g, dtype=dtype) / 2
    native = ops.NativeWeight(weight, 130, (3, 3), (1, 1), (1, 1))
    acc, _, _ = _reference_conv(x, code, weight, (3, 3), (1, 1), (1, 1))
    assert_equal_on_every_isa(lambda: rows(native.conv(x, code)), acc)
    y = acc.double().mul_(scale).add_(shift).to(dtype).view(2, 20, 23, 21).permute(0, 3, 1, 2) + residual
    assert_equal_on_every_isa(lambda: native.conv(x, code, scale, shift, dtype, 0, residual), y)
    expected_codes = torch.round(y.clamp(0, 1) * 3).to(torch.uint8)
    assert expected_codes.unique().numel() == 4
    assert_equal_on_every_isa(lambda: native.conv(x, code, scale, shift, dtype, 3, residual)[1], expected_codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act_bits", [1, 2, 4, 8])
def test_fused_activation_equals_the_affine_then_the_quantizer(dtype, act_bits):
    """A conv fused with the DoReFa activation after it: the integers and values that
    IntAct computes from the unfused conv's output, with no float output in between."""
    g = torch.Generator().manual_seed(act_bits)
    x = torch.randint(0, 4, (2, 33, 7, 6), generator=g, dtype=torch.uint8)
    ints = _dorefa_weights(19, 33 * 9, 2, g).view(19, 3, 3, 33).permute(0, 3, 1, 2)
    weight, code = pack_weight(conv_weight_rows(ints), 2), PlaneCode("unsigned", 2)
    scale = torch.rand(19, generator=g, dtype=torch.float64) / 40
    shift = torch.rand(19, generator=g, dtype=torch.float64) - 0.3
    native, n = ops.NativeWeight(weight, 33, (3, 3), (2, 2), (1, 1)), (1 << act_bits) - 1
    y = native.conv(x, code, scale, shift, dtype)
    assert y.shape == (2, 19, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)
    expected_codes = torch.round(y.clamp(0, 1) * n).to(torch.uint8)
    assert expected_codes.unique().numel() >= min(n + 1, 3)  # the affine spans several levels: the test proves something
    assert_equal_on_every_isa(lambda: native.conv(x, code, scale, shift, dtype, n)[1], expected_codes)
    assert_equal_on_every_isa(lambda: native.conv(x, code, scale, shift, dtype, n)[0], dorefa_values(expected_codes, act_bits, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", range(1, 9))
def test_quantizer_gives_the_torch_integers_and_values(dtype, bits):
    n = (1 << bits) - 1
    g = torch.Generator().manual_seed(bits)
    ties = (torch.arange(2 * n + 1, dtype=dtype) / (2 * n)).repeat_interleave(3)  # every half level: round half to even
    x = torch.cat([torch.randn(20_000, generator=g, dtype=dtype), torch.linspace(-0.1, 1.1, 5001, dtype=dtype), ties])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, 1e-30, -1e30, 1e30], dtype=dtype)])
    expected = torch.round(x.clamp(0, 1) * n).to(torch.uint8)
    assert_equal_on_every_isa(lambda: ops.quantize_unit(x, n)[0], expected)
    assert_equal_on_every_isa(lambda: ops.quantize_unit(x, n)[1], dorefa_values(expected, bits, dtype))


def test_quantizer_keeps_the_memory_layout():
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    ints, values = ops.quantize_unit(x, 3)  # the best instruction set; the layout logic is shared
    assert ints.stride() == x.stride() and values.stride() == x.stride()
    assert torch.equal(ints, torch.round(x.clamp(0, 1) * 3).to(torch.uint8))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1))])
def test_max_pool_of_codes_equals_torch(channels_last, geometry):
    g = torch.Generator().manual_seed(5)
    ints = torch.randint(0, 8, (2, 19, 11, 9), generator=g, dtype=torch.uint8)
    if channels_last:
        ints = ints.contiguous(memory_format=torch.channels_last)
    table = dorefa_values(torch.arange(256, dtype=torch.uint8), 3, torch.float32)
    (k, s, p) = geometry
    expected_values = F.max_pool2d(dorefa_values(ints, 3, torch.float32), k, s, p)
    assert_equal_on_every_isa(lambda: ops.max_pool_codes(ints, table, *geometry)[1], expected_values)
    assert_equal_on_every_isa(lambda: ops.max_pool_codes(ints, table, *geometry)[0], F.max_pool2d(ints.float(), k, s, p).to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_affine_to_channels_last_rounds_like_torch(dtype):
    g = torch.Generator().manual_seed(6)
    y = torch.randn(3, 70, 5, 13, generator=g, dtype=dtype)
    scale, shift = torch.randn(70, generator=g, dtype=dtype), torch.randn(70, generator=g, dtype=dtype)
    assert ops.affine_to_channels_last(y, scale, shift).is_contiguous(memory_format=torch.channels_last)
    expected = channel_affine(y, scale, shift, 1)
    assert_equal_on_every_isa(lambda: ops.affine_to_channels_last(y, scale, shift), expected)
    # Fused with the DoReFa activation after it: IntAct's integers and values of that output.
    codes = torch.round(expected.clamp(0, 1) * 7).to(torch.uint8)
    assert_equal_on_every_isa(lambda: ops.affine_to_channels_last(y, scale, shift, 7)[1], codes)
    assert_equal_on_every_isa(lambda: ops.affine_to_channels_last(y, scale, shift, 7)[0], dorefa_values(codes, 3, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [5, 64, 70])
def test_float_stem_affine_activation_and_pool_in_one_pass(dtype, channels):
    """The affine, the DoReFa activation and the max-pool of a float conv's output, fused:
    the pooled integers and values the three separate steps give."""
    g = torch.Generator().manual_seed(channels)
    y = torch.randn(2, channels, 23, 30, generator=g, dtype=dtype)
    scale, shift = torch.rand(channels, generator=g, dtype=dtype), torch.rand(channels, generator=g, dtype=dtype) - 0.2
    codes = torch.round(channel_affine(y, scale, shift, 1).clamp(0, 1) * 3).to(torch.uint8)
    geometry = ((3, 3), (2, 2), (1, 1))
    pooled = F.max_pool2d(codes.float(), *geometry).to(torch.uint8)
    values = F.max_pool2d(dorefa_values(codes, 2, dtype), *geometry)
    assert_equal_on_every_isa(lambda: ops.affine_quantize_pool(y, scale, shift, 3, *geometry)[1], pooled)
    assert_equal_on_every_isa(lambda: ops.affine_quantize_pool(y, scale, shift, 3, *geometry)[0], values)


def test_packing_matches_the_reference_planes():
    """64-bit native words are pairs of the reference's 32-bit words, for every code kind."""
    g = torch.Generator().manual_seed(8)
    cases = [
        (torch.randint(0, 256, (5, 150), generator=g, dtype=torch.uint8), PlaneCode("unsigned", 8)),
        (torch.randint(-128, 128, (4, 97), generator=g).to(torch.int8), PlaneCode("twos", 8)),
        (torch.randint(-1, 2, (3, 65), generator=g).to(torch.int8), PlaneCode("sign", 1)),
        (torch.randint(-(2**14), 2**14 + 1, (2, 70), generator=g).to(torch.int16), PlaneCode("twos", 16)),
    ]
    for ints, code in cases:
        words32 = code.planes(ints)  # (rows, planes, ceil(K / 32)) int32
        padded = F.pad(words32, (0, words32.shape[-1] % 2))
        assert_equal_on_every_isa(lambda ints=ints, code=code: ops.pack_rows(ints, code), padded.contiguous().view(torch.int64))


def test_several_threads_give_the_same_integers():
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 4, (3, 70, 13, 11), generator=g, dtype=torch.uint8)
    ints = _dorefa_weights(45, 70 * 9, 2, g).view(45, 3, 3, 70).permute(0, 3, 1, 2)
    native, code = ops.NativeWeight(pack_weight(conv_weight_rows(ints), 2), 70, (3, 3), (1, 1), (1, 1)), PlaneCode("unsigned", 2)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native.conv(x, code))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
