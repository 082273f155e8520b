"""BEV targets from annotated boxes: seg, valid, center, offset (DESIGN.md §4).

Grid: the BEV image is (Z, X); cell (row=iz, col=ix) has its centre at
x = xmin + (ix + 0.5) * dx, z = zmin + (iz + 0.5) * dz (``Vox_util`` conventions), i.e. the continuous
mem coordinate (ref -> mem) is integer at cell centres. A cell belongs to a footprint when its
centre lies inside the footprint polygon (filled polygon, exact at any sub-cell position; we do
not use cv2.fillPoly, which also paints every cell its edges touch, growing boxes by up to a cell).

Everything is vectorised per box over a small window around it; no per-pixel Python loops.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bevtrain.geometry import Vox_util

CENTER_SIGMA = 3.0  # cells


def quat_to_rotmat(q_wxyz: np.ndarray) -> np.ndarray:
    """(N,4) unit quaternions (w, x, y, z) -> (N,3,3) rotation matrices."""
    q = np.asarray(q_wxyz, dtype=np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    r = np.empty((len(q), 3, 3))
    r[:, 0, 0] = 1 - 2 * (y * y + z * z)
    r[:, 0, 1] = 2 * (x * y - z * w)
    r[:, 0, 2] = 2 * (x * z + y * w)
    r[:, 1, 0] = 2 * (x * y + z * w)
    r[:, 1, 1] = 1 - 2 * (x * x + z * z)
    r[:, 1, 2] = 2 * (y * z - x * w)
    r[:, 2, 0] = 2 * (x * z - y * w)
    r[:, 2, 1] = 2 * (y * z + x * w)
    r[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return r


def box_corners(center: np.ndarray, wlh: np.ndarray, rotation_wxyz: np.ndarray) -> np.ndarray:
    """(N,8,3) corners in the boxes' frame, in the devkit's ``Box.corners()`` order.

    Box axes: x forward (length), y left (width), z up (height). Corners 0-3 face forward,
    4-7 backward; the bottom face is corners [2, 3, 7, 6].
    """
    wlh = np.asarray(wlh, dtype=np.float64).reshape(-1, 3)
    w, l, h = wlh[:, 0:1], wlh[:, 1:2], wlh[:, 2:3]
    xs = l / 2 * np.array([1, 1, 1, 1, -1, -1, -1, -1])
    ys = w / 2 * np.array([1, -1, -1, 1, 1, -1, -1, 1])
    zs = h / 2 * np.array([1, 1, -1, -1, 1, 1, -1, -1])
    local = np.stack([xs, ys, zs], axis=-1)  # (N,8,3)
    rot = quat_to_rotmat(rotation_wxyz)
    return local @ rot.transpose(0, 2, 1) + np.asarray(center, dtype=np.float64).reshape(-1, 1, 3)


BOTTOM = [2, 3, 7, 6]


def class_mask(categories: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Boxes of the target classes: a category matches a class name exactly or as a dotted prefix
    ('vehicle' -> 'vehicle.car', 'vehicle.bus.rigid', ...; 'vehicle.car' -> 'vehicle.car')."""
    names = tuple(c.rstrip(".") for c in classes)
    prefixes = tuple(c + "." for c in names)
    return np.array([cat in names or cat.startswith(prefixes) for cat in categories], dtype=bool)


def _to_mem_xz(xz: np.ndarray, vox: Vox_util) -> np.ndarray:
    """(..., 2) ref-frame (x, z) metres -> continuous (col, row) cell coordinates."""
    col = (xz[..., 0] - vox.xmin) / vox.vox_size_x - 0.5
    row = (xz[..., 1] - vox.zmin) / vox.vox_size_z - 0.5
    return np.stack([col, row], axis=-1)


def bev_targets(
    corners_ref: np.ndarray,
    centers_ref: np.ndarray,
    visibility: np.ndarray,
    vox: Vox_util,
    sigma: float = CENTER_SIGMA,
):
    """Targets of boxes given in the reference frame.

    corners_ref (N,8,3) devkit corner order, centers_ref (N,3), visibility (N,) tokens 1-4.
    Returns seg, valid, center (1,Z,X) and offset (2,Z,X), float32.
    """
    Z, X = vox.Z, vox.X
    inst = np.zeros((Z, X), dtype=np.int32)  # instance id + 1 of the last box drawn per cell
    valid = np.ones((Z, X), dtype=np.uint8)
    center = np.zeros((Z, X), dtype=np.float32)
    offset = np.zeros((2, Z, X), dtype=np.float32)
    n = len(corners_ref)
    if n == 0:
        return (np.zeros((1, Z, X), np.float32), valid[None].astype(np.float32), center[None], offset)

    foot = _to_mem_xz(corners_ref[:, BOTTOM][..., [0, 2]], vox)  # (N,4,2) col,row
    ctr = _to_mem_xz(centers_ref[:, [0, 2]], vox)  # (N,2)
    lo = np.clip(np.ceil(foot.min(axis=1)), 0, None).astype(np.int64)  # (N,2) first col,row
    hi = np.minimum(np.floor(foot.max(axis=1)), [X - 1, Z - 1]).astype(np.int64)  # last col,row
    edges = np.roll(foot, -1, axis=1) - foot  # (N,4,2)
    for i in np.flatnonzero((hi >= lo).all(axis=1)):
        # Cell centres of the box's bounding window inside the convex footprint (all edge
        # cross products of one sign; centres exactly on an edge count as inside).
        cols = np.arange(lo[i, 0], hi[i, 0] + 1)
        rows = np.arange(lo[i, 1], hi[i, 1] + 1)
        dc = cols[None, None, :] - foot[i, :, 0, None, None]  # (4,1,w)
        dr = rows[None, :, None] - foot[i, :, 1, None, None]  # (4,h,1)
        cross = edges[i, :, 0, None, None] * dr - edges[i, :, 1, None, None] * dc  # (4,h,w)
        inside = (cross >= -1e-9).all(axis=0) | (cross <= 1e-9).all(axis=0)
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        inst[win][inside] = i + 1
        if visibility[i] == 1:
            valid[win][inside] = 0

    seg = (inst > 0).astype(np.float32)

    # Offsets: from each object cell to its object's centre, in cells (dx along cols, dz along rows).
    rows, cols = np.nonzero(inst)
    ids = inst[rows, cols] - 1
    offset[0, rows, cols] = ctr[ids, 0] - cols
    offset[1, rows, cols] = ctr[ids, 1] - rows

    # Gaussian centres: one (2r+1)^2 window per box, max over boxes.
    r = int(np.ceil(3 * sigma))
    win = np.arange(-r, r + 1)
    inv2s2 = 1.0 / (2 * sigma * sigma)
    for i in range(n):
        cc, cr = ctr[i]
        c0, r0 = int(np.floor(cc)), int(np.floor(cr))
        if c0 + r < 0 or c0 - r >= X or r0 + r < 0 or r0 - r >= Z:
            continue
        cs = c0 + win
        rs = r0 + win
        cs = cs[(cs >= 0) & (cs < X)]
        rs = rs[(rs >= 0) & (rs < Z)]
        g = np.exp(-((rs[:, None] - cr) ** 2 + (cs[None, :] - cc) ** 2) * inv2s2).astype(np.float32)
        sl = (slice(rs[0], rs[-1] + 1), slice(cs[0], cs[-1] + 1))
        np.maximum(center[sl], g, out=center[sl])

    return seg[None], valid[None].astype(np.float32), center[None], offset
