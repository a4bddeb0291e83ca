"""``fixed_quantized_weights``: evaluation quantizes each weight once, with the same results."""

from __future__ import annotations

import pytest
import torch

import distq.quant.methods.dorefa as layers  # where the DoReFa method calls the weight quantizer
from distq.models import build_float_model, quantize_model
from distq.quant.layers import QConv2d, QLinear, fixed_quantized_weights


def small_model(bits: int = 4, per_channel: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize_model(build_float_model("resnet18", 10, width=4, small_input=True), bits, bits, per_channel=per_channel, keep_last_fp=False)
    return model.eval()


def count_weight_quant(monkeypatch) -> list[int]:
    calls = [0]
    original = layers.weight_quant

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "weight_quant", counting)
    return calls


@pytest.mark.parametrize("bits,per_channel", [(4, False), (2, True), (1, False)])
def test_evaluation_is_unchanged_and_quantizes_once(monkeypatch, bits, per_channel):
    model = small_model(bits, per_channel)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    n_layers = sum(isinstance(m, (QConv2d, QLinear)) for m in model.modules())
    with torch.inference_mode():
        want = [model(x + i) for i in range(3)]
    calls = count_weight_quant(monkeypatch)
    with torch.inference_mode(), fixed_quantized_weights(model):
        got = [model(x + i) for i in range(3)]
    assert calls[0] == n_layers  # once per layer for the block, not once per layer per batch
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_with_gradients_enabled_the_block_quantizes_on_the_fly():
    model = small_model().train()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with fixed_quantized_weights(model):
        model(x).sum().backward()  # grad mode is on: the stored weights (no graph) are not used
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)


def test_after_the_block_weight_changes_are_seen_again():
    model = small_model()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fixed_quantized_weights(model):
        before = model(x)
    assert all(m._fixed_weight is None for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QConv2d):
                m.weight.mul_(-1.0)
        assert not torch.equal(model(x), before)


def test_the_block_is_left_clean_after_an_error():
    model = small_model()
    with pytest.raises(RuntimeError, match="boom"):
        with fixed_quantized_weights(model):
            raise RuntimeError("boom")
    assert all(m._fixed_weight is None for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
    assert "_fixed_weight" not in model.state_dict()
