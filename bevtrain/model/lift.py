"""Lifting image features into the voxel grid (Simple-BEV's "unproject and average").

Every voxel centre is projected into every camera with ``featpix_T_ref = pix_T_cam @ cam_T_ref``
(intrinsics already at feature-map scale), the feature map is sampled bilinearly there, points
behind a camera or outside its image are masked, and the samples are averaged over the cameras
that see the voxel.

Two implementations compute the same numbers:

- ``lift_reference``: one ``grid_sample`` per (batch, camera) over every voxel, then a masked
  mean over cameras. Simple and memory hungry: it materialises B*S*C*Z*Y*X samples although most
  voxels are seen by only one or two of the six cameras.
- ``lift_features``: builds the lift as one sparse matrix (rows = voxels, columns = feature
  pixels of all cameras, four bilinear weights per visible (voxel, camera) pair, divided by the
  number of cameras seeing the voxel) and multiplies it with the feature pixels. Only visible
  pairs cost anything, nothing of size S*C*V is allocated, and the backward pass is the
  transposed matrix. Its output is laid out (B, Z, X, Y, C) in memory, so folding Y into channels
  for the BEV compressor is a free view that is already channels-last.

Both use the matrices as given: mirrored ``cam_T_ref`` (det -1) and negative focal lengths
(horizontally flipped images) need no special code. Pixel centres sit at integer coordinates
(the convention of ``geometry.scale_intrinsics``); a point is inside the image when its pixel
coordinate lies in [-0.5, W - 0.5], and sampling clamps to the border pixels.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch
import torch.nn.functional as F

from bevtrain.geometry import Vox_util, scale_intrinsics

DEPTH_EPS = 1e-4  # metres in front of the camera below which a point counts as behind it


def feature_pix_T_ref(
    pix_T_cams: torch.Tensor, cams_T_ref: torch.Tensor, image_hw: Tuple[int, int], feat_hw: Tuple[int, int]
) -> torch.Tensor:
    """(B, S, 4, 4) projection from the reference frame to feature-map pixels."""
    H, W = image_hw
    Hf, Wf = feat_hw
    featpix_T_cams = scale_intrinsics(pix_T_cams.float(), Wf / float(W), Hf / float(H))
    return featpix_T_cams @ cams_T_ref.float()


def project_points(
    featpix_T_ref: torch.Tensor, xyz_ref: torch.Tensor, feat_hw: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (B, S, N, 2) of points (N, 3) in every camera and visibility (B, S, N)."""
    Hf, Wf = feat_hw
    rot = featpix_T_ref[..., :3, :3]  # (B, S, 3, 3)
    trans = featpix_T_ref[..., :3, 3]  # (B, S, 3)
    # (B, S, N, 3) homogeneous pixels (u*z, v*z, z); the third row of pix_T_cam is (0, 0, 1, 0).
    pix = torch.einsum("bsij,nj->bsni", rot, xyz_ref) + trans.unsqueeze(-2)
    depth = pix[..., 2]
    uv = pix[..., :2] / depth.clamp(min=DEPTH_EPS).unsqueeze(-1)
    u, v = uv[..., 0], uv[..., 1]
    visible = (depth > DEPTH_EPS) & (u >= -0.5) & (u <= Wf - 0.5) & (v >= -0.5) & (v <= Hf - 0.5)
    return uv, visible


def _check_feats(feats: torch.Tensor) -> None:
    if feats.dim() != 5:
        raise ValueError(f"feats must be (B, S, C, Hf, Wf), got shape {tuple(feats.shape)}")
    if feats.shape[-1] < 2 or feats.shape[-2] < 2:
        raise ValueError(f"feature map {tuple(feats.shape[-2:])} too small to sample bilinearly")


def lift_reference(feats: torch.Tensor, featpix_T_ref: torch.Tensor, vox_util: Vox_util) -> torch.Tensor:
    """Straightforward lift with grid_sample over all (voxel, camera) pairs: (B, C, Z, Y, X)."""
    _check_feats(feats)
    B, S, C, Hf, Wf = feats.shape
    Z, Y, X = vox_util.grid_shape
    device = feats.device
    with torch.autocast(device_type=device.type, enabled=False):
        xyz = vox_util.voxel_centers_ref(device)  # (V, 3) in [z, y, x] order
        uv, visible = project_points(featpix_T_ref.float(), xyz, (Hf, Wf))
        grid = torch.stack([uv[..., 0] * (2.0 / (Wf - 1)) - 1.0, uv[..., 1] * (2.0 / (Hf - 1)) - 1.0], -1)
        sampled = F.grid_sample(
            feats.reshape(B * S, C, Hf, Wf).float(),
            grid.reshape(B * S, 1, -1, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        ).reshape(B, S, C, -1)  # (B, S, C, V)
        mask = visible.float().unsqueeze(2)  # (B, S, 1, V)
        summed = (sampled * mask).sum(1)
        count = mask.sum(1).clamp(min=1.0)
        return (summed / count).reshape(B, C, Z, Y, X)


def _voxel_centers_zxy(vox_util: Vox_util, device) -> torch.Tensor:
    """(Z*X*Y, 3) voxel centres flattened in [z, x, y] order (y fastest)."""
    Z, Y, X = vox_util.grid_shape
    return vox_util.voxel_centers_ref(device).reshape(Z, Y, X, 3).permute(0, 2, 1, 3).reshape(-1, 3)


def build_lift_matrix(
    featpix_T_ref: torch.Tensor, vox_util: Vox_util, feat_hw: Tuple[int, int]
) -> torch.Tensor:
    """Sparse CSR (B*Z*X*Y, B*S*Hf*Wf) matrix whose product with feature pixels is the lift.

    Rows are voxels in [b, z, x, y] order; columns are feature pixels in [b, s, h, w] order.
    """
    B, S = featpix_T_ref.shape[:2]
    Hf, Wf = feat_hw
    device = featpix_T_ref.device
    xyz = _voxel_centers_zxy(vox_util, device)
    V = xyz.shape[0]
    uv, visible = project_points(featpix_T_ref.float(), xyz, feat_hw)  # (B, S, V, 2), (B, S, V)

    # Visible pairs in (b, v, s) order, so the matrix rows come out sorted without a sort.
    visible_bvs = visible.permute(0, 2, 1)
    b_idx, v_idx, s_idx = visible_bvs.nonzero(as_tuple=True)  # (P,)
    cams_seeing = visible_bvs.sum(-1)  # (B, V)
    u = uv[b_idx, s_idx, v_idx, 0].clamp(0.0, Wf - 1.0)
    v = uv[b_idx, s_idx, v_idx, 1].clamp(0.0, Hf - 1.0)
    x0 = u.floor().clamp(max=Wf - 2)
    y0 = v.floor().clamp(max=Hf - 2)
    wx1, wy1 = u - x0, v - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    x0, y0 = x0.long(), y0.long()
    base = (b_idx * S + s_idx) * (Hf * Wf) + y0 * Wf + x0
    # (P, 4) corners: (y0,x0) (y0,x1) (y1,x0) (y1,x1)
    cols = torch.stack([base, base + 1, base + Wf, base + Wf + 1], dim=1)
    inv_count = 1.0 / cams_seeing[b_idx, v_idx].float()
    vals = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=1) * inv_count.unsqueeze(1)

    nnz_per_row = 4 * cams_seeing.reshape(-1)
    crow = torch.zeros(B * V + 1, dtype=torch.int64, device=device)
    torch.cumsum(nnz_per_row, 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta" on every call
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow,
            cols.reshape(-1),
            vals.reshape(-1),
            size=(B * V, B * S * Hf * Wf),
            device=device,
            check_invariants=False,
        )


class _SparseLift(torch.autograd.Function):
    """out = M @ pixels with backward M^T @ grad (M carries no gradient: it is geometry)."""

    @staticmethod
    def forward(ctx, lift_matrix, pixels):
        ctx.save_for_backward(lift_matrix)
        return lift_matrix @ pixels

    @staticmethod
    def backward(ctx, grad_out):
        (lift_matrix,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        # M^T of a CSR matrix is a CSC view of the same storage: no sort, no copy.
        transposed = lift_matrix.t()
        try:
            return None, transposed @ grad_out.contiguous()
        except (RuntimeError, NotImplementedError):  # backends without CSC x dense
            return None, transposed.to_sparse_csr() @ grad_out.contiguous()


def lift_features(feats: torch.Tensor, featpix_T_ref: torch.Tensor, vox_util: Vox_util) -> torch.Tensor:
    """Fast lift, same numbers as ``lift_reference``: (B, C, Z, Y, X), stored as (B, Z, X, Y, C).

    feats: (B, S, C, Hf, Wf) any float dtype; featpix_T_ref: (B, S, 4, 4). Output is fp32.
    """
    _check_feats(feats)
    B, S, C, Hf, Wf = feats.shape
    Z, Y, X = vox_util.grid_shape
    with torch.autocast(device_type=feats.device.type, enabled=False):
        lift_matrix = build_lift_matrix(featpix_T_ref, vox_util, (Hf, Wf))
        pixels = feats.float().permute(0, 1, 3, 4, 2).reshape(B * S * Hf * Wf, C)  # free if channels-last
        lifted = _SparseLift.apply(lift_matrix, pixels)  # (B*Z*X*Y, C)
    return lifted.reshape(B, Z, X, Y, C).permute(0, 4, 1, 3, 2)


def fold_y_into_channels(vox: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, Y, X) -> (B, Y*C, Z, X) with channel index y*C + c (a view for lift_features' layout)."""
    B, C, Z, Y, X = vox.shape
    return vox.permute(0, 3, 1, 2, 4).reshape(B, Y * C, Z, X)
