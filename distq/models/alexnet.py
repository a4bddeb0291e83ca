"""AlexNet straight from torchvision, with an optional small-input stem."""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.alexnet import AlexNet


class DistqAlexNet(AlexNet):
    """torchvision's AlexNet. ``small_input`` swaps the 11x11 stride-4 stem for a 3x3
    stride-1 conv and drops the first max-pool, for 32x32 images."""

    def __init__(self, num_classes: int = 1000, width: int = 64, small_input: bool = False, dropout: float = 0.5):
        if width != 64:
            raise ValueError("model.width is only supported for ResNets: leave it at 64 for alexnet")
        super().__init__(num_classes=num_classes, dropout=dropout)
        if small_input:
            self.features[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
            self.features[2] = nn.Identity()

    def final_activation_name(self) -> str:
        return "features.11"
