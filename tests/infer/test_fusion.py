"""The fusion pass fuses a conv with its activation only where the dataflow makes it safe,
and the fused network computes what the unfused one does (toy networks of engine layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distq.infer.bitops import PlaneCode
from distq.infer.fusion import fuse_conv_activations
from distq.infer.layers import BitConv2d, IntAct, coded
from distq.native.library import load

pytestmark = pytest.mark.skipif(load() is None, reason="native kernels unavailable (no C++ compiler)")


def _conv(channels: int, seed: int) -> BitConv2d:
    g = torch.Generator().manual_seed(seed)
    ints = 2 * torch.randint(0, 4, (channels, channels, 3, 3), generator=g) - 3
    scale = torch.rand(channels, generator=g, dtype=torch.float64) / 20
    shift = torch.rand(channels, generator=g, dtype=torch.float64) - 0.3
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    return BitConv2d(conv, ints, 2, 2, torch.tensor([1 / 3], dtype=torch.float64), scale, shift, native=True)


class Block(nn.Module):
    """conv1 -> bn1 -> act1 -> conv2 -> bn2 -> (+ x) -> act2, like a ResNet block; ``leak``
    also returns conv1's float output, ``late_residual`` adds a value computed after conv2."""

    def __init__(self, leak=False, late_residual=False):
        super().__init__()
        self.conv1, self.bn1, self.act1 = _conv(6, 1), nn.Identity(), IntAct(2, "dorefa", native=True)
        self.conv2, self.bn2, self.act2 = _conv(6, 2), nn.Identity(), IntAct(2, "dorefa", native=True)
        self.extra = IntAct(2, "dorefa", native=True)
        self.leak, self.late_residual = leak, late_residual

    def forward(self, x):
        y = self.conv1(x)
        out = self.act1(self.bn1(y))
        out = self.bn2(self.conv2(out))
        residual = self.extra(out) if self.late_residual else x
        out = self.act2(out + residual)
        return (out, y) if self.leak else out


def _input():
    codes = torch.randint(0, 4, (2, 6, 7, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return coded(codes.float() / 3, codes, PlaneCode("unsigned", 2), 1 / 3)


def _run(net, x):
    out = net(x)
    return [o.as_subclass(torch.Tensor) for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize(
    "leak,late_residual,expected",
    [
        (False, False, [("conv1", "act1"), ("conv2", "act2")]),
        (True, False, [("conv2", "act2")]),  # conv1's float output is used again: not fused
        (False, True, [("conv1", "act1")]),  # conv2's output has two uses, and the residual comes after it
    ],
)
def test_fusion_only_where_the_dataflow_allows(leak, late_residual, expected):
    x = _input()
    unfused = Block(leak, late_residual)
    expected_out = _run(unfused, x)
    fused_net, pairs = fuse_conv_activations(Block(leak, late_residual))
    assert pairs == expected
    got = _run(fused_net, x)
    assert len(got) == len(expected_out) and all(torch.equal(g, e) for g, e in zip(got, expected_out))


def test_a_network_fx_cannot_trace_is_left_alone():
    class Branchy(Block):
        def forward(self, x):
            y = self.act1(self.bn1(self.conv1(x)))
            return y if y.sum() > 0 else -y  # data-dependent control flow: fx cannot trace it

    net = Branchy()
    same, pairs = fuse_conv_activations(net)
    assert same is net and pairs == []
    assert net.conv1.fused_act_bits == 0 and net.act1.computed_by is None
