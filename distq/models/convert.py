"""Turn a float model into a quantized one, in place, by swapping layer classes."""

from __future__ import annotations

import torch.nn as nn

from distq.quant.layers import QAct, QConv2d, QLinear, QuantState, as_method
from distq.quant.methods import QuantMethod


def _first_and_last(model: nn.Module) -> tuple[str, str]:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return convs[0], linears[-1]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    method: str | QuantMethod = "dorefa",
    per_channel: bool = False,
    keep_first_fp: bool = True,
    keep_last_fp: bool = True,
    keep_final_act_fp: bool = True,
    kernels: str = "auto",
) -> nn.Module:
    """Replace convs/linears by ``QConv2d``/``QLinear`` and ReLUs by ``QAct``.

    Layers kept full precision (first conv, last linear, the activation feeding the final
    pooling) stay plain float modules, so the precision controller, which only sees
    quantized layers, can never quantize them by accident.
    """
    method = as_method(method)  # one object for the whole model
    first_conv, last_linear = _first_and_last(model)
    final_act = model.final_activation_name()
    keep = {
        first_conv: keep_first_fp,
        last_linear: keep_last_fp,
        final_act: keep_final_act_fp,
    }
    for name, module in list(model.named_modules()):
        if not name or keep.get(name, False):
            continue
        if type(module) is nn.Conv2d:
            _set_module(model, name, QConv2d.from_float(module, w_bits, method, per_channel))
        elif type(module) is nn.Linear:
            _set_module(model, name, QLinear.from_float(module, w_bits, method, per_channel))
        elif type(module) is nn.ReLU:
            _set_module(model, name, QAct(a_bits, method))
    for _, module in model.named_modules():
        if isinstance(module, QuantState):
            module.kernels = kernels
    return model
