"""Image encoders: torchvision backbones to stride 16, fused with stride 8, out ``latent_dim`` channels.

As in Simple-BEV: a ResNet up to layer3 (stride 16), upsampled and concatenated with layer2
(stride 8), two 3x3 convs, then a 1x1 conv to ``latent_dim``; EfficientNets likewise from their
stride-16 and stride-8 stages.

Weights never download. ``encoder_weights``:
- ``'auto'``: ImageNet weights if torchvision's checkpoint file is already in the torch hub
  cache, else random init with one warning saying where to put the file;
- ``'imagenet'``: ImageNet weights, error if the file is not cached;
- ``'none'``: random init;
- a path: a torchvision state dict of the backbone (e.g. the file torchvision would download).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UpsamplingConcat(nn.Module):
    """Upsample the coarse map x2, concatenate with the fine one, two conv-IN-ReLU blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        # Upsample to the fine map's size (not a fixed x2) so odd image sizes work.
        up = nn.functional.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([fine, up], dim=1))


# name -> (torchvision builder, weights enum attribute, cached-file candidates in preference order)
_BACKBONES: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "res18": ("resnet18", "ResNet18_Weights", ("IMAGENET1K_V1",)),
    "res50": ("resnet50", "ResNet50_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
    "res101": ("resnet101", "ResNet101_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
    "effb0": ("efficientnet_b0", "EfficientNet_B0_Weights", ("IMAGENET1K_V1",)),
    "effb4": ("efficientnet_b4", "EfficientNet_B4_Weights", ("IMAGENET1K_V1",)),
}
ENCODER_TYPES = tuple(_BACKBONES)


def _hub_checkpoint_path(weights) -> Path:
    """Where torchvision would store ``weights`` when downloading (the torch hub checkpoint dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def resolve_backbone_weights(encoder_type: str, encoder_weights: str) -> Path | None:
    """The state-dict file to load for ``encoder_weights``, or None for random init."""
    builder, enum_name, candidates = _BACKBONES[encoder_type]
    if encoder_weights == "none":
        return None
    if encoder_weights not in ("auto", "imagenet"):
        path = Path(encoder_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder_weights={encoder_weights!r}: no such file; give a torchvision {builder} state "
                "dict (.pth), or 'auto', 'imagenet' or 'none'"
            )
        return path
    enum = getattr(torchvision.models, enum_name)
    for name in candidates:
        path = _hub_checkpoint_path(getattr(enum, name))
        if path.is_file():
            return path
    wanted = getattr(enum, candidates[0])
    where = _hub_checkpoint_path(wanted)
    message = (
        f"ImageNet weights for encoder_type={encoder_type!r} are not in the torch hub cache: put "
        f"{wanted.url} at {where} (or pass encoder_weights=<path to a .pth state dict>)"
    )
    if encoder_weights == "imagenet":
        raise FileNotFoundError(message + "; bevtrain never downloads weights.")
    warnings.warn(message + "; using random initialisation.", stacklevel=3)
    return None


def _build_backbone(encoder_type: str, encoder_weights: str) -> nn.Module:
    builder = getattr(torchvision.models, _BACKBONES[encoder_type][0])
    model = builder(weights=None)
    path = resolve_backbone_weights(encoder_type, encoder_weights)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise RuntimeError(
                f"{path} is not a torchvision {_BACKBONES[encoder_type][0]} state dict: {err}"
            ) from err
    return model


class ResNetEncoder(nn.Module):
    """ResNet stem..layer2 (stride 8) and layer3 (stride 16), fused at stride 8."""

    def __init__(self, encoder_type: str, out_channels: int, encoder_weights: str):
        super().__init__()
        resnet = _build_backbone(encoder_type, encoder_weights)
        self.stem_to_layer2 = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2
        )
        self.layer3 = resnet.layer3
        c2 = _last_channels(resnet.layer2)
        c3 = _last_channels(resnet.layer3)
        mid = 512 if c3 >= 1024 else 256  # Simple-BEV's 512 for res50/101; res18 is lighter
        self.fuse = UpsamplingConcat(c2 + c3, mid)
        self.out_conv = nn.Conv2d(mid, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8 = self.stem_to_layer2(x)
        x16 = self.layer3(x8)
        return self.out_conv(self.fuse(x16, x8))


class EfficientNetEncoder(nn.Module):
    """torchvision EfficientNet stages to stride 16, fused with the stride-8 stage."""

    def __init__(self, encoder_type: str, out_channels: int, encoder_weights: str):
        super().__init__()
        net = _build_backbone(encoder_type, encoder_weights)
        features = net.features  # [stem, stage1 .. stage7, head]; stage3 ends at stride 8, stage5 at 16
        self.to_stride8 = nn.Sequential(*features[:4])
        self.to_stride16 = nn.Sequential(*features[4:6])
        c8 = _last_channels(self.to_stride8)
        c16 = _last_channels(self.to_stride16)
        self.fuse = UpsamplingConcat(c8 + c16, 128)
        self.out_conv = nn.Conv2d(128, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8 = self.to_stride8(x)
        x16 = self.to_stride16(x8)
        return self.out_conv(self.fuse(x16, x8))


def _last_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    return bns[-1].num_features if bns else convs[-1].out_channels


_ENCODER_CLASSES: Dict[str, Callable[..., nn.Module]] = {
    "res18": ResNetEncoder,
    "res50": ResNetEncoder,
    "res101": ResNetEncoder,
    "effb0": EfficientNetEncoder,
    "effb4": EfficientNetEncoder,
}


def build_encoder(encoder_type: str, out_channels: int, encoder_weights: str = "auto") -> nn.Module:
    """Image encoder (N, 3, H, W) normalised float -> (N, out_channels, ceil(H/8), ceil(W/8))."""
    if encoder_type not in _ENCODER_CLASSES:
        raise ValueError(f"unknown encoder_type={encoder_type!r}; valid: {', '.join(ENCODER_TYPES)}")
    return _ENCODER_CLASSES[encoder_type](encoder_type, out_channels, encoder_weights)
