"""Losses: BCE(pos_weight) over valid pixels, balanced centre MSE, masked offset L1, uncertainty weights."""

import math

import pytest
import torch
import torch.nn as nn

from bevtrain.losses import POS_WEIGHT, balanced_mse_loss, bce_loss, compute_losses


class Weights(nn.Module):
    """Holds the three uncertainty parameters exactly as Segnet does."""

    def __init__(self):
        super().__init__()
        self.ce_weight = nn.Parameter(torch.tensor(0.0))
        self.center_weight = nn.Parameter(torch.tensor(0.0))
        self.offset_weight = nn.Parameter(torch.tensor(0.0))


def make_batch(B=2, Z=16, X=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = (torch.rand(B, 1, Z, X, generator=g) > 0.8).float()
    valid = (torch.rand(B, 1, Z, X, generator=g) > 0.3).float()
    center = torch.rand(B, 1, Z, X, generator=g) * seg
    center[center > 0] += 0.3  # some positives above 0.5
    offset = torch.randn(B, 2, Z, X, generator=g) * seg
    return {"seg_bev": seg, "valid_bev": valid, "center_bev": center.clamp(max=1), "offset_bev": offset}


def random_out(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, _, Z, X = batch["seg_bev"].shape
    return {
        "seg": torch.randn(B, 1, Z, X, generator=g),
        "center": torch.randn(B, 1, Z, X, generator=g),
        "offset": torch.randn(B, 2, Z, X, generator=g),
    }


def test_confident_correct_predictions_give_near_zero_bce():
    batch = make_batch()
    seg = batch["seg_bev"]
    correct = (seg * 2 - 1) * 30.0
    assert bce_loss(correct, seg, batch["valid_bev"]) < 1e-6
    wrong = -correct
    # A confidently wrong positive costs pos_weight * 30, a negative 30.
    assert bce_loss(wrong, seg, batch["valid_bev"]) > 25.0


def test_bce_matches_torch_with_pos_weight_over_valid_pixels():
    batch = make_batch()
    out = random_out(batch)
    valid = batch["valid_bev"].bool()
    expected = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(POS_WEIGHT))(
        out["seg"][valid], batch["seg_bev"][valid]
    )
    torch.testing.assert_close(bce_loss(out["seg"], batch["seg_bev"], batch["valid_bev"]), expected)


def test_invalid_pixels_contribute_nothing():
    batch = make_batch()
    out = random_out(batch)
    model = Weights()
    total, parts = compute_losses(out, batch, model)

    invalid = batch["valid_bev"] == 0
    changed = {k: v.clone() for k, v in out.items()}
    changed["seg"][invalid] = 50.0
    changed["center"][invalid] = -50.0
    changed["offset"][invalid.expand_as(changed["offset"])] = 99.0
    total2, parts2 = compute_losses(changed, batch, model)
    assert torch.equal(total, total2)
    for k in ("ce", "center", "offset"):
        assert torch.equal(parts[k], parts2[k]), k

    # The same change on valid pixels does move every part (so the check above can fail).
    valid = ~invalid
    moved = {k: v.clone() for k, v in out.items()}
    moved["seg"][valid] = 50.0
    moved["center"][valid] = -50.0
    moved["offset"][valid.expand_as(moved["offset"])] = 99.0
    _, parts3 = compute_losses(moved, batch, model)
    for k in ("ce", "center", "offset"):
        assert not torch.equal(parts[k], parts3[k]), k


def test_offset_loss_only_on_object_pixels():
    batch = make_batch()
    out = random_out(batch)
    _, parts = compute_losses(out, batch, Weights())
    background = (batch["seg_bev"] == 0).expand_as(out["offset"])
    out["offset"][background] = 1000.0
    _, parts2 = compute_losses(out, batch, Weights())
    assert torch.equal(parts["offset"], parts2["offset"])


def test_balanced_mse_averages_positives_and_negatives_separately():
    center = torch.zeros(1, 1, 10, 10)
    center[0, 0, 5, 5] = 1.0  # one positive among 99 negatives
    valid = torch.ones_like(center)
    logits = torch.full_like(center, -30.0)  # sigmoid ~ 0 everywhere
    # Negatives are right, the single positive is off by 1: its mean is 1, the negatives' mean 0.
    assert balanced_mse_loss(logits, center, valid).item() == pytest.approx(0.5, abs=1e-6)
    logits[0, 0, 5, 5] = 30.0
    logits[0, 0, 0, 0] = 30.0  # one wrong negative of 99
    assert balanced_mse_loss(logits, center, valid).item() == pytest.approx(0.5 / 99, rel=1e-4)


def test_total_is_simple_bev_weighting_and_fp32_under_autocast():
    batch = make_batch()
    out = {k: v.to(torch.bfloat16) for k, v in random_out(batch).items()}
    model = Weights()
    with torch.no_grad():
        model.ce_weight.fill_(0.3)
        model.center_weight.fill_(-0.2)
        model.offset_weight.fill_(0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = compute_losses(out, batch, model)
    assert total.dtype == torch.float32
    expected = (
        10 * parts["ce"] * math.exp(-0.3) + 0.15
        + parts["center"] * 0.5 * math.exp(0.2) - 0.1
        + parts["offset"] * 0.5 * math.exp(-0.1) + 0.05
    )
    torch.testing.assert_close(total.detach(), expected)
    assert set(parts) == {"ce", "center", "offset", "ce_weight", "center_weight", "offset_weight"}
    assert all(not p.requires_grad for p in parts.values())


def test_uncertainty_weights_learn_to_their_optimum():
    batch = make_batch()
    out = random_out(batch)
    model = Weights()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        total, parts = compute_losses(out, batch, model)
        total.backward()
        opt.step()
    # d/dw (k * L * exp(-w) + w / 2) = 0  =>  w = log(2 k L), with k = 10 for ce and 1/2 otherwise.
    assert model.ce_weight.item() == pytest.approx(math.log(20 * parts["ce"].item()), abs=0.02)
    assert model.center_weight.item() == pytest.approx(math.log(parts["center"].item()), abs=0.02)
    assert model.offset_weight.item() == pytest.approx(math.log(parts["offset"].item()), abs=0.02)


def test_bce_pos_weight_is_simple_bevs_2_13():
    # Simple-BEV trains with SimpleLoss(2.13) (train_nuscenes.py, "value from lift-splat"): BCE whose
    # positive term is weighted 2.13, averaged over valid pixels. At logit 0 a positive pixel costs
    # 2.13 log 2 and a negative log 2: one positive and three negatives average (2.13 + 3) log 2 / 4.
    seg = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    zeros = torch.zeros_like(seg)
    batch = {"seg_bev": seg, "valid_bev": torch.ones_like(seg), "center_bev": zeros,
             "offset_bev": torch.zeros(1, 2, 2, 2)}
    out = {"seg": zeros, "center": zeros, "offset": torch.zeros(1, 2, 2, 2)}
    _, parts = compute_losses(out, batch, Weights())  # the training path, default pos_weight
    assert parts["ce"].item() == pytest.approx((2.13 + 3) * math.log(2) / 4, rel=1e-6)
    # The weight multiplies the positive term only: a confidently wrong positive (logit -20) costs
    # 2.13 x 20, a confidently wrong negative (logit +20) 20.
    wrong = {**out, "seg": torch.tensor([[[[-20.0, 20.0], [-20.0, -20.0]]]])}
    _, parts = compute_losses(wrong, batch, Weights())
    assert parts["ce"].item() == pytest.approx((2.13 * 20 + 20) / 4, rel=1e-6)


# ------------------------------------------------------------------------------ several classes
class ClassWeights(Weights):
    """The uncertainty parameters and the classes, as a Segnet with these outputs holds them."""

    def __init__(self, names, map_loss="focal"):
        from bevtrain.classes import resolve_classes

        super().__init__()
        self.classes = resolve_classes(names)
        self.map_loss = map_loss
        if any(c.is_map for c in self.classes):
            self.map_weight = nn.Parameter(torch.tensor(0.0))


def test_object_classes_take_masked_bce_with_their_own_masks_and_map_layers_their_loss():
    from bevtrain.losses import sigmoid_focal_loss

    g = torch.Generator().manual_seed(5)
    B, Z, X = 2, 6, 7
    seg = (torch.rand(B, 3, Z, X, generator=g) > 0.7).float()  # vehicle, pedestrian, drivable_area
    valid = torch.ones(B, 3, Z, X)
    valid[:, 0] = (torch.rand(B, Z, X, generator=g) > 0.3).float()
    valid[:, 1] = (torch.rand(B, Z, X, generator=g) > 0.3).float()
    batch = {"seg_bev": seg, "valid_bev": valid, "center_bev": torch.rand(B, 1, Z, X, generator=g),
             "offset_bev": torch.randn(B, 2, Z, X, generator=g)}
    out = {"seg": torch.randn(B, 3, Z, X, generator=g), "center": torch.randn(B, 1, Z, X, generator=g),
           "offset": torch.randn(B, 2, Z, X, generator=g)}
    model = ClassWeights(["vehicle", "pedestrian", "drivable_area"])
    total, parts = compute_losses(out, batch, model)
    assert set(parts) == {"ce", "center", "offset", "ce_weight", "center_weight", "offset_weight", "map",
                          "map_weight"}
    # Objects: BCE(pos_weight) over the valid pixels of each object channel, pooled.
    obj_valid = valid[:, :2].bool()
    expected_ce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(POS_WEIGHT))(
        out["seg"][:, :2][obj_valid], seg[:, :2][obj_valid])
    torch.testing.assert_close(parts["ce"], expected_ce)
    # Map layers: the focal loss (BCE x (1 - p_t)^2) averaged over the layer's pixels; no mask.
    p = torch.sigmoid(out["seg"][:, 2])
    t = seg[:, 2]
    p_t = p * t + (1 - p) * (1 - t)
    bce = nn.functional.binary_cross_entropy_with_logits(out["seg"][:, 2], t, reduction="none")
    torch.testing.assert_close(parts["map"], (bce * (1 - p_t) ** 2).mean())
    torch.testing.assert_close(sigmoid_focal_loss(out["seg"][:, 2], t).mean(), parts["map"])
    # Centre and offset are class-agnostic: object cells of any class, ignored where any class ignores.
    any_seg = seg[:, :2].amax(dim=1, keepdim=True)
    all_valid = valid[:, :2].amin(dim=1, keepdim=True)
    center = balanced_mse_loss(out["center"], batch["center_bev"], all_valid)
    torch.testing.assert_close(parts["center"], center)
    l1 = (out["offset"] - batch["offset_bev"]).abs().sum(1, keepdim=True)
    cells = any_seg * all_valid
    torch.testing.assert_close(parts["offset"], (l1 * cells).sum() / (cells.sum() + 1e-6))
    expected_total = (10 * parts["ce"] + parts["center"] * 0.5 + parts["offset"] * 0.5 + 10 * parts["map"])
    torch.testing.assert_close(total.detach(), expected_total)

    # A pedestrian pixel that only the vehicle channel ignores still counts for the pedestrian.
    only_vehicle = valid.clone()
    only_vehicle[:, 1] = 1
    _, parts_all = compute_losses(out, {**batch, "valid_bev": only_vehicle}, model)
    assert parts_all["ce"] != parts["ce"]

    # 'bce' for the map layers: plain BCE, mean over the pixels of each layer.
    _, parts_bce = compute_losses(out, batch, ClassWeights(["vehicle", "pedestrian", "drivable_area"], "bce"))
    torch.testing.assert_close(parts_bce["map"], bce.mean())


def test_map_layers_alone_leave_the_object_terms_out_but_in_the_graph():
    seg = torch.zeros(1, 2, 4, 4)
    seg[0, 0, :2] = 1
    batch = {"seg_bev": seg, "valid_bev": torch.ones_like(seg), "center_bev": torch.zeros(1, 1, 4, 4),
             "offset_bev": torch.zeros(1, 2, 4, 4)}
    out = {"seg": torch.zeros(1, 2, 4, 4, requires_grad=True),
           "center": torch.zeros(1, 1, 4, 4, requires_grad=True),
           "offset": torch.zeros(1, 2, 4, 4, requires_grad=True)}
    model = ClassWeights(["drivable_area", "divider"])
    total, parts = compute_losses(out, batch, model)
    assert set(parts) == {"map", "map_weight"}
    # At logit 0 every pixel costs log 2 x 0.5^2, whatever its label.
    assert parts["map"].item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert total.item() == pytest.approx(10 * 0.25 * math.log(2), rel=1e-6)
    total.backward()
    assert model.ce_weight.grad == 0 and model.center_weight.grad == 0 and out["center"].grad is not None
    assert model.map_weight.grad != 0
