"""The auxiliary full-precision branch (seed 001): each quantized conv gets a parallel
float conv + BN, and the layer computes ``LP(x) + f * FP(x)``.

The branches live outside the model (attached with forward hooks), so the model's own
parameters and state_dict never change: once f reaches 0 the hooks are removed and
the network is exactly the plain low-precision one, with nothing left to export.
"""

from __future__ import annotations

import torch.nn as nn

from distq.quant.layers import QConv2d


class AuxBranches(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.factor = 1.0
        self.branches = nn.ModuleDict()
        self._handles = []
        for name, layer in model.named_modules():
            if isinstance(layer, QConv2d):
                conv = nn.Conv2d(
                    layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                    layer.padding, layer.dilation, layer.groups, bias=False,
                )
                conv.weight.data.copy_(layer.weight.data)
                branch = nn.Sequential(conv, nn.BatchNorm2d(layer.out_channels))
                self.branches[name.replace(".", "__")] = branch
                self._handles.append(layer.register_forward_hook(self._hook(branch)))
        if not self._handles:
            raise ValueError("precision.aux_branch: the model has no quantized convs to attach branches to")

    def _hook(self, branch: nn.Module):
        def add_branch(module, inputs, output):
            if self.factor == 0.0:
                return output
            if branch.training != module.training:  # follow the model's train/eval mode
                branch.train(module.training)
            return output + self.factor * branch(inputs[0])

        return add_branch

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach_from_model(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
