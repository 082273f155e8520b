"""Image encoders: torchvision backbones to stride 16, fused with stride 8, out ``latent_dim`` channels.

As in Simple-BEV: a ResNet up to layer3 (stride 16), upsampled and concatenated with layer2
(stride 8), two 3x3 convs, then a 1x1 conv to ``latent_dim``; EfficientNets likewise from their
stride-16 and stride-8 stages.

``encoder_weights``:
- ``'imagenet'`` (the default): torchvision's ImageNet weights (``IMAGENET1K_V1``, what
  Simple-BEV's ``resnet101(pretrained=True)`` loaded), through torchvision's own mechanism: the
  torch hub cache (``$TORCH_HOME/hub/checkpoints``, or ``torch.hub.set_dir``), downloaded there
  with a progress bar when missing. When the file is neither cached nor downloadable,
  ``WeightsUnavailableError`` names the URL and the cache path; training checks this before it
  touches any data (``ensure_backbone_weights``), so a run never trains from random weights by
  accident;
- ``'none'``: random init (quickstart, tests; evaluation, whose weights come from a checkpoint);
- a path: a torchvision state dict of the backbone (e.g. the file torchvision would download).
``'auto'`` (pretrained only if already cached, silently random otherwise) was removed: it is
refused with a message saying what to use instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
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


# name -> (torchvision builder, weights enum attribute). ImageNet weights are IMAGENET1K_V1, the
# ones torchvision's old ``pretrained=True`` (Simple-BEV) gave.
_BACKBONES: Dict[str, Tuple[str, str]] = {
    "res18": ("resnet18", "ResNet18_Weights"),
    "res50": ("resnet50", "ResNet50_Weights"),
    "res101": ("resnet101", "ResNet101_Weights"),
    "effb0": ("efficientnet_b0", "EfficientNet_B0_Weights"),
    "effb4": ("efficientnet_b4", "EfficientNet_B4_Weights"),
}
ENCODER_TYPES = tuple(_BACKBONES)
REMOVED_AUTO = (
    "encoder_weights='auto' was removed (it trained from random weights without a word when the "
    "ImageNet file was not cached). Use 'imagenet' (the default: torch hub cache, downloaded when "
    "missing), 'none' (random init) or a path to a state dict"
)
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation: a stalled connection fails instead of hanging


class WeightsUnavailableError(FileNotFoundError):
    """ImageNet weights neither in the torch hub cache nor downloadable; the message says what to do."""


def imagenet_weights(encoder_type: str):
    """torchvision's weights entry (url, transforms, ...) for ``encoder_type``'s ImageNet weights."""
    _, enum_name = _BACKBONES[encoder_type]
    return getattr(torchvision.models, enum_name).IMAGENET1K_V1


def hub_checkpoint_path(weights) -> Path:
    """Where torchvision keeps ``weights`` (the torch hub checkpoint dir + the URL's file name)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _check_weights_choice(encoder_type: str, encoder_weights: str) -> None:
    if encoder_type not in _BACKBONES:
        raise ValueError(f"unknown encoder_type={encoder_type!r}; valid: {', '.join(ENCODER_TYPES)}")
    if encoder_weights == "auto":
        raise ValueError(REMOVED_AUTO)


def ensure_backbone_weights(encoder_type: str, encoder_weights: str, progress: bool = True) -> Path | None:
    """The state-dict file ``encoder_weights`` stands for, downloaded into the torch hub cache if
    needed; None for 'none'. Raises WeightsUnavailableError (ImageNet file neither cached nor
    downloadable) or FileNotFoundError (a path that does not exist) with what to do."""
    _check_weights_choice(encoder_type, encoder_weights)
    builder = _BACKBONES[encoder_type][0]
    if encoder_weights == "none":
        return None
    if encoder_weights != "imagenet":
        path = Path(encoder_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder_weights={encoder_weights!r}: no such file; give a torchvision {builder} state "
                "dict (.pth), or 'imagenet' or 'none'"
            )
        return path
    weights = imagenet_weights(encoder_type)
    path = hub_checkpoint_path(weights)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)  # torchvision names end in -<sha256 prefix>
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # torch hub's download (what weights.get_state_dict does): to a temp file in the cache,
            # hash-checked, renamed into place; a progress bar on stderr
            torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None,
                                           progress=progress)
    except Exception as err:  # URLError, timeouts, HTTP errors, a bad hash, a read-only cache ...
        raise WeightsUnavailableError(
            f"ImageNet weights for encoder_type={encoder_type!r} are not in the torch hub cache and could "
            f"not be downloaded ({type(err).__name__}: {err}).\n"
            f"  URL:        {weights.url}\n"
            f"  cache path: {path}\n"
            f"Download the file on a machine with internet and copy it to the cache path (the cache "
            f"folder follows $TORCH_HOME, default ~/.cache/torch), or pass encoder_weights=<path to the "
            f".pth>, or encoder_weights=none to train from random weights on purpose."
        ) from err
    return path


def _build_backbone(encoder_type: str, encoder_weights: str) -> nn.Module:
    builder = getattr(torchvision.models, _BACKBONES[encoder_type][0])
    model = builder(weights=None)
    path = ensure_backbone_weights(encoder_type, encoder_weights)
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


def build_encoder(encoder_type: str, out_channels: int, encoder_weights: str = "imagenet") -> nn.Module:
    """Image encoder (N, 3, H, W) normalised float -> (N, out_channels, ceil(H/8), ceil(W/8))."""
    _check_weights_choice(encoder_type, encoder_weights)
    return _ENCODER_CLASSES[encoder_type](encoder_type, out_channels, encoder_weights)


# -- Simple-BEV's EfficientNet conventions (compat='simplebev') --------------------------------------
# Simple-BEV builds EfficientNets with lukemelas' efficientnet_pytorch ``from_pretrained``: every
# conv pads TensorFlow-"SAME" style, statically, computed for the ImageNet image size (224 for b0,
# 380 for b4) whatever the real input, so a stride-2 conv on an even size pads (0, 1) or (1, 2)
# instead of torchvision's symmetric (1, 1) / (2, 2); and its batch norms use eps 1e-3, momentum 0.01.
_EFFNET_IMAGE_SIZE = {"effb0": 224, "effb4": 380}
SIMPLEBEV_EFFNET_BN = dict(eps=1e-3, momentum=0.01)


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_input(pad_lrtb: Tuple[int, int, int, int]):
    def hook(module, args):
        return (nn.functional.pad(args[0], pad_lrtb),) + tuple(args[1:])

    return hook


def use_simplebev_effnet_conventions(encoder: nn.Module, encoder_type: str) -> None:
    """Make an ``EfficientNetEncoder`` compute what Simple-BEV's ``Encoder_eff`` computes.

    Parameters and their names are untouched: each spatial conv gets ``padding=0`` and a forward
    pre-hook adding the static padding efficientnet_pytorch would use; the backbone's batch norms
    get eps 1e-3 and momentum 0.01.
    """
    if encoder_type not in _EFFNET_IMAGE_SIZE or not isinstance(encoder, EfficientNetEncoder):
        raise ValueError(f"Simple-BEV EfficientNet conventions apply to effb0/effb4, not {encoder_type!r}")
    size = _EFFNET_IMAGE_SIZE[encoder_type]  # static size the padding is computed for, per stage
    for module in list(encoder.to_stride8.modules()) + list(encoder.to_stride16.modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.eps, module.momentum = SIMPLEBEV_EFFNET_BN["eps"], SIMPLEBEV_EFFNET_BN["momentum"]
    # Convs in forward order; 1x1 convs need no padding, and only spatial ones change the size.
    for module in list(encoder.to_stride8.modules()) + list(encoder.to_stride16.modules()):
        if not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1):
            continue
        kernel, stride = module.kernel_size[0], module.stride[0]
        top, bottom = _same_padding(size, kernel, stride)
        module.padding = (0, 0)
        module.register_forward_pre_hook(_pad_input((top, bottom, top, bottom)))
        size = -(-size // stride)
