"""Frames, rigid transforms and the voxel grid.

Conventions (README: "Frames and grid"):
- 4x4 transforms are named ``dst_T_src``: ``ref_T_cam @ p_cam = p_ref``.
- Intrinsics padded to 4x4 are ``pix_T_cam``.
- The reference frame is a camera frame: x right, y down, z forward.
- The voxel grid is indexed ``[z, y, x]``; memory ("mem") coordinates are continuous voxel
  indices whose integer values are voxel centres. A BEV image is ``(Z, X)``: row index grows
  with z (forward), column index grows with x (right). Viewers flip rows to draw forward up.

Everything here is batched torch in fp32; nothing loops over points or voxels.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

DEFAULT_BOUNDS = (-50.0, 50.0, -5.0, 5.0, -50.0, 50.0)  # XMIN, XMAX, YMIN, YMAX, ZMIN, ZMAX
DEFAULT_CENTROID = (0.0, 1.0, 0.0)
DEFAULT_GRID = (200, 8, 200)  # Z, Y, X


def rigid_inverse(a_T_b: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4x4 transforms (..., 4, 4) without a general matrix inverse."""
    r = a_T_b[..., :3, :3]
    t = a_T_b[..., :3, 3:]
    b_T_a = torch.zeros_like(a_T_b)
    r_inv = r.transpose(-1, -2)
    b_T_a[..., :3, :3] = r_inv
    b_T_a[..., :3, 3:] = -r_inv @ t
    b_T_a[..., 3, 3] = 1.0
    return b_T_a


def apply_4x4(dst_T_src: torch.Tensor, xyz_src: torch.Tensor) -> torch.Tensor:
    """Transform points (..., N, 3) by (..., 4, 4); leading dims broadcast."""
    r = dst_T_src[..., :3, :3]
    t = dst_T_src[..., :3, 3]
    return xyz_src @ r.transpose(-1, -2) + t.unsqueeze(-2)


def project_to_pixels(pix_T_cam: torch.Tensor, xyz_cam: torch.Tensor, eps: float = 1e-4):
    """Pinhole projection. Returns pixel xy (..., N, 2) and depth z (..., N).

    Depths below ``eps`` are clamped for the division only; callers mask them with ``z > eps``.
    """
    z = xyz_cam[..., 2]
    fx = pix_T_cam[..., 0, 0].unsqueeze(-1)
    fy = pix_T_cam[..., 1, 1].unsqueeze(-1)
    cx = pix_T_cam[..., 0, 2].unsqueeze(-1)
    cy = pix_T_cam[..., 1, 2].unsqueeze(-1)
    z_safe = z.clamp(min=eps)
    x = fx * xyz_cam[..., 0] / z_safe + cx
    y = fy * xyz_cam[..., 1] / z_safe + cy
    return torch.stack([x, y], dim=-1), z


def pad_intrinsics(K: torch.Tensor) -> torch.Tensor:
    """3x3 intrinsics (..., 3, 3) -> pix_T_cam (..., 4, 4)."""
    pix_T_cam = torch.zeros(K.shape[:-2] + (4, 4), dtype=K.dtype, device=K.device)
    pix_T_cam[..., :3, :3] = K
    pix_T_cam[..., 3, 3] = 1.0
    return pix_T_cam


def scale_intrinsics(pix_T_cam: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Intrinsics after resizing the image by (sx, sy), pixel centres kept exact.

    With pixel centres at integer coordinates, a resize maps u -> sx * (u + 0.5) - 0.5.
    """
    out = pix_T_cam.clone()
    out[..., 0, 0] = pix_T_cam[..., 0, 0] * sx
    out[..., 1, 1] = pix_T_cam[..., 1, 1] * sy
    out[..., 0, 2] = (pix_T_cam[..., 0, 2] + 0.5) * sx - 0.5
    out[..., 1, 2] = (pix_T_cam[..., 1, 2] + 0.5) * sy - 0.5
    return out


class Vox_util:  # noqa: N801  (Simple-BEV's name, kept so its users find it)
    """Maps between reference-frame metres and the Z x Y x X voxel grid.

    ``bounds`` = (XMIN, XMAX, YMIN, YMAX, ZMIN, ZMAX) in metres, shifted by ``scene_centroid``.
    """

    def __init__(
        self,
        Z: int = DEFAULT_GRID[0],
        Y: int = DEFAULT_GRID[1],
        X: int = DEFAULT_GRID[2],
        scene_centroid: Sequence[float] = DEFAULT_CENTROID,
        bounds: Sequence[float] = DEFAULT_BOUNDS,
    ):
        self.Z, self.Y, self.X = int(Z), int(Y), int(X)
        cx, cy, cz = (float(v) for v in scene_centroid)
        xmin, xmax, ymin, ymax, zmin, zmax = (float(v) for v in bounds)
        self.xmin, self.xmax = xmin + cx, xmax + cx
        self.ymin, self.ymax = ymin + cy, ymax + cy
        self.zmin, self.zmax = zmin + cz, zmax + cz
        self.vox_size_x = (self.xmax - self.xmin) / self.X
        self.vox_size_y = (self.ymax - self.ymin) / self.Y
        self.vox_size_z = (self.zmax - self.zmin) / self.Z

    @property
    def grid_shape(self) -> Tuple[int, int, int]:
        return self.Z, self.Y, self.X

    # -- transforms ---------------------------------------------------------------------------
    def get_mem_T_ref(self, B: int = 1, device=None) -> torch.Tensor:
        """(B, 4, 4): metres -> continuous voxel index (voxel centres at integers)."""
        m = torch.eye(4, dtype=torch.float32, device=device)
        m[0, 0] = 1.0 / self.vox_size_x
        m[1, 1] = 1.0 / self.vox_size_y
        m[2, 2] = 1.0 / self.vox_size_z
        m[0, 3] = -self.xmin / self.vox_size_x - 0.5
        m[1, 3] = -self.ymin / self.vox_size_y - 0.5
        m[2, 3] = -self.zmin / self.vox_size_z - 0.5
        return m.expand(B, 4, 4).clone()

    def get_ref_T_mem(self, B: int = 1, device=None) -> torch.Tensor:
        return torch.linalg.inv(self.get_mem_T_ref(B, device))

    def Ref2Mem(self, xyz_ref: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """(B, N, 3) metres -> (B, N, 3) mem coords (x, y, z order kept)."""
        m = self.get_mem_T_ref(1, xyz_ref.device)[0]
        return apply_4x4(m, xyz_ref.float())

    def Mem2Ref(self, xyz_mem: torch.Tensor) -> torch.Tensor:  # noqa: N802
        m = self.get_ref_T_mem(1, xyz_mem.device)[0]
        return apply_4x4(m, xyz_mem.float())

    # -- grids --------------------------------------------------------------------------------
    def voxel_centers_ref(self, device=None) -> torch.Tensor:
        """(Z*Y*X, 3) xyz metres of every voxel centre, flattened in [z, y, x] order."""
        zs = self.zmin + (torch.arange(self.Z, device=device, dtype=torch.float32) + 0.5) * self.vox_size_z
        ys = self.ymin + (torch.arange(self.Y, device=device, dtype=torch.float32) + 0.5) * self.vox_size_y
        xs = self.xmin + (torch.arange(self.X, device=device, dtype=torch.float32) + 0.5) * self.vox_size_x
        gz, gy, gx = torch.meshgrid(zs, ys, xs, indexing="ij")
        return torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3)

    def bev_centers_ref(self, device=None) -> torch.Tensor:
        """(Z, X, 2) ground-plane (x, z) metres of every BEV cell centre."""
        zs = self.zmin + (torch.arange(self.Z, device=device, dtype=torch.float32) + 0.5) * self.vox_size_z
        xs = self.xmin + (torch.arange(self.X, device=device, dtype=torch.float32) + 0.5) * self.vox_size_x
        gz, gx = torch.meshgrid(zs, xs, indexing="ij")
        return torch.stack([gx, gz], dim=-1)

    # -- voxelisation -------------------------------------------------------------------------
    def _flat_voxel_index(self, xyz_ref: torch.Tensor, valid: torch.Tensor | None):
        """Flat [z, y, x] index of each point's voxel and a mask of points inside the grid."""
        mem = torch.round(self.Ref2Mem(xyz_ref)).long()  # (B, N, 3)
        x, y, z = mem[..., 0], mem[..., 1], mem[..., 2]
        inside = (x >= 0) & (x < self.X) & (y >= 0) & (y < self.Y) & (z >= 0) & (z < self.Z)
        if valid is not None:
            inside = inside & valid.bool()
        flat = (z * self.Y + y) * self.X + x
        return torch.where(inside, flat, torch.zeros_like(flat)), inside

    def voxelize_xyz(self, xyz_ref: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Occupancy (B, 1, Z, Y, X) of points (B, N, 3); ``valid`` (B, N) masks padding."""
        B = xyz_ref.shape[0]
        flat, inside = self._flat_voxel_index(xyz_ref, valid)
        occ = torch.zeros(B, self.Z * self.Y * self.X, device=xyz_ref.device)
        occ.scatter_add_(1, flat, inside.float())
        return (occ > 0).float().reshape(B, 1, self.Z, self.Y, self.X)

    def voxelize_features(
        self, xyz_ref: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean feature (B, C, Z, Y, X) of points (B, N, 3) with features (B, N, C)."""
        B, N, C = feats.shape
        flat, inside = self._flat_voxel_index(xyz_ref, valid)
        w = inside.float()
        V = self.Z * self.Y * self.X
        sums = torch.zeros(B, V, C, device=feats.device, dtype=torch.float32)
        sums.scatter_add_(1, flat.unsqueeze(-1).expand(B, N, C), feats.float() * w.unsqueeze(-1))
        counts = torch.zeros(B, V, device=feats.device)
        counts.scatter_add_(1, flat, w)
        mean = sums / counts.clamp(min=1).unsqueeze(-1)
        return mean.permute(0, 2, 1).reshape(B, C, self.Z, self.Y, self.X)

    # -- Simple-BEV's voxelisation (radar_features='simplebev') ----------------------------------
    def _simplebev_voxel_index(self, xyz_ref: torch.Tensor, valid: torch.Tensor | None):
        """Simple-BEV's vox.get_occupancy rule: a point counts when its mem coords are inside
        (-0.5, size - 0.5) on every axis, its mem z is not exactly 0 and it is at least 0.1 (mem
        units) from the reference origin; its voxel is the rounded mem coords (half to even, as
        torch.round). Returns the flat [z, y, x] index (0 for points that do not count) and the mask."""
        mem = self.Ref2Mem(xyz_ref)  # (B, N, 3)
        x, y, z = mem[..., 0], mem[..., 1], mem[..., 2]
        keep = (x > -0.5) & (x < self.X - 0.5) & (y > -0.5) & (y < self.Y - 0.5)
        keep = keep & (z > -0.5) & (z < self.Z - 0.5) & (z != 0.0)
        origin = self.Ref2Mem(torch.zeros(1, 1, 3, device=xyz_ref.device))
        keep = keep & (torch.linalg.norm(mem - origin, dim=-1) >= 0.1)
        if valid is not None:
            keep = keep & valid.bool()
        idx = torch.round(mem).long()
        flat = (idx[..., 2] * self.Y + idx[..., 1]) * self.X + idx[..., 0]
        return torch.where(keep, flat, torch.zeros_like(flat)), keep

    def voxelize_xyz_simplebev(
        self, xyz_ref: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Occupancy (B, 1, Z, Y, X) by Simple-BEV's rule (see _simplebev_voxel_index); like Simple-BEV
        it clears voxel [0, 0, 0], where its rule sends the points that do not count."""
        B = xyz_ref.shape[0]
        flat, keep = self._simplebev_voxel_index(xyz_ref, valid)
        occ = torch.zeros(B, self.Z * self.Y * self.X, device=xyz_ref.device)
        occ.scatter_add_(1, flat, keep.float())
        occ = (occ > 0).float()
        occ[:, 0] = 0.0
        return occ.reshape(B, 1, self.Z, self.Y, self.X)

    def voxelize_features_simplebev(
        self, xyz_ref: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features (B, C, Z, Y, X) by Simple-BEV's vox.get_feat_occupancy: each voxel holds the
        features of one of its points, no occupancy channel, voxel [0, 0, 0] cleared. Simple-BEV
        shuffled the points and let the scatter pick (random); here the last point in list order wins."""
        B, N, C = feats.shape
        flat, keep = self._simplebev_voxel_index(xyz_ref, valid)
        V = self.Z * self.Y * self.X
        order = torch.arange(1, N + 1, device=feats.device).expand(B, N) * keep  # 0 = does not count
        winner = torch.zeros(B, V, dtype=torch.long, device=feats.device)
        winner.scatter_reduce_(1, flat, order, reduce="amax")  # (B, V) 1-based index of the last point
        has = winner > 0
        picked = torch.gather(feats.float(), 1, (winner - 1).clamp(min=0).unsqueeze(-1).expand(B, V, C))
        out = picked * has.unsqueeze(-1)
        out[:, 0] = 0.0
        return out.permute(0, 2, 1).reshape(B, C, self.Z, self.Y, self.X)

