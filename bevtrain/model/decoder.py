"""BEV decoder: ResNet-18 layers 1-3 over the BEV map, upsampled back with skips, and the heads.

Follows Simple-BEV's Decoder; the centre head returns logits (Simple-BEV applied a sigmoid inside
the head; ``bevtrain.losses`` applies it), so every head is a plain conv output.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torchvision


class UpsamplingAdd(nn.Module):
    """Upsample to the skip's size, 1x1 conv + instance norm, add the skip."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.InstanceNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(x) + skip


def _head(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        nn.InstanceNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, out_channels, kernel_size=1),
    )


class Decoder(nn.Module):
    """(B, C, Z, X) BEV features -> dict of 'seg' (n_classes), 'center' (1), 'offset' (2), 'feat' (C) maps."""

    def __init__(self, in_channels: int, n_classes: int = 1):
        super().__init__()
        backbone = torchvision.models.resnet18(weights=None, zero_init_residual=True)
        self.first_conv = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = backbone.bn1
        self.relu = backbone.relu
        self.layer1 = backbone.layer1  # stride 2 (no maxpool), 64 ch
        self.layer2 = backbone.layer2  # stride 4, 128 ch
        self.layer3 = backbone.layer3  # stride 8, 256 ch
        self.up3_skip = UpsamplingAdd(256, 128)
        self.up2_skip = UpsamplingAdd(128, 64)
        self.up1_skip = UpsamplingAdd(64, in_channels)
        self.feat_head = _head(in_channels, in_channels)
        self.seg_head = _head(in_channels, n_classes)
        self.center_head = _head(in_channels, 1)
        self.offset_head = _head(in_channels, 2)

    def forward(self, bev: torch.Tensor) -> Dict[str, torch.Tensor]:
        skip1 = bev
        x = self.relu(self.bn1(self.first_conv(bev)))
        skip2 = x = self.layer1(x)
        skip3 = x = self.layer2(x)
        x = self.layer3(x)
        x = self.up3_skip(x, skip3)
        x = self.up2_skip(x, skip2)
        x = self.up1_skip(x, skip1)
        return {
            "seg": self.seg_head(x),
            "center": self.center_head(x),
            "offset": self.offset_head(x),
            "feat": self.feat_head(x),
        }
