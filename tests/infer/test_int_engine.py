"""The integer engine computes what the fake-quantized PyTorch model computes.

In float64 (the reference holding the exact values of the exported weight codes, see
``exact_reference``; test_exporter.py checks those codes against the training quantizer)
both sides are exact enough that every quantized activation must be the same integer and
the logits must agree to rounding; in float32 (the default) the fake-quantized
model's own float convolutions round, which can move an activation that sits on a
quantization boundary by one level, so there the test asks for the same predictions and
close logits. The models are untrained (random weights, batch-norm statistics spread
like a trained model's), which exercises every layer without training; agreement on
trained models is in test_int_agreement.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from distq.export.exporter import export_model
from distq.export.format import ExportError
from distq.infer.bitops import PlaneCode
from distq.infer.engine import build_engine
from distq.infer.layers import BitConv2d, BitLinear, CodedActivation, IntAct, coded
from distq.infer.verify import exact_reference
from distq.quant.layers import QAct

CASES = [
    ("dorefa", 1, 1),
    ("dorefa", 2, 2),
    ("dorefa", 4, 4),
    ("dorefa", 3, 2),
    ("dorefa", 1, 4),
    ("aqe", 1, 1),
    ("aqe", 2, 2),
    ("aqe", 3, 3),
    ("aqe", 1, 2),
]


def _record_acts(model, kind):
    """Capture every quantized activation's output, by module name."""
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, kind):
            module.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, o.detach().as_subclass(torch.Tensor).clone())
            )
    return seen


def _run_both(model, header, dtype, n=4, kernels="auto"):
    image_size = header["preprocess"]["image_size"]
    export, _ = export_model(model, header)
    engine = build_engine(export, dtype, kernels=kernels)
    reference = copy.deepcopy(model)
    if dtype == torch.float64:
        exact_reference(reference)  # the exported codes' exact values
    reference = reference.to(dtype)
    ref_acts, eng_acts = _record_acts(reference, QAct), _record_acts(engine.net, IntAct)
    images = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images.to(dtype)).double()
    got = engine(images).double()
    return expected, got, ref_acts, eng_acts, engine


@pytest.mark.parametrize(
    "method,w_bits,a_bits,kernels",
    # The default kernels (native where they build) on every case; the torch reference kernels
    # on two (test_native_engine.py shows both compute the same bits everywhere).
    [(*case, "auto") for case in CASES] + [("dorefa", 2, 2, "reference"), ("aqe", 1, 2, "reference")],
)
def test_float64_engine_is_integer_exact(random_resnet, resnet_header, method, w_bits, a_bits, kernels):
    model = random_resnet(method, w_bits, a_bits)
    expected, got, ref_acts, eng_acts, engine = _run_both(model, resnet_header(), torch.float64, kernels=kernels)
    assert set(ref_acts) == set(eng_acts) and len(ref_acts) == 16
    for name, value in ref_acts.items():
        assert torch.equal(value, eng_acts[name]), f"{name}: {(value != eng_acts[name]).sum()} activations differ"
        assert value.unique().numel() > 1, f"{name} is constant: the test would prove nothing"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # the engine returns float32 logits
    modes = engine.layer_modes()
    assert len(modes) == 19 and all(m == {"bit": 1, "float": 0} for m in modes.values()), modes


def _codes(acts: dict, method: str, a_bits: int) -> dict:
    """Quantized activations as integers, comparable across float32 and float64."""
    scale = (1 << a_bits) - 1 if method == "dorefa" else 1 << 8
    return {k: torch.round(v.double() * scale) for k, v in acts.items()}


@pytest.mark.parametrize("method,w_bits,a_bits", CASES)
def test_float32_engine_keeps_the_exact_integers(random_resnet, resnet_header, method, w_bits, a_bits):
    """In float32 the engine still computes the integers of the exact (float64) quantized
    network; the float32 fake-quantized model is the one that rounds activations on a
    quantization boundary the other way. (Predictions are compared on trained models in
    test_int_agreement.py: untrained models have near-tied logits.)"""
    model = random_resnet(method, w_bits, a_bits)
    _, exact, exact_acts, _, _ = _run_both(model, resnet_header(), torch.float64, n=8)
    _, got, _, eng_acts, _ = _run_both(model, resnet_header(), torch.float32, n=8)
    exact_codes, got_codes = _codes(exact_acts, method, a_bits), _codes(eng_acts, method, a_bits)
    differ = sum((v != got_codes[k]).sum().item() for k, v in exact_codes.items())
    assert differ <= 1e-4 * sum(v.numel() for v in exact_codes.values())
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


def test_per_channel_dorefa_weights(random_resnet, resnet_header):
    model = random_resnet("dorefa", 1, 2, per_channel=True)
    expected, got, ref_acts, eng_acts, _ = _run_both(model, resnet_header(), torch.float64)
    assert all(torch.equal(v, eng_acts[k]) for k, v in ref_acts.items())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_imagenet_stem_max_pool_keeps_activations_integer(random_resnet, resnet_header):
    """Stem QAct -> max-pool -> first block: the pooled activation must still reach the
    block's convs as integers."""
    model = random_resnet("dorefa", 2, 2, small_input=False)
    expected, got, ref_acts, eng_acts, engine = _run_both(model, resnet_header(64), torch.float64, n=2)
    # The native engine pools the stem's activation in the stem's own native call: that
    # activation module is then not called (test_native_engine.py compares the pool's output).
    fused_away = {name for chain in engine.fused for name in chain[1:-1]}
    assert set(ref_acts) - set(eng_acts) == fused_away
    assert all(torch.equal(v, eng_acts[k]) for k, v in ref_acts.items() if k not in fused_away)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert engine.layer_modes()["layer1.0.conv1"] == {"bit": 1, "float": 0}


def test_quantized_linear_takes_float_or_integer_input():
    """AlexNet's first classifier layer reads full-precision features: the engine then
    multiplies by the integer weights in float; given integers it uses bit operations."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 4, (5, 70), generator=g)
    ints = 2 * q - 3
    scale, shift = torch.linspace(0.5, 1.0, 5, dtype=torch.float64), torch.linspace(-0.1, 0.1, 5, dtype=torch.float64)
    layer = BitLinear(ints, 2, 2, torch.tensor([1 / 3], dtype=torch.float64), scale, shift, torch.float64)
    weight = ints.double() / 3
    codes = torch.randint(0, 8, (3, 70), generator=g, dtype=torch.uint8)
    x = codes.double() / 7
    expected = (x @ weight.T) * scale + shift
    from_float = layer(x)
    from_ints = layer(coded(x, codes, PlaneCode("unsigned", 3), 1 / 7))
    torch.testing.assert_close(from_float, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_ints, expected, rtol=1e-12, atol=1e-12)
    assert layer.calls == {"bit": 1, "float": 1}


def test_quantized_conv_takes_float_input_with_its_dequantized_weight():
    g = torch.Generator().manual_seed(2)
    ints = 2 * torch.randint(0, 8, (4, 3, 3, 3), generator=g) - 7
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    scale, shift = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    layer = BitConv2d(conv, ints, 3, 3, torch.tensor([1 / 7], dtype=torch.float64), scale, shift, torch.float64)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)
    expected = nn.functional.conv2d(x, ints.double() / 7, stride=2, padding=1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.calls == {"bit": 0, "float": 1}


@pytest.mark.slow
def test_alexnet_runs_its_first_classifier_layer_on_float_features(random_alexnet):
    """AlexNet keeps its final feature activation full precision, so classifier.1 is a
    quantized linear on float input, and classifier.4 one on integers."""
    model, header = random_alexnet()
    export, summary = export_model(model, header)
    assert summary.ratio <= 1.05 * 2 / 32
    engine = build_engine(export, torch.float64)
    exact_reference(model)
    ref_acts, eng_acts = _record_acts(model, QAct), _record_acts(engine.net, IntAct)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images.double())
    got = engine(images).double()
    assert len(ref_acts) == 6 and all(torch.equal(v, eng_acts[k]) for k, v in ref_acts.items())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    modes = engine.layer_modes()
    assert modes["classifier.1"] == {"bit": 0, "float": 1} and modes["classifier.4"] == {"bit": 1, "float": 0}


def test_int_act_outputs_integers_behind_exact_values():
    x = torch.linspace(-0.5, 1.5, 41).view(1, 1, 1, 41)
    out = IntAct(2, "dorefa")(x)
    assert isinstance(out, CodedActivation) and out.ints.dtype == torch.uint8
    assert torch.equal(out.as_subclass(torch.Tensor), QAct(2)(x))
    assert torch.equal(out.ints.float() / 3, out.as_subclass(torch.Tensor))
    assert out.scale == 1 / 3
    assert type(out + 1) is torch.Tensor  # any float op drops the integers


def test_a_header_that_does_not_fit_the_architecture_is_rejected(random_resnet, resnet_header):
    export, _ = export_model(random_resnet("dorefa", 2, 2), resnet_header())
    missing = copy.deepcopy(export)
    del missing.header["layers"]["layer3.1.conv2"]
    with pytest.raises(ExportError, match=r"is incomplete: no record for layer\(s\) layer3.1.conv2"):
        build_engine(missing)
    wrong_shape = copy.deepcopy(export)
    wrong_shape.header["layers"]["layer1.0.conv1"]["shape"] = [8, 8, 1, 1]
    with pytest.raises(ExportError, match=r"does not match its architecture: layer 'layer1.0.conv1' is conv \(8, 8, 1, 1\)"):
        build_engine(wrong_shape)
    garbled = copy.deepcopy(export)
    del garbled.header["layers"]["fc"]["tensors"]
    with pytest.raises(ExportError, match=r"is corrupt: its header does not describe a runnable model \(KeyError"):
        build_engine(garbled)
    unknown = copy.deepcopy(export)
    unknown.header["model"]["arch"] = "vgg11"
    with pytest.raises(ExportError, match=r"is for architecture 'vgg11', which this distq does not know"):
        build_engine(unknown)
