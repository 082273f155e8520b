"""BEV targets from annotated boxes: seg, valid, center, offset (README: "Targets").

Grid: the BEV image is (Z, X); cell (row=iz, col=ix) has its centre at
x = xmin + (ix + 0.5) * dx, z = zmin + (iz + 0.5) * dz (``Vox_util`` conventions), i.e. the continuous
mem coordinate (ref -> mem) is integer at cell centres.

Two rasterisers (the ``target_raster`` flag, DESIGN.md §4):

- ``exact`` (``bev_targets``): a cell belongs to a footprint when its centre lies inside the
  footprint polygon; Gaussian centres at the continuous box centre; offsets from each object cell
  to that centre, in cells.
- ``simplebev`` (``simplebev_targets``): Simple-BEV's ``get_seg_bev`` / ``get_center_and_offset_bev``
  rule, reproduced to the cell: boxes enter the reference camera frame through the LIDAR_TOP
  keyframe's ego pose and the camera's extrinsics, in float32 with the same operation shapes;
  the 4 corners with the smallest camera y (the top face) go to mem coordinates, are truncated
  (``astype(int32)``) and filled with ``cv2.fillPoly``, which paints every cell an edge touches
  (footprints grow by up to a cell, mostly towards +x/+z). Centres: Gaussian (sigma 3 cells) around
  the *rounded* mem centre, zeroed below 0.001; offsets: ``2 * (cell - rounded centre)`` on the
  object's cells (Simple-BEV sums min and max over a Y axis of size one, doubling the vector).

Everything is vectorised per box over a small window around it; no per-pixel Python loops.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from bevtrain.classes import MAP_LINE_LAYERS
from bevtrain.geometry import Vox_util

CENTER_SIGMA = 3.0  # cells
TARGET_RASTERS = ("simplebev", "exact")


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


# -- Simple-BEV's rasteriser ---------------------------------------------------------------------------
# Simple-BEV zeroes Gaussian values below this; exp(-d2 / (2 sigma^2)) >= it only within this many cells.
_SB_CENTER_FLOOR = 0.001


def _sb_apply_4x4(dst_T_src: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """(B,4,4) x (B,N,3) -> (B,N,3) as one homogeneous batched matmul, Simple-BEV's float32 rounding."""
    xyz1 = torch.cat([xyz, torch.ones_like(xyz[..., :1])], dim=2)  # (B,N,4)
    return torch.matmul(dst_T_src, xyz1.transpose(1, 2)).transpose(1, 2)[..., :3]


def _sb_mem_T_ref(vox: Vox_util) -> torch.Tensor:
    """(1,4,4) float32 mem_T_ref built as Simple-BEV builds it: scale @ shift-to-first-voxel-centre."""
    shift = torch.eye(4).unsqueeze(0)
    scale = torch.eye(4).unsqueeze(0)
    for axis, (lo, size) in enumerate(
        ((vox.xmin, vox.vox_size_x), (vox.ymin, vox.vox_size_y), (vox.zmin, vox.vox_size_z))
    ):
        shift[0, axis, 3] = -lo - size / 2.0
        scale[0, axis, axis] = 1.0 / size
    return torch.matmul(scale, shift)


def _sb_box_lengths_and_poses(center_g, wlh, rotation_wxyz, global_T_ego):
    """Boxes in the ego frame: lengths (N,3) float32 (l, w, h) and ego_T_box (N,4,4) float32."""
    ego_R_global = global_T_ego[:3, :3].T
    rot = ego_R_global @ quat_to_rotmat(rotation_wxyz)  # (N,3,3) float64
    ctr = (np.asarray(center_g, np.float64).reshape(-1, 3) - global_T_ego[:3, 3]) @ ego_R_global.T
    ego_T_box = np.zeros((len(rot), 4, 4), np.float64)
    ego_T_box[:, :3, :3] = rot
    ego_T_box[:, :3, 3] = ctr
    ego_T_box[:, 3, 3] = 1.0
    wlh = np.asarray(wlh, np.float64).reshape(-1, 3)
    lengths = wlh[:, [1, 0, 2]]  # Simple-BEV's lrt lengths: (length, width, height)
    return torch.from_numpy(lengths).float(), torch.from_numpy(ego_T_box).float()


def _sb_box_corners(lengths: torch.Tensor) -> torch.Tensor:
    """(N,8,3) corners in the box frame, in Simple-BEV's order (x: length, y: width, z: height)."""
    lx, ly, lz = lengths.unbind(dim=1)
    sx = torch.tensor([1, 1, -1, -1, 1, 1, -1, -1], dtype=torch.float32)
    sy = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1], dtype=torch.float32)
    sz = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1], dtype=torch.float32)
    half = lambda v: v[:, None] / 2.0  # noqa: E731
    return torch.stack([half(lx) * sx, half(ly) * sy, half(lz) * sz], dim=2)


def simplebev_targets(
    center_g: np.ndarray,
    wlh: np.ndarray,
    rotation_wxyz: np.ndarray,
    visibility: np.ndarray,
    global_T_ego: np.ndarray,
    ego_T_ref: np.ndarray,
    vox: Vox_util,
    sigma: float = CENTER_SIGMA,
):
    """Simple-BEV's targets of boxes given in the global frame (see the module docstring).

    center_g (N,3), wlh (N,3), rotation_wxyz (N,4): the boxes as annotated (global frame), in
    annotation order (later boxes own the cells they share with earlier ones); visibility (N,)
    tokens 1-4; global_T_ego (4,4): the LIDAR_TOP keyframe's ego pose; ego_T_ref (4,4): the
    reference camera's extrinsics. The maps are in the frame ``inv(ego_T_ref)`` at that ego pose.
    Returns seg, valid, center (1,Z,X) and offset (2,Z,X), float32.
    """
    Z, X = vox.Z, vox.X
    seg = np.zeros((Z, X))  # float64 canvas holding box id + 1, as Simple-BEV's
    valid = np.ones((Z, X))
    center = np.zeros((Z, X), np.float32)
    offset = np.zeros((2, Z, X), np.float32)
    n = len(center_g)
    if n == 0:
        return seg[None].astype(np.float32), valid[None].astype(np.float32), center[None], offset

    lengths, ego_T_box = _sb_box_lengths_and_poses(center_g, wlh, rotation_wxyz, global_T_ego)
    # ref_T_ego from the extrinsics alone, inverted as a rigid transform in float32.
    ref_T_ego = torch.eye(4).unsqueeze(0)
    ego_R_ref = torch.from_numpy(np.asarray(ego_T_ref, np.float64)[:3, :3]).float().unsqueeze(0)
    ego_t_ref = torch.from_numpy(np.asarray(ego_T_ref, np.float64)[:3, 3]).float().view(1, 3, 1)
    ref_T_ego[:, :3, :3] = ego_R_ref.transpose(1, 2)
    ref_T_ego[:, :3, 3:4] = -torch.matmul(ego_R_ref.transpose(1, 2), ego_t_ref)
    ref_T_box = torch.matmul(ref_T_ego.repeat(n, 1, 1), ego_T_box)  # (N,4,4)

    corners_ref = _sb_apply_4x4(ref_T_box, _sb_box_corners(lengths))  # (N,8,3)
    mem_T_ref = _sb_mem_T_ref(vox)
    corners_mem = _sb_apply_4x4(mem_T_ref, corners_ref.reshape(1, n * 8, 3)).reshape(n, 8, 3)
    # The top face: the 4 corners highest above the road (camera y points down).
    top = torch.topk(corners_ref[:, :, 1], 4, dim=1, largest=False).indices  # (N,4)
    top_xz = torch.gather(corners_mem[:, :, [0, 2]], 1, top[:, :, None].expand(n, 4, 2))
    # Truncated to int (as astype(int32)) and drawn in Simple-BEV's vertex order: (N,4,2) col,row.
    polys = np.ascontiguousarray(top_xz.numpy().astype(np.int32)[:, [0, 1, 3, 2]])
    for i in range(n):
        cv2.fillPoly(seg, [polys[i]], i + 1.0)
        if visibility[i] == 1:
            cv2.fillPoly(valid, [polys[i]], 0.0)

    # Centres: the box origin through the same transforms, then rounded to a cell.
    centers_mem = _sb_apply_4x4(mem_T_ref, ref_T_box[:, :3, 3].reshape(1, n, 3))[0]  # (N,3)
    ctr = torch.round(centers_mem[:, [0, 2]]).numpy().astype(np.int64)  # (N,2) col,row
    inst = seg.astype(np.int64)  # box id + 1 owning each cell, 0 = none
    rows, cols = np.nonzero(inst)
    ids = inst[rows, cols] - 1
    offset[0, rows, cols] = 2.0 * (cols - ctr[ids, 0])
    offset[1, rows, cols] = 2.0 * (rows - ctr[ids, 1])

    # Gaussians on integer distances, in float32 as Simple-BEV (exp(-d2 / (2 sigma^2))); beyond r
    # cells every value is below the floor, hence 0, so a window around each centre suffices.
    two_s2 = 2.0 * sigma * sigma
    r = int(np.floor(np.sqrt(-np.log(_SB_CENTER_FLOOR) * two_s2)))
    win = np.arange(-r, r + 1)
    for c0, r0 in ctr:
        cs, rs = c0 + win, r0 + win
        cs, rs = cs[(cs >= 0) & (cs < X)], rs[(rs >= 0) & (rs < Z)]
        if len(cs) == 0 or len(rs) == 0:
            continue
        d2 = torch.from_numpy(((rs[:, None] - r0) ** 2 + (cs[None, :] - c0) ** 2).astype(np.float32))
        g = torch.exp(-d2 / two_s2).numpy()
        g[g < np.float32(_SB_CENTER_FLOOR)] = 0.0
        sl = (slice(rs[0], rs[-1] + 1), slice(cs[0], cs[-1] + 1))
        np.maximum(center[sl], g, out=center[sl])

    seg = (seg > 0).astype(np.float32)
    return seg[None], valid[None].astype(np.float32), center[None], offset


def rasterise(
    raster: str,
    boxes: dict,
    keep: np.ndarray,
    ref_T_global: np.ndarray,
    global_T_ego_lidar: np.ndarray,
    ego_T_refcam: np.ndarray,
    vox: Vox_util,
):
    """seg, valid, center, offset of a record's boxes (``keep`` selects them) under ``raster``.

    ``exact`` rasterises in ``ref_T_global``'s frame; ``simplebev`` in the reference camera's frame
    at the LIDAR_TOP keyframe ego pose (the caller's ref frame must be that one for consistency).
    """
    if raster not in TARGET_RASTERS:
        raise ValueError(f"target_raster must be one of {list(TARGET_RASTERS)}, got {raster!r}")
    center_g, wlh, rot = boxes["center"][keep], boxes["wlh"][keep], boxes["rotation"][keep]
    vis = boxes["visibility"][keep]
    if raster == "simplebev":
        return simplebev_targets(center_g, wlh, rot, vis, global_T_ego_lidar, ego_T_refcam, vox)
    corners = box_corners(center_g, wlh, rot) @ ref_T_global[:3, :3].T + ref_T_global[:3, 3]
    centers = center_g @ ref_T_global[:3, :3].T + ref_T_global[:3, 3]
    return bev_targets(corners, centers, vis, vox)


# -- map layers ---------------------------------------------------------------------------------------
# Map-expansion layers are drawn cell for cell as the devkit's NuScenesMap.get_map_mask draws them (the
# ground truth of BEVFusion's map segmentation) on the patch whose pixel centres are our cell centres: its
# canvas has rows to the left and columns forward (continuous u = our row, v = X - 1 - our column). Every
# shape is clipped to the patch (0 <= u <= Z, 0 <= v <= X). Polygons then get their vertices rounded and
# are filled with cv2.fillPoly (exterior, then holes cleared, polygons in layer order); lines get their
# vertices truncated and are drawn with cv2.polylines MAP_LINE_THICKNESS cells thick (a band about three
# cells, 1.5 m, across on the default 0.5 m grid). Where a line leaves the patch through its far sides
# (u = Z or v = X) the devkit's own float rounding puts that end at Z or just below (truncated to Z - 1),
# so the last cells of such a line may sit a cell off the devkit's.
MAP_LINE_THICKNESS = 2  # cells (cv2 thickness), the devkit's


def _window_in_global(global_T_ref: np.ndarray, vox: Vox_util, margin: float) -> np.ndarray:
    """(x0, y0, x1, y1): the global ground-plane box around the grid's ground rectangle, grown by margin m."""
    xs, zs = (vox.xmin, vox.xmax), (vox.zmin, vox.zmax)
    corners = np.array([[x, 0.0, z] for x in xs for z in zs])  # (4,3) ref frame
    g = corners @ global_T_ref[:3, :3].T + global_T_ref[:3, 3]
    return np.array([*(g[:, :2].min(axis=0) - margin), *(g[:, :2].max(axis=0) + margin)])


def _ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start[i], end[i]) over i, without a Python loop."""
    lens = end - start
    if lens.sum() == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(start - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return first + np.arange(lens.sum())


def _clipped_polygons(uv: np.ndarray, ring_len: np.ndarray, shape_rings: np.ndarray, hi: tuple) -> list:
    """Per shape, (exteriors, holes) as rounded int32 (n,2) rings, or None: the shapes (``shape_rings``
    rings each, exterior first; ring r has ``ring_len[r]`` vertices, consecutive in ``uv``) clipped to
    [0, hi[0]] x [0, hi[1]] as the devkit clips them (shapely's intersection, which may leave several parts
    or none). Shapes inside the window are kept as they are; the others are clipped in vectorised shapely
    calls (no Python work per vertex or per shapely object)."""
    import shapely

    ring_start = np.concatenate([[0], np.cumsum(ring_len)])
    shape_first = np.concatenate([[0], np.cumsum(shape_rings)])
    ext = shape_first[:-1]  # each shape's exterior ring
    lo = np.minimum.reduceat(uv, ring_start[:-1], axis=0)[ext]
    top = np.maximum.reduceat(uv, ring_start[:-1], axis=0)[ext]
    inside = (lo >= 0).all(axis=1) & (top[:, 0] <= hi[0]) & (top[:, 1] <= hi[1])
    rounded = np.round(uv).astype(np.int32)
    rings = [rounded[a:b] for a, b in zip(ring_start[:-1].tolist(), ring_start[1:].tolist())]
    out = [None] * len(shape_rings)  # shapes left out (clipped away, degenerate) stay None
    for k in np.flatnonzero(inside):
        out[k] = (rings[ext[k]: ext[k] + 1], rings[ext[k] + 1: shape_first[k + 1]])
    apart = (lo[:, 0] > hi[0]) | (lo[:, 1] > hi[1]) | (top < 0).any(axis=1)  # nothing of it in the window
    cross = np.flatnonzero(~inside & ~apart & (ring_len[ext] >= 3))
    if len(cross) == 0:
        return out
    cross_rings = _ranges(shape_first[cross], shape_first[cross + 1])
    cross_rings = cross_rings[ring_len[cross_rings] >= 3]  # (a hole of under 3 vertices is no hole)
    n = ring_len[cross_rings]
    coords = uv[_ranges(ring_start[cross_rings], ring_start[cross_rings + 1])]
    linear = shapely.linearrings(coords, indices=np.repeat(np.arange(len(cross_rings)), n))
    owner = np.searchsorted(shape_first, cross_rings, side="right") - 1  # shape of each ring
    polys = shapely.polygons(linear, indices=np.searchsorted(cross, owner))
    clipped = shapely.clip_by_rect(polys, 0.0, 0.0, hi[0], hi[1])
    parts, part_shape = shapely.get_parts(clipped, return_index=True)
    found, ring_part = shapely.get_rings(parts, return_index=True)  # polygon parts only, exterior first
    if len(found) == 0:
        return out
    xy, ring_of = shapely.get_coordinates(found, return_index=True)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(ring_of)) + 1, [len(xy)]]).tolist()
    xy = np.round(xy).astype(np.int32)
    clipped_rings = [xy[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    is_exterior = np.concatenate([[True], ring_part[1:] != ring_part[:-1]])
    for ring, part, exterior in zip(clipped_rings, ring_part, is_exterior):
        k = cross[part_shape[part]]
        if out[k] is None:
            out[k] = ([], [])
        out[k][0 if exterior else 1].append(ring)
    return out


def _clip_segments(p: np.ndarray, q: np.ndarray, hi: tuple) -> tuple:
    """(k,2,2) pieces of the segments p[i] -> q[i] ((n,2) each) inside [0, hi[0]] x [0, hi[1]] (Liang-Barsky,
    every segment and side at once), points clipped onto a side exactly on it; and the (k,) indices of the
    segments kept."""
    d = q - p
    # per side, inside where f + t * r >= 0 (u >= 0, u <= hi[0], v >= 0, v <= hi[1])
    f = np.stack([p[:, 0], hi[0] - p[:, 0], p[:, 1], hi[1] - p[:, 1]], axis=1)  # (n,4)
    r = np.stack([d[:, 0], -d[:, 0], d[:, 1], -d[:, 1]], axis=1)  # (n,4)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -f / r  # where the segment's line crosses each side
    t0 = np.where(r > 0, t, 0.0).max(axis=1, initial=0.0)  # entering across a side
    t1 = np.where(r < 0, t, 1.0).min(axis=1, initial=1.0)  # leaving across one
    ok = (t0 <= t1) & ~((r == 0) & (f < 0)).any(axis=1)  # (parallel to a side and outside it: none)
    pieces = np.stack([p[ok] + t0[ok, None] * d[ok], p[ok] + t1[ok, None] * d[ok]], axis=1)  # (k,2,2)
    bound = np.array(hi)
    pieces = np.where(np.abs(pieces) < 1e-6, 0.0, pieces)
    pieces = np.where(np.abs(pieces - bound) < 1e-6, bound, pieces)
    return pieces, np.flatnonzero(ok)


def merge_map_layers(layers: dict, names: Sequence[str]) -> dict:
    """The shapes of the layers ``names`` (``index.build_map_geometry``'s packs) as one pack, in that order,
    each shape tagged with its layer's position in ``names`` (``shape_layer``) and whether it is a line
    layer (``line``, per layer), so that ``map_output_masks`` draws them all in one pass."""
    packs = [layers[n] for n in names]
    n_rings = np.cumsum([0] + [len(p["ring_start"]) - 1 for p in packs])
    n_xy = np.cumsum([0] + [len(p["xy"]) for p in packs])
    return {
        "names": tuple(names),
        "line": np.array([n in MAP_LINE_LAYERS for n in names], bool),
        "xy": np.concatenate([p["xy"] for p in packs]).reshape(-1, 2),
        "ring_start": np.concatenate([[0]] + [p["ring_start"][1:] + o for p, o in zip(packs, n_xy)]),
        "shape_start": np.concatenate([[0]] + [p["shape_start"][1:] + o for p, o in zip(packs, n_rings)]),
        "bbox": np.concatenate([p["bbox"] for p in packs]).reshape(-1, 4),
        "shape_layer": np.concatenate([np.full(len(p["bbox"]), k, np.int64) for k, p in enumerate(packs)]),
    }


def map_layer_mask(layer: dict, ref_T_global: np.ndarray, vox: Vox_util, line: bool) -> np.ndarray:
    """(Z,X) uint8 mask of one map layer (``index.build_map_geometry``'s packed shapes, global metres) in
    the frame ``ref_T_global`` (map points at global z = 0), cells as the module's map-layer rule says."""
    merged = merge_map_layers({"layer": layer}, ["layer"])
    merged["line"][0] = line
    return map_output_masks(merged, [["layer"]], ref_T_global, vox)[0]


def map_output_masks(merged: dict, sources: Sequence[Sequence[str]], ref_T_global: np.ndarray, vox: Vox_util,
                     out: np.ndarray | None = None) -> np.ndarray:
    """(K,Z,X) uint8: per map output k, the union of its layers ``sources[k]`` (names in ``merged``,
    ``merge_map_layers``'), each layer drawn once, in the frame ``ref_T_global``; written into ``out``
    (a (K,Z,X) uint8 array with contiguous channels) when given."""
    canvases = _draw_layers(merged, ref_T_global, vox)  # (L,X,Z)
    position = {n: k for k, n in enumerate(merged["names"])}
    if out is None:
        out = np.empty((len(sources), vox.Z, vox.X), np.uint8)
    for k, names in enumerate(sources):
        canvas = canvases[position[names[0]]]
        for name in names[1:]:
            canvas = canvas | canvases[position[name]]
        # our (row, col) is the canvas' (X - 1 - col, row): a quarter turn clockwise
        cv2.rotate(canvas, cv2.ROTATE_90_CLOCKWISE, dst=out[k])
    return out


def _draw_layers(merged: dict, ref_T_global: np.ndarray, vox: Vox_util) -> np.ndarray:
    """(L,X,Z) uint8: each layer of ``merged`` on the devkit's canvas, rows v (left), columns u (forward),
    every shape near the grid transformed and clipped in one pass (polygons, then lines)."""
    canvas = np.zeros((len(merged["names"]), vox.X, vox.Z), np.uint8)
    global_T_ref = np.eye(4)
    global_T_ref[:3, :3] = ref_T_global[:3, :3].T
    global_T_ref[:3, 3] = -ref_T_global[:3, :3].T @ ref_T_global[:3, 3]
    cell = max(vox.vox_size_x, vox.vox_size_z)
    x0, y0, x1, y1 = _window_in_global(global_T_ref, vox, margin=2 * cell)
    bbox = merged["bbox"]
    near = (bbox[:, 0] <= x1) & (bbox[:, 2] >= x0) & (bbox[:, 1] <= y1) & (bbox[:, 3] >= y0)
    if not near.any():
        return canvas
    ring_start, shape_start = merged["ring_start"], merged["shape_start"]
    hits = np.flatnonzero(near)  # in layer order, each layer's shapes in its order
    rings = _ranges(shape_start[hits], shape_start[hits + 1])
    ring_len = ring_start[rings + 1] - ring_start[rings]
    xy = merged["xy"][_ranges(ring_start[rings], ring_start[rings + 1])]  # (V,2) global
    rot, t = ref_T_global[:3, :3], ref_T_global[:3, 3]
    x_ref = xy[:, 0] * rot[0, 0] + xy[:, 1] * rot[0, 1] + t[0]
    z_ref = xy[:, 0] * rot[2, 0] + xy[:, 1] * rot[2, 1] + t[2]
    u = (z_ref - vox.zmin) / vox.vox_size_z - 0.5  # our continuous row (cell centres at integers)
    v = vox.X - 1 - ((x_ref - vox.xmin) / vox.vox_size_x - 0.5)  # X - 1 - our continuous column
    uv = np.stack([u, v], axis=1)
    hi = (float(vox.Z), float(vox.X))
    layer = merged["shape_layer"][hits]
    shape_rings = shape_start[hits + 1] - shape_start[hits]
    line = merged["line"][layer]
    ring_line = np.repeat(line, shape_rings)
    vertex_line = np.repeat(ring_line, ring_len)
    if not line.all():
        shapes = _clipped_polygons(uv[~vertex_line], ring_len[~ring_line], shape_rings[~line], hi)
        for shape, k in zip(shapes, layer[~line]):  # in layer order
            if shape is not None:
                exteriors, holes = shape
                if exteriors:
                    cv2.fillPoly(canvas[k], exteriors, 1)
                if holes:
                    cv2.fillPoly(canvas[k], holes, 0)
    if line.any():  # every segment of every line at once (a line shape is one ring)
        lines_uv, lines_len = uv[vertex_line], ring_len[ring_line]
        last = np.cumsum(lines_len) - 1  # each line's last vertex: no segment from it to the next line
        within = np.ones(len(lines_uv) - 1, bool)
        within[last[:-1]] = False
        segment_layer = np.repeat(layer[line], lines_len - 1)
        pieces, kept = _clip_segments(lines_uv[:-1][within], lines_uv[1:][within], hi)
        pieces = pieces.astype(np.int32)  # (int32 truncates, as the devkit's does)
        for k in np.unique(segment_layer):
            mine = pieces[segment_layer[kept] == k]
            if len(mine):
                cv2.polylines(canvas[k], list(mine), False, 1, MAP_LINE_THICKNESS)
    return canvas
