"""Simple-BEV's training losses, in fp32 whatever the autocast state, and a loss for map layers.

- segmentation of object classes (vehicle, pedestrian, ...): BCE with logits, ``pos_weight`` 2.13,
  averaged over the ``valid`` pixels of every object channel together (each channel has its own
  visibility mask); with the default ``[vehicle]`` this is Simple-BEV's loss exactly;
- segmentation of map layers (drivable_area, divider, ...): ``map_loss`` 'focal' = BEVFusion's sigmoid
  focal loss (gamma 2, no alpha), or 'bce' = plain BCE, each averaged over the grid per layer and then
  over the layers (README "Classes": why focal is the default);
- centre: MSE between sigmoid(centre logits) and the Gaussian target, positives (target > 0.5)
  and negatives averaged separately and then together, over ``valid`` pixels;
- offset: L1 summed over (dx, dz), averaged over object pixels (``seg_bev * valid_bev``);
- learned uncertainty weighting with Simple-BEV's factors:
  ``10 * ce * exp(-w_ce) + 0.5 * w_ce``, ``center * exp(-w_c) / 2 + 0.5 * w_c``, same for offset.
The weights ``ce_weight``, ``center_weight``, ``offset_weight`` are parameters of the model; a model
with map layers has ``map_weight`` too (``CE_SCALE * map * exp(-w_map) + 0.5 * w_map``). Centre and
offset targets are class-agnostic over the object classes; without object classes their terms drop out.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

POS_WEIGHT = 2.13
CE_SCALE = 10.0
FOCAL_GAMMA = 2.0  # BEVFusion's (its alpha is off: -1)
MAP_LOSSES = ("focal", "bce")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean of ``x`` over pixels where ``mask`` > 0 (0 when the mask is empty)."""
    mask = mask.expand_as(x)
    return (x * mask).sum() / (mask.sum() + eps)


def bce_loss(seg_logits: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor, pos_weight=POS_WEIGHT):
    pos_weight_t = torch.tensor(pos_weight, device=seg_logits.device, dtype=torch.float32)
    per_pixel = F.binary_cross_entropy_with_logits(
        seg_logits.float(), seg.float(), pos_weight=pos_weight_t, reduction="none"
    )
    return masked_mean(per_pixel, valid.float())


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA):
    """Per-pixel focal loss: BCE scaled by (1 - p_t)^gamma, p_t the probability given to the true label."""
    logits, target = logits.float(), target.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return ce * (1 - p_t) ** gamma


def map_layer_loss(seg_logits: torch.Tensor, seg: torch.Tensor, kind: str = "focal") -> torch.Tensor:
    """Mean over layers of each layer's mean over the batch and grid; (B, L, Z, X) logits and targets."""
    if kind == "focal":
        per_pixel = sigmoid_focal_loss(seg_logits, seg)
    elif kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(seg_logits.float(), seg.float(), reduction="none")
    else:
        raise ValueError(f"map_loss={kind!r}; valid: {', '.join(MAP_LOSSES)}")
    return per_pixel.mean(dim=(0, 2, 3)).mean()


def balanced_mse_loss(center_logits: torch.Tensor, center: torch.Tensor, valid: torch.Tensor):
    center = center.float()
    sq = (torch.sigmoid(center_logits.float()) - center) ** 2
    valid = valid.float()
    pos = (center > 0.5).float() * valid
    neg = (center < 0.5).float() * valid
    return 0.5 * (masked_mean(sq, pos) + masked_mean(sq, neg))


def offset_l1_loss(offset_pred: torch.Tensor, offset: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor):
    l1 = (offset_pred.float() - offset.float()).abs().sum(dim=1, keepdim=True)
    return masked_mean(l1, seg.float() * valid.float())


def _channels(x: torch.Tensor, index: Tuple[int, ...]) -> torch.Tensor:
    """Channels ``index`` of (B, C, Z, X); ``x`` itself when that is all of them (no copy, same sums)."""
    return x if index == tuple(range(x.shape[1])) else x[:, list(index)]


def channel_kinds(model: torch.nn.Module, n_channels: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(object channels, map-layer channels) of a model's 'seg' output: from its ``classes``
    (bevtrain.classes), every channel an object class when it has none."""
    classes = getattr(model, "classes", None)
    if classes is None:
        return tuple(range(n_channels)), ()
    if len(classes) != n_channels:
        raise ValueError(f"the model has {len(classes)} classes but its 'seg' output {n_channels} channels")
    return (tuple(i for i, c in enumerate(classes) if c.is_object),
            tuple(i for i, c in enumerate(classes) if c.is_map))


def compute_losses(
    out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], model: torch.nn.Module
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total uncertainty-weighted loss and detached parts for logging.

    ``out``: the model's dict ('seg' (B, C, Z, X), 'center', 'offset'); ``batch``: 'seg_bev', 'valid_bev'
    (B, C, Z, X), 'center_bev', 'offset_bev'; ``model``: the Segnet (or a DDP/compiled wrapper of it),
    whose ``classes`` say which channels are objects and which map layers.
    parts (unweighted losses and the weights): with object classes 'ce', 'center', 'offset',
    'ce_weight', 'center_weight', 'offset_weight'; with map layers 'map', 'map_weight'.
    """
    net = getattr(model, "module", model)  # DDP
    net = getattr(net, "_orig_mod", net)  # torch.compile
    device_type = out["seg"].device.type
    objects, maps = channel_kinds(net, out["seg"].shape[1])
    parts: Dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=device_type, enabled=False):
        w_ce = net.ce_weight.float()
        w_center = net.center_weight.float()
        w_offset = net.offset_weight.float()
        if objects:
            seg = _channels(batch["seg_bev"], objects)  # (B, O, Z, X)
            valid = _channels(batch["valid_bev"], objects)
            ce = bce_loss(_channels(out["seg"], objects), seg, valid)
            # Centres and offsets belong to the boxes of every object class together: a cell is an
            # object cell in any class, and ignored when any class ignores it.
            any_seg = seg if seg.shape[1] == 1 else seg.amax(dim=1, keepdim=True)
            all_valid = valid if valid.shape[1] == 1 else valid.amin(dim=1, keepdim=True)
            center = balanced_mse_loss(out["center"], batch["center_bev"], all_valid)
            offset = offset_l1_loss(out["offset"], batch["offset_bev"], any_seg, all_valid)
            total = (
                CE_SCALE * ce * torch.exp(-w_ce)
                + 0.5 * w_ce
                + center * 0.5 * torch.exp(-w_center)
                + 0.5 * w_center
                + offset * 0.5 * torch.exp(-w_offset)
                + 0.5 * w_offset
            )
            parts.update(ce=ce, center=center, offset=offset, ce_weight=w_ce, center_weight=w_center,
                         offset_weight=w_offset)
        else:
            # No boxes to learn from: the object terms and their weights stay out of the loss (0 x keeps
            # them in the graph, as DDP wants every parameter to get a gradient).
            heads = out["center"].float().sum() + out["offset"].float().sum()
            total = 0.0 * (w_ce + w_center + w_offset + heads)
        if maps:
            w_map = net.map_weight.float()
            loss = map_layer_loss(_channels(out["seg"], maps), _channels(batch["seg_bev"], maps),
                                  getattr(net, "map_loss", "focal"))
            total = total + CE_SCALE * loss * torch.exp(-w_map) + 0.5 * w_map
            parts.update(map=loss, map_weight=w_map)
    return total, {k: v.detach() for k, v in parts.items()}
