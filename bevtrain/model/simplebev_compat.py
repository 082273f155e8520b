"""Simple-BEV checkpoints -> bevtrain ``Segnet`` weights (names, channel orders, input channels).

Simple-BEV's ``saverloader.save`` writes ``{'model_state_dict', 'optimizer_state_dict', ...}`` to
``<folder>/model-%09d.pth``; its released models come from a ``DataParallel`` model, so names may
carry a ``module.`` prefix. The file holds no config: the model settings come from flags, and
``check_settings`` compares them with what the tensors imply (encoder, latent_dim, radar/lidar).

Name map (Simple-BEV -> bevtrain; the architectures are the same, see ``Segnet`` with compat='simplebev'):

    encoder.backbone.{0..5}.*            -> encoder.stem_to_layer2.{0..5}.*   (res50/res101)
    encoder.backbone._conv_stem/_bn0     -> encoder.to_stride8.0.{0,1}        (effb0/effb4)
    encoder.backbone._blocks.{i}.*       -> encoder.to_stride{8,16}.{stage}.{j}.block.*
    encoder.upsampling_layer.*           -> encoder.fuse.*
    encoder.depth_layer.*                -> encoder.out_conv.*
    bev_compressor.0.weight              -> same name, input channels permuted (see below)
    decoder.up{1,2,3}_skip.upsample_layer.1.weight -> decoder.up{1,2,3}_skip.conv.0.weight
    decoder.segmentation_head / instance_center_head / instance_offset_head
                                         -> decoder.seg_head / center_head / offset_head
    everything else (decoder.first_conv, bn1, layer1-3, feat_head, *_weight): same name

Compressor input channels: Simple-BEV folds the lifted (C, Z, Y, X) features as ``c * Y + y``,
bevtrain as ``y * C + c``; metaradar's 16 feature channels likewise; radar occupancy (one channel)
and lidar occupancy (Y channels, one per height) keep their order.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping

import torch

# Blocks per EfficientNet stage that Simple-BEV keeps (stages 1-5, to stride 16).
EFFNET_STAGE_BLOCKS = {"effb0": (1, 2, 2, 3, 3), "effb4": (2, 4, 4, 6, 6)}
RESNET_LAYER3_BLOCKS = {"res50": 6, "res101": 23}
SIMPLEBEV_ENCODERS = ("res101", "res50", "effb0", "effb4")
METARADAR_CHANNELS = 16


class SimplebevCheckpointError(ValueError):
    """A Simple-BEV checkpoint does not fit the model; the message lists what and says what to do."""


def strip_module(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` prefix when every name has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def is_simplebev_checkpoint(obj) -> bool:
    """A Simple-BEV ``saverloader`` file: a dict with 'model_state_dict' and no bevtrain 'model'."""
    return isinstance(obj, Mapping) and "model_state_dict" in obj and "model" not in obj


# -- what the tensors say about the model ----------------------------------------------------------
def infer_settings(sd: Mapping[str, torch.Tensor], Y: int) -> Dict[str, object]:
    """encoder_type, latent_dim, do_rgbcompress, use_radar, use_metaradar, use_lidar implied by a
    Simple-BEV state dict (module prefix stripped), given the grid height Y (not stored in it)."""
    out: Dict[str, object] = {}
    if any(k.startswith("encoder.backbone._blocks.") for k in sd):
        n_blocks = len({int(k.split(".")[3]) for k in sd if k.startswith("encoder.backbone._blocks.")})
        found = [name for name, stages in EFFNET_STAGE_BLOCKS.items() if sum(stages) == n_blocks]
        out["encoder_type"] = found[0] if found else f"effnet?{n_blocks}"
    elif any(k.startswith("encoder.layer3.") for k in sd):
        n_blocks = len({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer3.")})
        found = [name for name, n in RESNET_LAYER3_BLOCKS.items() if n == n_blocks]
        out["encoder_type"] = found[0] if found else f"resnet?{n_blocks}"
    if "encoder.depth_layer.weight" in sd:
        out["latent_dim"] = int(sd["encoder.depth_layer.weight"].shape[0])
    comp = sd.get("bev_compressor.0.weight")
    out["do_rgbcompress"] = comp is not None
    out.update(use_radar=False, use_metaradar=False, use_lidar=False)
    if comp is not None and "latent_dim" in out:
        extra = int(comp.shape[1]) - int(out["latent_dim"]) * Y
        if extra == 0:
            pass
        elif extra == 1:
            out["use_radar"] = True
        elif extra == METARADAR_CHANNELS * Y:
            out.update(use_radar=True, use_metaradar=True)
        elif extra == Y:
            out["use_lidar"] = True
            out["do_rgbcompress"] = True
        else:
            out["compressor_in"] = int(comp.shape[1])
    return out


def check_settings(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, object], source: str) -> None:
    """Raise SimplebevCheckpointError naming the flags to pass when cfg does not fit the tensors."""
    if cfg.get("encoder_type") not in SIMPLEBEV_ENCODERS:
        raise SimplebevCheckpointError(
            f"{source}: Simple-BEV has no encoder_type={cfg.get('encoder_type')!r}; "
            f"valid: {', '.join(SIMPLEBEV_ENCODERS)}"
        )
    implied = infer_settings(sd, int(cfg["Y"]))
    if "compressor_in" in implied:
        raise SimplebevCheckpointError(
            f"{source}: bev_compressor.0.weight takes {implied['compressor_in']} input channels, which "
            f"fits no Simple-BEV setting with latent_dim={implied.get('latent_dim')} and Y={cfg['Y']} "
            f"(rgb {implied.get('latent_dim', 0) * cfg['Y']}, +1 radar, +16*Y metaradar, +Y lidar): "
            f"check --Y"
        )
    wrong = []
    for key in ("encoder_type", "latent_dim", "use_radar", "use_metaradar", "use_lidar"):
        if key in implied and implied[key] != cfg.get(key):
            wrong.append((key, implied[key], cfg.get(key)))
    # Without a compressor Simple-BEV had do_rgbcompress=False and neither radar nor lidar.
    if not implied["do_rgbcompress"] and cfg.get("do_rgbcompress"):
        wrong.append(("do_rgbcompress", False, True))
    if wrong:
        flags = " ".join(f"--{k}={v}" for k, v, _ in wrong)
        what = "; ".join(f"{k}={v!r} (now {now!r})" for k, v, now in wrong)
        raise SimplebevCheckpointError(
            f"{source} was trained with {what}. Pass {flags} (the file holds no config: model "
            f"settings come from the flags, defaulting to Simple-BEV's)"
        )


# -- names ---------------------------------------------------------------------------------------------
_EFF_BLOCK_PARTS = {  # efficientnet_pytorch MBConvBlock -> torchvision MBConv.block index (expand, no expand)
    "_expand_conv": ((0, 0), None),
    "_bn0": ((0, 1), None),
    "_depthwise_conv": ((1, 0), (0, 0)),
    "_bn1": ((1, 1), (0, 1)),
    "_se_reduce": ((2, "fc1"), (1, "fc1")),
    "_se_expand": ((2, "fc2"), (1, "fc2")),
    "_project_conv": ((3, 0), (2, 0)),
    "_bn2": ((3, 1), (2, 1)),
}


def _effnet_block_path(encoder_type: str, index: int) -> str:
    """Flat efficientnet_pytorch block index -> our module path of that MBConv."""
    stages = EFFNET_STAGE_BLOCKS[encoder_type]
    for stage, n in enumerate(stages, start=1):
        if index < n:
            # features[1..3] live in to_stride8 (after the stem at 0), features[4..5] in to_stride16.
            if stage <= 3:
                return f"encoder.to_stride8.{stage}.{index}"
            return f"encoder.to_stride16.{stage - 4}.{index}"
        index -= n
    raise KeyError(index)


def _map_effnet(name: str, encoder_type: str, has_expand: Mapping[int, bool]) -> str | None:
    rest = name[len("encoder.backbone."):]
    if rest.startswith("_conv_stem."):
        return "encoder.to_stride8.0.0." + rest[len("_conv_stem."):]
    if rest.startswith("_bn0."):
        return "encoder.to_stride8.0.1." + rest[len("_bn0."):]
    m = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", rest)
    if not m or m.group(2) not in _EFF_BLOCK_PARTS:
        return None
    index, part, leaf = int(m.group(1)), m.group(2), m.group(3)
    try:
        block = _effnet_block_path(encoder_type, index)
    except KeyError:
        return None
    where = _EFF_BLOCK_PARTS[part][0 if has_expand.get(index, True) else 1]
    if where is None:
        return None
    return f"{block}.block.{where[0]}.{where[1]}.{leaf}"


_HEADS = {
    "decoder.segmentation_head.": "decoder.seg_head.",
    "decoder.instance_center_head.": "decoder.center_head.",
    "decoder.instance_offset_head.": "decoder.offset_head.",
}


def map_name(name: str, encoder_type: str, has_expand: Mapping[int, bool] | None = None) -> str | None:
    """Our name for a Simple-BEV parameter/buffer name, or None if it has no counterpart."""
    if name.startswith("encoder.backbone."):
        if encoder_type.startswith("eff"):
            return _map_effnet(name, encoder_type, has_expand or {})
        return "encoder.stem_to_layer2." + name[len("encoder.backbone."):]
    if name.startswith("encoder.upsampling_layer."):
        return "encoder.fuse." + name[len("encoder.upsampling_layer."):]
    if name.startswith("encoder.depth_layer."):
        return "encoder.out_conv." + name[len("encoder.depth_layer."):]
    m = re.match(r"decoder\.(up\d_skip)\.upsample_layer\.1\.(.+)$", name)
    if m:
        return f"decoder.{m.group(1)}.conv.0.{m.group(2)}"
    for old, new in _HEADS.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


# -- channel orders --------------------------------------------------------------------------------------
def compressor_permutation(latent_dim: int, Y: int, radar: str, lidar: bool) -> torch.Tensor:
    """Index p with ours[:, i] = simplebev[:, p[i]] for the compressor's input channels.

    radar: 'none' | 'occupancy' (1 channel) | 'meta' (16 per height)."""
    C = latent_dim
    y, c = torch.meshgrid(torch.arange(Y), torch.arange(C), indexing="ij")
    parts = [(c * Y + y).reshape(-1)]  # ours y*C + c reads Simple-BEV's c*Y + y
    offset = C * Y
    if radar == "occupancy":
        parts.append(torch.tensor([offset]))
    elif radar == "meta":
        y, f = torch.meshgrid(torch.arange(Y), torch.arange(METARADAR_CHANNELS), indexing="ij")
        parts.append(offset + (f * Y + y).reshape(-1))
    elif lidar:
        parts.append(offset + torch.arange(Y))
    return torch.cat(parts)


# -- conversion ----------------------------------------------------------------------------------------------
def convert_state_dict(
    sd: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str = "Simple-BEV checkpoint"
) -> Dict[str, torch.Tensor]:
    """Simple-BEV state dict -> a state dict that ``model`` (a ``Segnet`` built with compat='simplebev') loads
    strictly. Every Simple-BEV tensor must find a model tensor of the same shape and every model
    tensor must be filled; otherwise SimplebevCheckpointError lists the names on both sides."""
    if getattr(model, "compat", "none") != "simplebev":
        raise SimplebevCheckpointError(
            f"{source}: Simple-BEV weights need the Simple-BEV forward pass; build the model with "
            f"compat='simplebev' (flag --compat=simplebev)"
        )
    sd = strip_module(sd)
    cfg = dict(
        encoder_type=model.encoder_type, latent_dim=model.latent_dim, Y=model.Y, use_radar=model.use_radar,
        use_metaradar=model.use_metaradar, use_lidar=model.use_lidar, do_rgbcompress=model.do_rgbcompress,
    )
    check_settings(sd, cfg, source)
    has_expand = {}
    for k in sd:
        m = re.match(r"encoder\.backbone\._blocks\.(\d+)\._expand_conv\.", k)
        if m:
            has_expand[int(m.group(1))] = True
    for k in sd:
        m = re.match(r"encoder\.backbone\._blocks\.(\d+)\.", k)
        if m:
            has_expand.setdefault(int(m.group(1)), False)

    ours = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unmapped: List[str] = []
    mismatched: List[str] = []
    for name, tensor in sd.items():
        new = map_name(name, model.encoder_type, has_expand)
        if new is None or new not in ours:
            unmapped.append(name if new is None or new == name else f"{name} (-> {new})")
            continue
        if name == "bev_compressor.0.weight":
            radar = "meta" if model.use_metaradar else "occupancy" if model.use_radar else "none"
            lidar = model.use_lidar and not model.use_radar
            perm = compressor_permutation(model.latent_dim, model.Y, radar, lidar)
            if tensor.shape[1] == perm.numel():
                tensor = tensor[:, perm]
        if tuple(tensor.shape) != tuple(ours[new].shape):
            mismatched.append(f"{name} {tuple(tensor.shape)} vs {new} {tuple(ours[new].shape)}")
            continue
        out[new] = tensor.to(ours[new].dtype) if tensor.is_floating_point() else tensor
    missing = sorted(set(ours) - set(out))
    if unmapped or mismatched or missing:
        parts = []
        for label, names in (
            ("Simple-BEV tensors with no place in the model", unmapped),
            ("shape mismatches", mismatched),
            ("model tensors the checkpoint does not fill", missing),
        ):
            if names:
                parts.append(f"{label} ({len(names)}): {_short(names)}")
        raise SimplebevCheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    return out


def _short(names: Iterable[str], n: int = 10) -> str:
    names = list(names)
    more = f", ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more

