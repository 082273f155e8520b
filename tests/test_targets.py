"""BEV targets and grid orientation, checked against independent point-in-polygon rasterisation."""

import time

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from bevtrain.data import targets
from bevtrain.geometry import Vox_util

VOX = Vox_util()  # 200 x 8 x 200, x,z in [-50, 50], 0.5 m cells


def _ref_box(x, z, length, width, yaw, height=1.5, y=1.0):
    """Corners/centre of a ground box in the camera-like ref frame (x right, y down, z forward).

    The box's own x (length) axis is rotated by ``yaw`` about the ref frame's down axis.
    """
    # Box frame (x fwd, y left, z up) -> ref frame: columns are the images of the box axes.
    c, s = np.cos(yaw), np.sin(yaw)
    fwd = np.array([s, 0.0, c])
    left = np.array([-c, 0.0, s])
    up = np.array([0.0, -1.0, 0.0])
    R = np.stack([fwd, left, up], axis=1)
    q = Quaternion(matrix=R)
    centre = np.array([x, y, z])
    corners = targets.box_corners(centre[None], np.array([[width, length, height]]), np.array([q.elements]))
    return corners[0], centre


def _brute_force_seg(corners_list):
    """Cells whose centres are inside any footprint (matplotlib's point-in-polygon)."""
    centres = VOX.bev_centers_ref().numpy().reshape(-1, 2)  # (x, z) per cell
    seg = np.zeros(VOX.Z * VOX.X, bool)
    near_edge = np.zeros_like(seg)
    for corners in corners_list:
        poly = corners[targets.BOTTOM][:, [0, 2]]
        path = MplPath(poly)
        seg |= path.contains_points(centres)
        # Cells within 1 mm of an edge may go either way.
        for a, b in zip(poly, np.roll(poly, -1, axis=0)):
            ab = b - a
            t = np.clip(((centres - a) @ ab) / (ab @ ab), 0, 1)
            d = np.linalg.norm(centres - (a + t[:, None] * ab), axis=1)
            near_edge |= d < 1e-3
    return seg.reshape(VOX.Z, VOX.X), near_edge.reshape(VOX.Z, VOX.X)


def test_box_corners_match_devkit():
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = Quaternion(axis=rng.normal(size=3), angle=rng.uniform(-3, 3))
        centre, wlh = rng.normal(size=3) * 10, rng.uniform(1, 5, 3)
        ours = targets.box_corners(centre[None], wlh[None], np.array([q.elements]))[0]
        theirs = Box(centre, wlh, q).corners().T
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
        np.testing.assert_allclose(ours[targets.BOTTOM], Box(centre, wlh, q).bottom_corners().T, atol=1e-9)


def test_axis_aligned_box_lands_on_expected_cells():
    # 4 m long (along z), 2 m wide (along x), centred at x=10, z=20.
    corners, centre = _ref_box(10.0, 20.0, length=4.0, width=2.0, yaw=0.0)
    seg, valid, center, offset = targets.bev_targets(corners[None], centre[None], np.array([4]), VOX)
    expected = np.zeros((200, 200), np.float32)
    # cell centres x = -50 + (c + .5) * .5 in [9, 11] -> c = 118..121; z in [18, 22] -> rows 136..143
    expected[136:144, 118:122] = 1
    np.testing.assert_array_equal(seg[0], expected)
    assert valid.min() == 1
    # Centre (x=10, z=20) is at mem (col, row) = (119.5, 139.5): four cells share the peak.
    peak = np.exp(-(0.5**2 + 0.5**2) / (2 * 9))
    np.testing.assert_allclose(center[0, 139:141, 119:121], peak, rtol=1e-6)
    assert center.max() == pytest.approx(peak, rel=1e-6)
    np.testing.assert_allclose(offset[0, 136, 118], 119.5 - 118)
    np.testing.assert_allclose(offset[1, 136, 118], 139.5 - 136)
    assert (offset[:, expected == 0] == 0).all()


def test_rotated_boxes_match_point_in_polygon():
    rng = np.random.default_rng(3)
    boxes = [
        _ref_box(*rng.uniform(-45, 45, 2), *rng.uniform(1.5, 8, 2), rng.uniform(-np.pi, np.pi))
        for _ in range(30)
    ]
    corners = np.stack([b[0] for b in boxes])
    centres = np.stack([b[1] for b in boxes])
    vis = rng.integers(1, 5, len(boxes))
    seg, valid, center, offset = targets.bev_targets(corners, centres, vis, VOX)
    want, edge = _brute_force_seg(corners)
    differ = (seg[0] > 0) != want
    assert not (differ & ~edge).any(), f"{int((differ & ~edge).sum())} cells differ from point-in-polygon"
    assert want.sum() > 500
    # valid: exactly the footprints of visibility-1 boxes are masked out.
    want_invalid, edge1 = _brute_force_seg(corners[vis == 1])
    assert not (((valid[0] == 0) != want_invalid) & ~edge1).any()
    assert (vis == 1).any() and (vis != 1).any()


def test_center_and_offset_point_at_box_centres():
    corners, centre = _ref_box(-20.3, 7.9, length=5.0, width=2.2, yaw=0.7)
    seg, _, center, offset = targets.bev_targets(corners[None], centre[None], np.array([3]), VOX)
    col = (centre[0] + 50) / 0.5 - 0.5
    row = (centre[2] + 50) / 0.5 - 0.5
    rows, cols = np.nonzero(seg[0])
    np.testing.assert_allclose(cols + offset[0, rows, cols], col, atol=1e-4)
    np.testing.assert_allclose(rows + offset[1, rows, cols], row, atol=1e-4)
    r, c = np.unravel_index(center[0].argmax(), center[0].shape)
    assert abs(r - row) <= 0.5 and abs(c - col) <= 0.5
    # sigma = 3 cells: 3 cells away (on a cell centre line) the value is exp(-1/2) of the peak.
    rr, cc = np.mgrid[0:200, 0:200]
    want = np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / 18.0)
    near = (np.abs(rr - row) <= 9) & (np.abs(cc - col) <= 9)
    np.testing.assert_allclose(center[0][near], want[near], rtol=1e-5)


def test_no_boxes_and_far_boxes():
    empty = targets.bev_targets(np.zeros((0, 8, 3)), np.zeros((0, 3)), np.zeros(0, int), VOX)
    assert (
        empty[0].sum() == 0
        and empty[1].min() == 1
        and empty[2].sum() == 0
        and empty[3].shape == (2, 200, 200)
    )
    corners, centre = _ref_box(500.0, -900.0, 4, 2, 0.3)
    seg, valid, center, _ = targets.bev_targets(corners[None], centre[None], np.array([1]), VOX)
    assert seg.sum() == 0 and valid.min() == 1 and center.sum() == 0


def test_class_mask_prefix():
    cats = [
        "vehicle.car",
        "vehicle.bus.rigid",
        "human.pedestrian.adult",
        "movable_object.barrier",
        "vehiclex",
    ]
    np.testing.assert_array_equal(targets.class_mask(cats, ("vehicle",)), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(targets.class_mask(cats, ("vehicle", "human")), [1, 1, 1, 0, 0])


def test_grid_orientation_forward_is_high_row_right_is_high_col():
    ahead, c_ahead = _ref_box(0.0, 30.0, 4, 2, 0.0)  # 30 m in front of the reference camera
    right, c_right = _ref_box(30.0, 0.0, 4, 2, 0.0)  # 30 m to its right
    seg_a = targets.bev_targets(ahead[None], c_ahead[None], np.array([4]), VOX)[0][0]
    seg_r = targets.bev_targets(right[None], c_right[None], np.array([4]), VOX)[0][0]
    rows_a, cols_a = np.nonzero(seg_a)
    rows_r, cols_r = np.nonzero(seg_r)
    assert rows_a.min() > 150 and 95 <= cols_a.mean() <= 105
    assert cols_r.min() > 150 and 95 <= rows_r.mean() <= 105


def test_vox_util_roundtrip_and_cells():
    xyz = torch.tensor([[[10.0, 1.0, 20.0], [-49.9, -3.9, 49.9], [0.1, 1.1, -0.1]]])
    back = VOX.Mem2Ref(VOX.Ref2Mem(xyz))
    torch.testing.assert_close(back, xyz, atol=1e-4, rtol=0)
    mem = VOX.Ref2Mem(xyz)[0]
    # x=10 -> col 119.5 (between 119 and 120); z=20 -> row 139.5; y=1 (centroid) -> 3.5 of 8.
    torch.testing.assert_close(mem[0], torch.tensor([119.5, 3.5, 139.5]))
    occ = VOX.voxelize_xyz(torch.tensor([[[10.1, 1.2, 20.1]]]))  # mem (119.7, 3.66, 139.7)
    assert occ.shape == (1, 1, 200, 8, 200)
    assert occ[0, 0, 140, 4, 120] == 1 and occ.sum() == 1
    # BEV cell centres agree with the targets' cell convention.
    centres = VOX.bev_centers_ref()
    torch.testing.assert_close(centres[139, 119], torch.tensor([9.75, 19.75]))


def test_targets_are_fast():
    rng = np.random.default_rng(0)
    boxes = [
        _ref_box(*rng.uniform(-45, 45, 2), *rng.uniform(1.5, 8, 2), rng.uniform(-3, 3)) for _ in range(60)
    ]
    corners = np.stack([b[0] for b in boxes])
    centres = np.stack([b[1] for b in boxes])
    vis = rng.integers(1, 5, len(boxes))
    targets.bev_targets(corners, centres, vis, VOX)
    t0 = time.perf_counter()
    for _ in range(20):
        targets.bev_targets(corners, centres, vis, VOX)
    per_sample = (time.perf_counter() - t0) / 20
    # Simple-BEV spends ~63 ms here; a generous bound that still catches per-pixel Python loops.
    assert per_sample < 0.02, f"{per_sample * 1e3:.1f} ms per sample for 60 boxes"
