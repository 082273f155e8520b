"""Segnet: lift geometry and speed path, encoders, gradients, radar/lidar inputs, overfitting."""

import math
import warnings

import pytest
import torch
import torchvision

from bevtrain.geometry import Vox_util, pad_intrinsics, rigid_inverse
from bevtrain.losses import compute_losses
from bevtrain.model import ENCODER_TYPES, Segnet, build_encoder, lift_features, lift_reference
from bevtrain.model.encoders import resolve_backbone_weights

SMALL_BOUNDS = (-16.0, 16.0, -5.0, 5.0, -16.0, 16.0)


def random_rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_rig(B, S, feat_hw, seed=0):
    """Random cameras near the origin looking roughly horizontally; one mirrored, one flipped fx."""
    g = torch.Generator().manual_seed(seed)
    Hf, Wf = feat_hw
    featpix_T_ref = torch.zeros(B, S, 4, 4)
    for b in range(B):
        for s in range(S):
            yaw = torch.rand(1, generator=g).item() * 2 * math.pi
            tilt = random_rotation(g)
            # Small random tilt around a yaw about the vertical (y) axis.
            tilt = torch.linalg.matrix_exp(0.1 * (tilt - tilt.T))
            rot_y = torch.tensor(
                [[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]]
            )
            ref_T_cam = torch.eye(4)
            ref_T_cam[:3, :3] = rot_y @ tilt
            ref_T_cam[:3, 3] = torch.randn(3, generator=g) * torch.tensor([1.0, 0.2, 1.0])
            cam_T_ref = rigid_inverse(ref_T_cam)
            if (b, s) == (0, 1):
                cam_T_ref = cam_T_ref @ torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # mirrored x
            f = Wf * (0.5 + torch.rand(1, generator=g).item())
            K = torch.tensor(
                [
                    [f, 0.0, Wf * (0.3 + 0.4 * torch.rand(1, generator=g).item())],
                    [0.0, f, Hf * (0.3 + 0.4 * torch.rand(1, generator=g).item())],
                    [0.0, 0.0, 1.0],
                ]
            )
            if (b, s) == (1, 0):
                K[0, 0] = -K[0, 0]  # horizontally flipped image
                K[0, 2] = Wf - 1 - K[0, 2]
            featpix_T_ref[b, s] = pad_intrinsics(K) @ cam_T_ref
    return featpix_T_ref


# ----------------------------------------------------------------------------------- lift


def test_fast_lift_equals_reference_lift_values_and_gradients():
    B, S, C, Hf, Wf = 2, 3, 5, 9, 14
    vox_util = Vox_util(12, 4, 14, bounds=SMALL_BOUNDS)
    featpix_T_ref = random_rig(B, S, (Hf, Wf))
    feats = torch.randn(B, S, C, Hf, Wf, requires_grad=True)

    fast = lift_features(feats, featpix_T_ref, vox_util)
    ref = lift_reference(feats, featpix_T_ref, vox_util)
    assert fast.shape == ref.shape == (B, C, 12, 4, 14)
    seen = ref.abs().sum(1) > 0
    assert seen.float().mean() > 0.2  # the rig sees a good part of the grid ...
    assert (~seen).any()  # ... but not all of it
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(ref)
    (grad_fast,) = torch.autograd.grad(fast, feats, upstream)
    (grad_ref,) = torch.autograd.grad(ref, feats, upstream)
    assert grad_ref.abs().sum() > 0
    torch.testing.assert_close(grad_fast, grad_ref, atol=1e-4, rtol=1e-4)


def test_lift_averages_over_the_cameras_that_see_a_voxel():
    """Two cameras seeing the same voxels with constant features 1 and 3 give 2, one alone gives 1."""
    Hf, Wf = 8, 8
    vox_util = Vox_util(8, 2, 8, bounds=SMALL_BOUNDS)
    K = pad_intrinsics(torch.tensor([[4.0, 0, 3.5], [0, 4.0, 3.5], [0, 0, 1]]))
    forward = torch.eye(4)
    featpix_T_ref = torch.stack([K @ forward, K @ forward]).unsqueeze(0)
    feats = torch.stack([torch.full((1, Hf, Wf), 1.0), torch.full((1, Hf, Wf), 3.0)]).unsqueeze(0)
    both = lift_features(feats, featpix_T_ref, vox_util)
    seen = both != 0
    assert seen.any() and (~seen).any()
    torch.testing.assert_close(both[seen], torch.full_like(both[seen], 2.0))
    one = lift_features(feats[:, :1], featpix_T_ref[:, :1], vox_util)
    torch.testing.assert_close(one[seen], torch.full_like(one[seen], 1.0))
    assert torch.equal(one != 0, seen)


# ----------------------------------------------------------------------------------- model


def small_model(**kw):
    vox_util = Vox_util(kw.pop("Z", 16), kw.pop("Y", 4), kw.pop("X", 16), bounds=SMALL_BOUNDS)
    kw.setdefault("encoder_weights", "none")
    kw.setdefault("encoder_type", "res18")
    return Segnet(vox_util.Z, vox_util.Y, vox_util.X, vox_util=vox_util, **kw)


def ring_inputs(B=1, S=4, H=32, W=64, seed=0):
    """A ring of S cameras around the origin (images, pix_T_cams, cams_T_ref)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, S, 3, H, W), dtype=torch.uint8, generator=g)
    K = pad_intrinsics(torch.tensor([[W * 0.6, 0, W / 2 - 0.5], [0, W * 0.6, H / 2 - 0.5], [0, 0, 1.0]]))
    cams_T_ref = []
    for s in range(S):
        yaw = 2 * math.pi * s / S
        ref_T_cam = torch.eye(4)
        ref_T_cam[:3, :3] = torch.tensor(
            [[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]]
        )
        cams_T_ref.append(rigid_inverse(ref_T_cam))
    return images, K.expand(B, S, 4, 4).clone(), torch.stack(cams_T_ref).expand(B, S, 4, 4).clone()


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_output_shapes_for_every_encoder(encoder_type):
    torch.manual_seed(0)
    model = small_model(encoder_type=encoder_type, latent_dim=16).eval()
    images, pix_T_cams, cams_T_ref = ring_inputs(B=2, S=2, H=32, W=48)
    with torch.no_grad():
        out = model(images, pix_T_cams, cams_T_ref)
    assert out["seg"].shape == (2, 1, 16, 16)
    assert out["center"].shape == (2, 1, 16, 16)
    assert out["offset"].shape == (2, 2, 16, 16)
    assert out["feat"].shape == (2, 16, 16, 16)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ValueError, match="res18, res50, res101, effb0, effb4"):
        build_encoder("vit", 16, "none")


def test_encoder_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        build_encoder("res18", 16, "imagenet")
    with pytest.warns(UserWarning, match="random initialisation"):
        assert resolve_backbone_weights("res18", "auto") is None

    # Once the file torchvision would download is cached, 'auto' and 'imagenet' load it.
    reference = torchvision.models.resnet18(weights=None)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    for weights in ("auto", "imagenet", str(cached)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encoder = build_encoder("res18", 16, weights)
        torch.testing.assert_close(encoder.stem_to_layer2[0].weight, reference.conv1.weight)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_encoder("res18", 16, str(tmp_path / "missing.pth"))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = small_model(latent_dim=16, use_radar=True, use_metaradar=True, radar_feat_dim=2, use_lidar=True)
    images, pix_T_cams, cams_T_ref = ring_inputs(B=2)
    radar = torch.randn(2, 30, 5) * 6
    lidar = torch.randn(2, 40, 4) * 6
    counts = torch.tensor([30, 12])
    g = torch.Generator().manual_seed(1)
    seg = (torch.rand(2, 1, 16, 16, generator=g) > 0.7).float()
    batch = {
        "seg_bev": seg,
        "valid_bev": torch.ones_like(seg),
        "center_bev": seg * 0.9,
        "offset_bev": torch.randn(2, 2, 16, 16, generator=g) * seg,
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # The decoder's ResNet blocks start with zero-initialised last norms (zero_init_residual),
    # so their inner convs get gradients from the second step on.
    for _ in range(2):
        opt.zero_grad()
        out = model(images, pix_T_cams, cams_T_ref, radar, counts, lidar, counts)
        total, _ = compute_losses(out, batch, model)
        total.backward()
        opt.step()
    # The 'feat' head is an output for users (as in Simple-BEV); no loss trains it.
    no_grad = [
        n
        for n, p in model.named_parameters()
        if not n.startswith("decoder.feat_head.") and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert no_grad == []
    for name in ("ce_weight", "center_weight", "offset_weight"):
        assert getattr(model, name).item() != 0.0


def test_radar_and_lidar_change_the_output_and_padding_does_not():
    torch.manual_seed(0)
    model = small_model(latent_dim=8, use_radar=True, use_metaradar=True, radar_feat_dim=2, use_lidar=True)
    model.eval()
    images, pix_T_cams, cams_T_ref = ring_inputs(B=1)
    g = torch.Generator().manual_seed(2)
    radar = torch.randn(1, 20, 5, generator=g) * 6
    lidar = torch.randn(1, 30, 4, generator=g) * 6
    count_r, count_l = torch.tensor([15]), torch.tensor([25])

    def run(r, lid):
        with torch.no_grad():
            return model(images, pix_T_cams, cams_T_ref, r, count_r, lid, count_l)["seg"]

    base = run(radar, lidar)
    padded_r, padded_l = radar.clone(), lidar.clone()
    padded_r[:, 15:] = 3.0
    padded_l[:, 25:] = -2.0
    assert torch.equal(run(padded_r, padded_l), base)

    moved_r = radar.clone()
    moved_r[:, :15, :3] += 4.0
    assert not torch.allclose(run(moved_r, lidar), base)
    feats_r = radar.clone()
    feats_r[:, :15, 3:] += 5.0  # metaradar features alone
    assert not torch.allclose(run(feats_r, lidar), base)
    moved_l = lidar.clone()
    moved_l[:, :25, :3] += 4.0
    assert not torch.allclose(run(radar, moved_l), base)

    with pytest.raises(ValueError, match="use_radar=True"):
        model(images, pix_T_cams, cams_T_ref)


def test_channels_last_and_no_rgbcompress_match_shapes_and_values():
    torch.manual_seed(0)
    model = small_model(latent_dim=8).eval()
    images, pix_T_cams, cams_T_ref = ring_inputs(B=1)
    with torch.no_grad():
        base = model(images, pix_T_cams, cams_T_ref)
        model.to(memory_format=torch.channels_last)
        cl = model(images, pix_T_cams, cams_T_ref)
    for k in base:
        torch.testing.assert_close(cl[k], base[k], atol=1e-4, rtol=1e-4)

    mean_y = small_model(latent_dim=8, do_rgbcompress=False).eval()
    assert not hasattr(mean_y, "bev_compressor")
    with torch.no_grad():
        assert mean_y(images, pix_T_cams, cams_T_ref)["seg"].shape == (1, 1, 16, 16)
