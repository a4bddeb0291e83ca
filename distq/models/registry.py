"""Models by name (timm's ``@register_model`` habit): each builder returns a float model."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from distq.models.alexnet import DistqAlexNet
from distq.models.resnet import DistqBasicBlock, DistqBottleneck, DistqResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_float_model(arch: str, num_classes: int, width: int = 64, small_input: bool = False) -> nn.Module:
    if arch not in _REGISTRY:
        raise KeyError(arch)
    return _REGISTRY[arch](num_classes=num_classes, width=width, small_input=small_input)


@register_model
def resnet18(**kw) -> nn.Module:
    return DistqResNet(DistqBasicBlock, [2, 2, 2, 2], **kw)


@register_model
def resnet34(**kw) -> nn.Module:
    return DistqResNet(DistqBasicBlock, [3, 4, 6, 3], **kw)


@register_model
def resnet50(**kw) -> nn.Module:
    return DistqResNet(DistqBottleneck, [3, 4, 6, 3], **kw)


@register_model
def alexnet(**kw) -> nn.Module:
    return DistqAlexNet(**kw)
