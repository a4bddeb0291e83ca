"""Random quantized ResNets for the integer engine's tests: every layer exercised, no training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distq.config.schema import ModelConfig, QuantConfig
from distq.models.build import build_model
from distq.quant.layers import quant_layers


def _random_resnet(method, w_bits, a_bits, width=8, small_input=True, per_channel=False, seed=0):
    torch.manual_seed(seed)
    quant = QuantConfig(w_bits=w_bits, a_bits=a_bits, method=method, per_channel=per_channel)
    model = build_model(ModelConfig(arch="resnet18", width=width, small_input=small_input), quant, 10)
    for m in model.modules():  # statistics spread like a trained model's, so activations use every level
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2) if method == "aqe" else m.bias.data.uniform_(0.2, 0.6)
    for _, layer in quant_layers(model):
        layer.alpha = 1.0  # the end of the AQE schedule: only the hard quantizer (what is exported)
    return model.eval()


def _resnet_header(image_size=32, width=8):
    return {
        "model": {"arch": "resnet18", "width": width, "small_input": image_size <= 32, "num_classes": 10},
        "preprocess": {"image_size": image_size},
        "classes": [f"c{i}" for i in range(10)],
    }


def _random_alexnet(w_bits=2, a_bits=2):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="alexnet", small_input=True), QuantConfig(w_bits=w_bits, a_bits=a_bits), 10).eval()
    header = {
        "model": {"arch": "alexnet", "width": 64, "small_input": True, "num_classes": 10},
        "preprocess": {"image_size": 32},
        "classes": [str(i) for i in range(10)],
    }
    return model, header


@pytest.fixture(scope="session")
def random_alexnet():
    """``random_alexnet(w_bits=2, a_bits=2)`` -> (model, export header): a quantized AlexNet for
    32x32 images with random weights."""
    return _random_alexnet


@pytest.fixture(scope="session")
def random_resnet():
    """``random_resnet(method, w_bits, a_bits, width=8, small_input=True, per_channel=False, seed=0)``:
    an eval-mode quantized ResNet-18 with random weights, 10 classes."""
    return _random_resnet


@pytest.fixture(scope="session")
def resnet_header():
    """``resnet_header(image_size=32, width=8)``: the export header of ``random_resnet``'s models
    (a small-input stem up to 32 pixels, the ImageNet stem with its max-pool above)."""
    return _resnet_header
