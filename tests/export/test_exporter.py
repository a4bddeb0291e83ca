"""Checkpoint -> export file: the codes mean exactly the training quantizers' values, the
payload is packed at its bit-width, batch-norm is folded, full-precision layers stay float."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from distq.config.schema import ModelConfig, QuantConfig
from distq.export.exporter import export_model
from distq.export.format import unpack_planes
from distq.models.build import build_model
from distq.models.dataflow import conv_bn_pairs
from distq.quant.functional import aqe_hard, weight_quant
from distq.quant.layers import QConv2d
from distq.quant.methods import build_method
from distq.quant.methods.aqe import exponent


def _weight_codes(method, w, bits, per_channel=False):
    """The method's ``weight_codes`` of a conv holding ``w``, checked against its ``integers``."""
    layer = QConv2d(w.shape[1], w.shape[0], w.shape[2], bits=bits, method=method, per_channel=per_channel)
    layer.weight.data.copy_(w)
    codes = layer.quantizer.weight_codes(layer)
    assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) < 1 << bits
    assert torch.equal(layer.quantizer.integers(codes.codes, bits), codes.integers)  # what a packed file's reader gets
    assert codes.low <= int(codes.integers.min()) and int(codes.integers.max()) <= codes.high
    return codes


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dorefa_codes_reproduce_the_weight_quantizer(bits, per_channel):
    w = torch.randn(6, 5, 3, 3)
    codes = _weight_codes("dorefa", w, bits, per_channel)
    assert codes.offset_bits == bits
    values = codes.integers.double() * codes.scale.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(values, weight_quant(w, bits, per_channel).double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_aqe_codes_are_the_hard_quantizer_exactly(bits):
    w = torch.randn(8, 4, 3, 3) * 0.3
    codes = _weight_codes("aqe", w, bits)
    assert codes.scale.item() == 2.0 ** -exponent(bits)
    assert codes.offset_bits == (1 if bits == 1 else None)
    values = codes.integers.double() * codes.scale.double()
    assert torch.equal(values, aqe_hard(w, bits).double())


def _model(w_bits, a_bits, method="dorefa", width=8, small_input=True, seed=0):
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(arch="resnet18", width=width, small_input=small_input),
        QuantConfig(w_bits=w_bits, a_bits=a_bits, method=method),
        10,
    )
    for m in model.modules():  # batch-norm statistics of a trained model, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


HEADER = {"model": {}, "preprocess": {"image_size": 32}, "classes": [str(i) for i in range(10)]}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quantized_payload_is_bits_over_32_of_float32(bits):
    export, summary = export_model(_model(bits, bits), HEADER)
    assert summary.quantized_layers == 19 and summary.float_layers == 2  # first conv and fc stay float
    assert summary.ideal_ratio == pytest.approx(bits / 32)
    assert summary.ratio <= 1.05 * bits / 32
    packed = sum(t.numel() for n, t in export.tensors.items() if n.endswith("weight_codes"))
    assert packed == summary.packed_bytes


def test_every_batchnorm_is_folded_and_float_layers_stay_float():
    model = _model(2, 2)
    export, _ = export_model(model, HEADER)
    layers = export.header["layers"]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(layers[n]["folded_into"] is not None for n in bns)
    assert layers["layer2.0.bn1"]["folded_into"] == "layer2.0.conv1"
    assert layers["layer2.0.downsample.1"]["folded_into"] == "layer2.0.downsample.0"
    assert layers["conv1"]["weight_bits"] == 32 and export.tensors["conv1.weight"].dtype == torch.float32
    assert layers["fc"]["weight_bits"] == 32 and layers["fc"]["batchnorm"] is None
    assert layers["layer1.0.relu"] == {"op": "act", "bits": 2, "method": "dorefa"}
    assert layers["layer4.1.act_out"]["bits"] == 32  # feeds the final pooling: full precision


def test_float_conv_keeps_its_weight_and_folds_batchnorm_into_its_affine():
    model = _model(4, 4)
    export, _ = export_model(model, HEADER)
    assert torch.equal(export.tensors["conv1.weight"], model.conv1.weight)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = model.double().bn1(model.conv1(x))
    y = nn.functional.conv2d(x, export.tensors["conv1.weight"].double(), padding=1)
    got = y * export.tensors["conv1.out_scale"].view(1, -1, 1, 1) + export.tensors["conv1.out_shift"].view(1, -1, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_packed_codes_and_affine_reproduce_the_quantized_conv_and_batchnorm():
    """conv(x, weight) * out_scale + out_shift == bn(qconv(x)) for the stored tensors."""
    model = _model(3, 3)
    export, _ = export_model(model, HEADER)
    model.double()
    record = export.header["layers"]["layer2.1.conv1"]
    names = record["tensors"]
    codes = unpack_planes(export.tensors[names["weight_codes"]], 3, tuple(record["shape"]))
    weight = build_method(record["method"]).integers(codes, 3).double() * export.tensors[names["weight_scale"]].double()
    x = torch.rand(2, 16, 8, 8, dtype=torch.float64)  # width 8: layer2 has 16 channels
    block = model.layer2[1]
    expected = block.bn1(block.conv1(x))
    y = nn.functional.conv2d(x, weight, padding=1)
    got = y * export.tensors[names["out_scale"]].double().view(1, -1, 1, 1) + export.tensors[names["out_shift"]].double().view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_aqe_layers_short_of_alpha_1_are_flagged():
    model = _model(2, 2, method="aqe")
    _, summary = export_model(model, HEADER)
    assert summary.warned_layers == 35  # 19 layers + 16 activations at the default alpha 0.5
    assert "warning: 35 AQE layers end training with alpha < 1" in summary.lines("x")[-1]
    for m in model.modules():
        if hasattr(m, "alpha"):
            m.alpha = 1.0
    _, summary = export_model(model, HEADER)
    assert summary.warned_layers == 0 and not any("warning" in line for line in summary.lines("x"))


def test_conv_bn_pairs_follow_the_data_flow():
    pairs = conv_bn_pairs(_model(2, 2, small_input=False))
    assert pairs["bn1"] == "conv1"
    assert pairs["layer3.0.downsample.1"] == "layer3.0.downsample.0"
    assert len(pairs) == 20


def test_a_batchnorm_pairs_only_with_a_conv_it_alone_reads():
    """Names do not decide: a batch-norm named for another conv pairs with the one it reads, and a
    conv whose output has a second reader (folding would change it) pairs with nothing."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)
            self.bn_b, self.bn_a = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.a(x)
            z = self.bn_b(y) + y  # a's output read twice
            return self.bn_a(self.b(z))

    assert conv_bn_pairs(Net()) == {"bn_a": "b"}


def test_distq_export_prints_the_size_and_ratio(run_distq, tiny_run, tmp_path):
    out = tmp_path / "tiny.safetensors"
    proc = run_distq("export", tiny_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"exported \S+: ([\d,]+) bytes, ([\d.]+) of the float32 model's ([\d,]+)", proc.stdout)
    size, fraction, float32 = int(found.group(1).replace(",", "")), float(found.group(2)), int(found.group(3).replace(",", ""))
    assert size == out.stat().st_size
    assert fraction == pytest.approx(size / float32, abs=1e-4)
    ratio = float(re.search(r"ratio ([\d.]+) \(bits/32 = ([\d.]+)", proc.stdout).group(1))
    assert ratio <= 1.05 * 2 / 32  # the tiny run is W2A3


def test_distq_export_of_a_missing_checkpoint_is_one_line(run_distq, tmp_path):
    proc = run_distq("export", tmp_path / "none.pt", "--out", tmp_path / "x.safetensors")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distq: error: checkpoint '{tmp_path / 'none.pt'}' not found: pass a run directory or a checkpoint written by 'distq train' (RUN_DIR/checkpoints/step_*)"
    ]
