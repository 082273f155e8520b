"""Simple-BEV's training losses, in fp32 whatever the autocast state.

- segmentation: BCE with logits, ``pos_weight`` 2.13, averaged over ``valid`` pixels;
- centre: MSE between sigmoid(centre logits) and the Gaussian target, positives (target > 0.5)
  and negatives averaged separately and then together, over ``valid`` pixels;
- offset: L1 summed over (dx, dz), averaged over object pixels (``seg_bev * valid_bev``);
- learned uncertainty weighting with Simple-BEV's factors:
  ``10 * ce * exp(-w_ce) + 0.5 * w_ce``, ``center * exp(-w_c) / 2 + 0.5 * w_c``, same for offset.
The weights ``ce_weight``, ``center_weight``, ``offset_weight`` are parameters of the model.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

POS_WEIGHT = 2.13
CE_SCALE = 10.0


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


def compute_losses(
    out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], model: torch.nn.Module
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total uncertainty-weighted loss and detached parts for logging.

    ``out``: the model's dict ('seg', 'center', 'offset'); ``batch``: 'seg_bev', 'valid_bev',
    'center_bev', 'offset_bev' (B, ., Z, X); ``model``: the Segnet (or a DDP/compiled wrapper of it).
    parts: 'ce', 'center', 'offset' (unweighted), 'ce_weight', 'center_weight', 'offset_weight'.
    """
    net = getattr(model, "module", model)  # DDP
    net = getattr(net, "_orig_mod", net)  # torch.compile
    device_type = out["seg"].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        seg, valid = batch["seg_bev"], batch["valid_bev"]
        ce = bce_loss(out["seg"], seg, valid)
        center = balanced_mse_loss(out["center"], batch["center_bev"], valid)
        offset = offset_l1_loss(out["offset"], batch["offset_bev"], seg, valid)

        w_ce = net.ce_weight.float()
        w_center = net.center_weight.float()
        w_offset = net.offset_weight.float()
        total = (
            CE_SCALE * ce * torch.exp(-w_ce)
            + 0.5 * w_ce
            + center * 0.5 * torch.exp(-w_center)
            + 0.5 * w_center
            + offset * 0.5 * torch.exp(-w_offset)
            + 0.5 * w_offset
        )
    parts = {
        "ce": ce.detach(),
        "center": center.detach(),
        "offset": offset.detach(),
        "ce_weight": w_ce.detach(),
        "center_weight": w_center.detach(),
        "offset_weight": w_offset.detach(),
    }
    return total, parts
