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
  transposed matrix (a free CSC view). Its output is laid out so that folding Y into channels
  for the BEV compressor needs no transposing copy, channels-last or contiguous as asked.

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


def _checked_voxel_centers(feats: torch.Tensor, vox_util: Vox_util) -> torch.Tensor:
    """The features checked, and the voxel centres (V, 3) in the reference frame, fp32 under any autocast."""
    _check_feats(feats)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        return vox_util.voxel_centers_ref(feats.device)  # (V, 3) in [z, y, x] order


def lift_reference(feats: torch.Tensor, featpix_T_ref: torch.Tensor, vox_util: Vox_util) -> torch.Tensor:
    """Straightforward lift with grid_sample over all (voxel, camera) pairs: (B, C, Z, Y, X)."""
    xyz = _checked_voxel_centers(feats, vox_util)
    B, S, C, Hf, Wf = feats.shape
    Z, Y, X = vox_util.grid_shape
    with torch.autocast(device_type=feats.device.type, enabled=False):
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


# Row orders of the lift matrix: which voxel axes vary slowest to fastest after the batch.
_ROW_ORDERS = {"channels_last": (0, 2, 1), "channels_first": (1, 0, 2)}  # (z, x, y) / (y, z, x)


def _voxel_centers(vox_util: Vox_util, order: Tuple[int, int, int], device) -> torch.Tensor:
    """(V, 3) voxel centres flattened with grid axes (z=0, y=1, x=2) permuted to ``order``."""
    Z, Y, X = vox_util.grid_shape
    grid = vox_util.voxel_centers_ref(device).reshape(Z, Y, X, 3)
    return grid.permute(*order, 3).reshape(-1, 3)


def build_lift_matrix(
    featpix_T_ref: torch.Tensor,
    vox_util: Vox_util,
    feat_hw: Tuple[int, int],
    layout: str = "channels_last",
) -> torch.Tensor:
    """Sparse CSR (B*V, B*S*Hf*Wf) matrix whose product with feature pixels is the lift.

    Rows are voxels in [b, z, x, y] order (layout 'channels_last') or [b, y, z, x]
    ('channels_first'); columns are feature pixels in [b, s, h, w] order.
    """
    B, S = featpix_T_ref.shape[:2]
    Hf, Wf = feat_hw
    device = featpix_T_ref.device
    xyz = _voxel_centers(vox_util, _ROW_ORDERS[layout], device)
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


def _csc_matmul(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Product with a CSC operand (the free transpose of a CSR matrix), converting if unsupported."""
    try:
        return lhs @ rhs
    except (RuntimeError, NotImplementedError):  # backends without CSC products
        return lhs.to_sparse_csr() @ rhs if lhs.layout == torch.sparse_csc else lhs @ rhs.to_sparse_csr()


class _LiftRows(torch.autograd.Function):
    """out (R, C) = M @ pixels (N, C); backward M^T @ grad. M is geometry and gets no gradient."""

    @staticmethod
    def forward(ctx, lift_matrix, pixels):
        ctx.save_for_backward(lift_matrix)
        return lift_matrix @ pixels

    @staticmethod
    def backward(ctx, grad_out):
        (lift_matrix,) = ctx.saved_tensors
        return None, _csc_matmul(lift_matrix.t(), grad_out.contiguous())


class _LiftColumns(torch.autograd.Function):
    """out (C, R) = pixels^T (C, N) @ M^T; backward grad @ M. Channels come out slowest."""

    @staticmethod
    def forward(ctx, lift_matrix, pixels_t):
        ctx.save_for_backward(lift_matrix)
        return _csc_matmul(pixels_t, lift_matrix.t())

    @staticmethod
    def backward(ctx, grad_out):
        (lift_matrix,) = ctx.saved_tensors
        try:
            return None, grad_out.contiguous() @ lift_matrix
        except (RuntimeError, NotImplementedError):  # backends without dense x CSR
            return None, _csc_matmul(lift_matrix.t(), grad_out.t().contiguous()).t()


def lift_features(
    feats: torch.Tensor, featpix_T_ref: torch.Tensor, vox_util: Vox_util, layout: str = "channels_last"
) -> torch.Tensor:
    """Fast lift, same numbers as ``lift_reference``: (B, C, Z, Y, X) fp32.

    feats: (B, S, C, Hf, Wf) any float dtype; featpix_T_ref: (B, S, 4, 4).
    ``layout`` picks the memory behind the returned view so that ``fold_y_into_channels`` is free:
    'channels_last' stores (B, Z, X, Y, C) (a channels-last BEV map), 'channels_first' stores
    (B, Y, C, Z, X) (a contiguous BEV map). Both fold to channel index y*C + c.
    """
    if layout not in _ROW_ORDERS:
        raise ValueError(f"layout={layout!r}; valid: {', '.join(_ROW_ORDERS)}")
    _check_feats(feats)
    B, S, C, Hf, Wf = feats.shape
    Z, Y, X = vox_util.grid_shape
    with torch.autocast(device_type=feats.device.type, enabled=False):
        lift_matrix = build_lift_matrix(featpix_T_ref, vox_util, (Hf, Wf), layout)
        if layout == "channels_last":
            pixels = feats.float().permute(0, 1, 3, 4, 2).reshape(B * S * Hf * Wf, C)  # free if NHWC
            lifted = _LiftRows.apply(lift_matrix, pixels)  # (B*Z*X*Y, C)
            return lifted.reshape(B, Z, X, Y, C).permute(0, 4, 1, 3, 2)
        pixels_t = feats.float().permute(2, 0, 1, 3, 4).reshape(C, B * S * Hf * Wf)  # small copy
        lifted_t = _LiftColumns.apply(lift_matrix, pixels_t)  # (C, B*Y*Z*X)
        # Moving whole (Z, X) planes is a cheap block copy, unlike a channels-last transpose.
        folded = lifted_t.reshape(C, B, Y, Z, X).permute(1, 2, 0, 3, 4).contiguous()  # (B, Y, C, Z, X)
        return folded.permute(0, 2, 3, 1, 4)


def fold_y_into_channels(vox: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, Y, X) -> (B, Y*C, Z, X) with channel index y*C + c (a view for lift_features' layouts)."""
    B, C, Z, Y, X = vox.shape
    return vox.permute(0, 3, 1, 2, 4).reshape(B, Y * C, Z, X)


# -- Simple-BEV's own lift (compat='simplebev') ------------------------------------------------------
SIMPLEBEV_EPS = 1e-6  # Simple-BEV's utils.basic.EPS: depth clamp and masked-mean denominator


def simplebev_feature_pix_T_ref(
    pix_T_cams: torch.Tensor, cams_T_ref: torch.Tensor, image_hw: Tuple[int, int], feat_hw: Tuple[int, int]
) -> torch.Tensor:
    """(B, S, 4, 4) reference -> feature pixels with Simple-BEV's intrinsics scaling.

    Simple-BEV scales the principal point as ``cx * sx`` (``utils.geom.scale_intrinsics``), not
    ``(cx + 0.5) * sx - 0.5``: its feature maps sit ``0.5 * (1 - sx)`` pixels off the image.
    Its released weights learned with that offset, so compat mode keeps it.
    """
    H, W = image_hw
    Hf, Wf = feat_hw
    sx, sy = Wf / float(W), Hf / float(H)
    featpix_T_cams = pix_T_cams.float().clone()
    featpix_T_cams[..., 0, 0] *= sx
    featpix_T_cams[..., 0, 2] *= sx
    featpix_T_cams[..., 1, 1] *= sy
    featpix_T_cams[..., 1, 2] *= sy
    return featpix_T_cams @ cams_T_ref.float()


def lift_simplebev(feats: torch.Tensor, featpix_T_ref: torch.Tensor, vox_util: Vox_util) -> torch.Tensor:
    """Simple-BEV's ``unproject_image_to_mem`` + masked camera mean, reproduced: (B, C, Z, Y, X) fp32.

    Where it departs from ``lift_reference`` (on purpose, to match Simple-BEV's weights):
    - pixel coordinates are normalised by ``W - 1`` / ``H - 1`` but sampled with
      ``align_corners=False``, so a voxel projecting to pixel u reads the feature map at
      ``u * W / (W - 1) - 0.5`` (a stretch of up to one feature pixel at the far edge);
    - outside the feature map ``grid_sample`` reads zeros (``padding_mode='zeros'``); normalised
      coordinates are clamped to [-2, 2] first, depths to >= 1e-6;
    - a voxel counts as seen by a camera when its projection lies strictly inside
      (-0.5, W - 0.5) x (-0.5, H - 0.5) with depth > 0;
    - the camera average is per channel over the cameras whose sample is non-zero
      (``|feat| > 0``), divided by ``count + 1e-6``.
    One camera at a time, so memory is B*C*Z*Y*X per camera rather than per rig.
    """
    xyz = _checked_voxel_centers(feats, vox_util)
    B, S, C, Hf, Wf = feats.shape
    Z, Y, X = vox_util.grid_shape
    device = feats.device
    with torch.autocast(device_type=device.type, enabled=False):
        featpix_T_ref = featpix_T_ref.float()
        rot, trans = featpix_T_ref[..., :3, :3], featpix_T_ref[..., :3, 3]
        pix = torch.einsum("bsij,nj->bsni", rot, xyz) + trans.unsqueeze(-2)  # (B, S, V, 3)
        depth = pix[..., 2]  # (B, S, V): the camera's z (third row of pix_T_cam is (0, 0, 1, 0))
        uv = pix[..., :2] / depth.clamp(min=SIMPLEBEV_EPS).unsqueeze(-1)
        u, v = uv[..., 0], uv[..., 1]
        seen = (u > -0.5) & (u < Wf - 0.5) & (v > -0.5) & (v < Hf - 0.5) & (depth > 0.0)
        grid = torch.stack(
            [(2.0 * u / (Wf - 1) - 1.0).clamp(-2.0, 2.0), (2.0 * v / (Hf - 1) - 1.0).clamp(-2.0, 2.0)], -1
        )  # (B, S, V, 2)
        out = []
        for b in range(B):
            total = torch.zeros(Z * Y * X, C, device=device)  # voxel-major: index_add over whole rows
            count = torch.zeros(Z * Y * X, C, device=device)
            for s in range(S):
                # Only the voxels this camera sees: Simple-BEV zeroes the rest, adding nothing.
                idx = seen[b, s].nonzero().squeeze(1)  # (n,)
                sampled = F.grid_sample(
                    feats[b, s].float().unsqueeze(0), grid[b, s, idx].reshape(1, 1, -1, 2), mode="bilinear",
                    padding_mode="zeros", align_corners=False,
                ).reshape(C, -1).t()  # (n, C)
                total.index_add_(0, idx, sampled)
                count.index_add_(0, idx, (sampled.abs() > 0).float())
            out.append((total / (count + SIMPLEBEV_EPS)).t().reshape(C, Z, Y, X))
        return torch.stack(out)
