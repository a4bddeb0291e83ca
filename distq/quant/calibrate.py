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
    """The layers whose method starts its learnable parameters from data, and that registered them."""
    return [
        layer
        for _, layer in quant_layers(model)
        if layer.quantizer.calibrated and any(hasattr(layer, name) for name in layer.quantizer.learnable)
    ]


def needs_calibration(models: Iterable[nn.Module]) -> bool:
    return any(calibrated_layers(m) for m in models)


def _summed(stats: list[dict[str, torch.Tensor]], reduce_sum, device) -> list[dict[str, torch.Tensor]]:
    """Every statistic summed over the ranks, in one reduction."""
    flat = reduce_sum(torch.cat([v.detach().double().reshape(-1).to(device) for one in stats for v in one.values()])).cpu()
    out, offset = [], 0
    for one in stats:
        summed = {}
        for key, value in one.items():
            summed[key] = flat[offset : offset + value.numel()].reshape(value.shape)
            offset += value.numel()
        out.append(summed)
    return out


@torch.no_grad()
def calibrate(models: Iterable[nn.Module], images: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Initialise the learnable quantizer parameters of ``models`` from ``images``; returns how
    many layers were set. ``reduce_sum`` sums a float64 tensor over the ranks.

    Weights first (one reduction), then the activations in the order the forward reaches them,
    each set before its layer runs (one reduction each, the same on every rank), so every
    activation's statistics are those of the network quantized up to it, as when each quantizer
    initialises itself on its first batch."""

    def on_act(layer, inputs):
        (stats,) = _summed([layer.quantizer.calibrate(layer, ACT, inputs[0])], reduce_sum, images.device)
        layer.quantizer.initialise(layer, ACT, stats)

    count = 0
    for model in models:
        layers = calibrated_layers(model)
        count += len(layers)
        weights = [layer for layer in layers if layer.role == WEIGHT]
        if weights:
            stats = _summed([layer.quantizer.calibrate(layer, WEIGHT, None) for layer in weights], reduce_sum, images.device)
            for layer, summed in zip(weights, stats):
                layer.quantizer.initialise(layer, WEIGHT, summed)
        hooks = [layer.register_forward_pre_hook(on_act) for layer in layers if layer.role == ACT]
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
    return count
