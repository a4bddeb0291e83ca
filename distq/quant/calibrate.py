"""The first values of the quantizer methods' learnable parameters (LSQ's steps), from the
first training batch.

Done once, at the first step of a fresh run, before the first update: every rank computes its
statistics on its own share of the batch, one all-reduce sums them, and every rank sets the
same values (a resumed run takes them from its checkpoint instead). The forward that collects
them runs the models' own ``forward`` (never a compiled one) in training mode without
gradients, and restores every buffer afterwards, so batch-norm statistics are as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from distq.quant.layers import quant_layers
from distq.quant.methods import ACT, WEIGHT


def calibrated_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose method has learnable parameters, and that registered them."""
    return [
        layer
        for _, layer in quant_layers(model)
        if layer.quantizer.learnable and any(hasattr(layer, name) for name in layer.quantizer.learnable)
    ]


def needs_calibration(models: Iterable[nn.Module]) -> bool:
    return any(calibrated_layers(m) for m in models)


@torch.no_grad()
def calibrate(models: Iterable[nn.Module], images: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Initialise the learnable quantizer parameters of ``models`` from ``images``; returns how
    many layers were set. ``reduce_sum`` sums a float64 tensor over the ranks."""
    entries: list[tuple[nn.Module, str, dict[str, torch.Tensor]]] = []

    def collect(layer, inputs):
        entries.append((layer, ACT, layer.quantizer.calibrate(layer, ACT, inputs[0])))

    for model in models:
        layers = calibrated_layers(model)
        hooks = []
        for layer in layers:
            if layer.role == WEIGHT:
                entries.append((layer, WEIGHT, layer.quantizer.calibrate(layer, WEIGHT, None)))
            else:
                hooks.append(layer.register_forward_pre_hook(collect))
        if not hooks:
            continue
        buffers = [(b, b.clone()) for b in model.buffers()]
        try:
            model.forward(images)
        finally:
            for hook in hooks:
                hook.remove()
            for buffer, saved in buffers:
                buffer.copy_(saved)
    if not entries:
        return 0
    values = [v.detach().double().reshape(-1).to(images.device) for _, _, stats in entries for v in stats.values()]
    total = reduce_sum(torch.cat(values)).cpu()
    offset = 0
    for layer, role, stats in entries:
        summed = {}
        for key, value in stats.items():
            summed[key] = total[offset : offset + value.numel()].reshape(value.shape)
            offset += value.numel()
        layer.quantizer.initialise(layer, role, summed)
    return len(entries)
