"""ResNets from torchvision's own blocks, with a width option and a small-input stem.

The blocks subclass torchvision's ``BasicBlock``/``Bottleneck`` only to give the block's
output activation its own module (``act_out``): torchvision reuses one ``relu`` for the
inner and the output activation, and the quantizer must tell them apart (the output of
the last block feeds the final pooling and stays full precision). Parameter names and
shapes are torchvision's, so its state_dicts load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class _OwnOutputActivation:
    """Gives a torchvision block a separate module for its output activation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.act_out = nn.ReLU(inplace=True)


class DistqBasicBlock(_OwnOutputActivation, BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act_out(out + identity)


class DistqBottleneck(_OwnOutputActivation, Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act_out(out + identity)


class DistqResNet(ResNet):
    """torchvision's ResNet (its ``_make_layer``, initialisation and forward) with the base
    width (64 in torchvision) and the stem made options. ``small_input`` uses a 3x3
    stride-1 stem conv and no max-pool, for 32x32 images."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000, width: int = 64, small_input: bool = False):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def final_activation_name(self) -> str:
        return f"layer4.{len(self.layer4) - 1}.act_out"
