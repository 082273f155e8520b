"""BEV composites: box projection checked against the devkit, layout, colours, orientation, GIFs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_dataset
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion

from bevtrain import viz
from bevtrain.geometry import Vox_util, pad_intrinsics, rigid_inverse

H, W = 90, 160  # camera images of the hand-made rig
CELL = 240  # composite cell width in the tests


def _rot_y(phi: float) -> torch.Tensor:
    c, s = math.cos(phi), math.sin(phi)
    m = torch.eye(4)
    m[0, 0], m[0, 2], m[2, 0], m[2, 2] = c, s, -s, c
    return m


def _devkit_corners_ref(
    x: float, z: float, yaw: float, wlh=(1.9, 4.5, 1.6), ground_y: float = 1.5
) -> np.ndarray:
    """(8, 3) corners, devkit order, of a box standing on the ground of the ref (camera) frame."""
    # Box frame: x forward (length), y left, z up; ref: x right, y down, z forward.
    ref_R_box = Quaternion(axis=[0, 1, 0], angle=yaw).rotation_matrix @ np.array(
        [[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=float
    )
    box = Box([x, ground_y - wlh[2] / 2, z], list(wlh), Quaternion(matrix=ref_R_box))
    return box.corners().T.astype(np.float32)


def make_rig_batch(boxes, B: int = 1, cam_ids=(1, 0, 2, 3, 4, 5)):
    """A collated batch (README contract) of a 6-camera rig, CAM_FRONT as reference.

    boxes: list of (x, z, yaw, visibility) in the ref frame; seg/valid are their footprints.
    """
    import cv2

    vox = Vox_util()
    yaw_of = {0: 55, 1: 0, 2: -55, 3: 110, 4: 180, 5: -110}  # degrees to the left of forward
    K = torch.tensor([[W * 0.8, 0, W / 2], [0, W * 0.8, H / 2], [0, 0, 1.0]])
    cams_T_ref = torch.stack([rigid_inverse(_rot_y(-math.radians(yaw_of[c]))) for c in cam_ids])
    ref_T_ego = torch.tensor([[0, -1, 0, 0], [0, 0, -1, 1.5], [1, 0, 0, -1.7], [0, 0, 0, 1.0]])
    corners = np.zeros((64, 8, 3), np.float32)
    vis = np.zeros(64, np.int64)
    seg = np.zeros((vox.Z, vox.X), np.uint8)
    valid = np.ones((vox.Z, vox.X), np.uint8)
    for k, (x, z, yaw, v) in enumerate(boxes):
        corners[k] = _devkit_corners_ref(x, z, yaw)
        vis[k] = v
        foot_xz = corners[k][[2, 3, 7, 6]][:, [0, 2]]
        mem = np.round((foot_xz - [vox.xmin, vox.zmin]) / [vox.vox_size_x, vox.vox_size_z] - 0.5).astype(
            np.int32
        )
        cv2.fillPoly(seg, [mem], 1)
        if v == 1:
            cv2.fillPoly(valid, [mem], 0)
    images = torch.zeros(6, 3, H, W, dtype=torch.uint8)
    images[:, 2] = 90
    images[:, 1] = torch.linspace(40, 160, H).view(H, 1).to(torch.uint8)
    one = {
        "images": images,
        "pix_T_cams": pad_intrinsics(K).expand(6, 4, 4).clone(),
        "cams_T_ref": cams_T_ref,
        "ref_T_ego": ref_T_ego,
        "cam_ids": torch.tensor(cam_ids),
        "seg_bev": torch.from_numpy(seg).float()[None],
        "valid_bev": torch.from_numpy(valid).float()[None],
        "box_corners": torch.from_numpy(corners),
        "box_count": torch.tensor(len(boxes)),
        "box_visibility": torch.from_numpy(vis),
    }
    batch = {k: torch.stack([v] * B) for k, v in one.items()}
    batch.update(
        sample_token=[f"token{b}" for b in range(B)], scene_name=["scene-0061"] * B, index=torch.arange(B)
    )
    return batch, vox


def _oracle(batch):
    return {"seg": (batch["seg_bev"] * 2 - 1) * 20.0}


def _has_color(img: np.ndarray, color, tol: int = 0) -> int:
    return int((np.abs(img.astype(int) - np.array(color)).max(axis=-1) <= tol).sum())


def test_box_edges_project_like_the_devkit():
    rng = np.random.default_rng(0)
    K = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1.0]])
    cam_T_ref = (
        _rot_y(0.4) @ torch.tensor([[1, 0, 0, 0.3], [0, 1, 0, -0.2], [0, 0, 1, 0.5], [0, 0, 0, 1.0]])
    ).numpy()
    ref_T_cam = np.linalg.inv(cam_T_ref)
    for _ in range(5):
        # A box in front of the camera, in camera coordinates, as the devkit would hold it.
        box = Box(
            [rng.uniform(-5, 5), rng.uniform(0, 2), rng.uniform(8, 40)],
            [1.9, 4.5, 1.6],
            Quaternion(axis=[0, 1, 0], angle=rng.uniform(-np.pi, np.pi)),
        )
        corners_cam = box.corners()  # (3, 8)
        expected = view_points(corners_cam, K, normalize=True)[:2].T  # (8, 2)
        corners_ref = (ref_T_cam[:3, :3] @ corners_cam + ref_T_cam[:3, 3:]).T[None]
        segments, visible = viz.project_box_edges(
            corners_ref, cam_T_ref, pad_intrinsics(torch.tensor(K)).numpy()
        )
        assert visible.all()
        # The 12 edges are the box's: lengths are w, l or h (4 each), every corner has 3.
        lengths = np.linalg.norm(
            corners_cam.T[viz.BOX_EDGES[:, 0]] - corners_cam.T[viz.BOX_EDGES[:, 1]], axis=1
        )
        np.testing.assert_allclose(np.sort(lengths), np.repeat([1.6, 1.9, 4.5], 4), atol=1e-5)
        assert np.bincount(viz.BOX_EDGES.ravel(), minlength=8).tolist() == [3] * 8
        np.testing.assert_allclose(segments[0, :, 0], expected[viz.BOX_EDGES[:, 0]], atol=1e-2)
        np.testing.assert_allclose(segments[0, :, 1], expected[viz.BOX_EDGES[:, 1]], atol=1e-2)


def test_box_edges_are_clipped_at_the_near_plane():
    K = pad_intrinsics(torch.tensor([[100.0, 0, 80], [0, 100.0, 45], [0, 0, 1]])).numpy()
    # A long box from 3 m behind the camera to 2 m ahead, beside it.
    corners = _devkit_corners_ref(x=3.0, z=-0.5, yaw=0.0, wlh=(1.9, 5.0, 1.6))[None]
    segments, visible = viz.project_box_edges(corners, np.eye(4, dtype=np.float32), K)
    z = corners[0, :, 2]
    Kf = K[:3, :3].astype(float)

    def pix(p):
        return view_points(np.asarray(p, float)[:, None], Kf, normalize=True)[:2, 0]

    crossing = 0
    for e, (a, b) in enumerate(viz.BOX_EDGES):
        assert visible[0, e] == (z[a] > viz.NEAR_PLANE_M or z[b] > viz.NEAR_PLANE_M)
        if (z[a] - viz.NEAR_PLANE_M) * (z[b] - viz.NEAR_PLANE_M) < 0:
            crossing += 1
            t = (viz.NEAR_PLANE_M - z[a]) / (z[b] - z[a])
            on_plane = pix(corners[0, a] + t * (corners[0, b] - corners[0, a]))
            # The endpoint behind the plane moves onto it; the one in front stays.
            want_a = on_plane if z[a] < viz.NEAR_PLANE_M else pix(corners[0, a])
            want_b = on_plane if z[b] < viz.NEAR_PLANE_M else pix(corners[0, b])
            np.testing.assert_allclose(segments[0, e, 0], want_a, rtol=1e-4, atol=1e-2)
            np.testing.assert_allclose(segments[0, e, 1], want_b, rtol=1e-4, atol=1e-2)
    assert crossing == 4
    # Same box turned around: now the crossing edges start behind the plane.
    flipped = _devkit_corners_ref(x=3.0, z=-0.5, yaw=np.pi, wlh=(1.9, 5.0, 1.6))[None]
    segments_f, _ = viz.project_box_edges(flipped, np.eye(4, dtype=np.float32), K)
    for e, (a, b) in enumerate(viz.BOX_EDGES):
        za, zb = flipped[0, a, 2], flipped[0, b, 2]
        if za < viz.NEAR_PLANE_M < zb:
            t = (viz.NEAR_PLANE_M - za) / (zb - za)
            np.testing.assert_allclose(
                segments_f[0, e, 0],
                pix(flipped[0, a] + t * (flipped[0, b] - flipped[0, a])),
                rtol=1e-4,
                atol=1e-2,
            )
    assert visible[0].any() and not visible[0].all()


def test_composite_size_layout_and_boxes_in_the_right_camera():
    batch, vox = make_rig_batch([(0.0, 15.0, 0.3, 4)], cam_ids=(1, 0, 2, 3, 4, 5))
    image = viz.render_composite(batch, _oracle(batch), 0, vox, cell_width=CELL)
    cell_h = round(H * CELL / W)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] == 3 * CELL
    assert image.shape[0] == 26 + 2 * cell_h + 28 + CELL + 48  # header, rig, titles, BEV, 2-row legend

    cams = viz.render_cameras(batch, 0, CELL)
    green = viz.VISIBILITY_COLORS[4]
    cell = {  # (row, col) of the rig layout -> the image there
        (r, c): cams[r * cell_h : (r + 1) * cell_h, c * CELL : (c + 1) * CELL]
        for r in range(2)
        for c in range(3)
    }
    # The box 15 m ahead: drawn in CAM_FRONT (top middle, though it is camera 0 of the batch), nowhere else.
    assert _has_color(cell[(0, 1)], green, tol=40) > 20
    for pos in [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]:
        assert _has_color(cell[pos], green, tol=40) == 0, pos


def test_bev_panels_forward_up_right_right_and_error_colours():
    # One vehicle ahead-right, fully visible; one behind-left, visibility 1 (ignored).
    batch, vox = make_rig_batch([(20.0, 30.0, 0.0, 4), (-20.0, -30.0, 0.0, 1)])
    strip, ious = viz.render_bev_panels(batch, _oracle(batch), 0, vox, panel_width=200)
    bar = 28
    gt_panel, err_panel = strip[bar:, :200], strip[bar:, 400:]
    ys, xs = np.nonzero((gt_panel == viz.GT_COLOR).all(-1))
    assert ys.max() < 100 and xs.min() > 100  # forward is up, right is right
    ys, xs = np.nonzero((gt_panel == viz.ERROR_COLORS["ignored (vis 0-40%)"]).all(-1))
    assert ys.min() > 100 and xs.max() < 100
    assert ious["simplebev"] == pytest.approx(1.0) and ious["lss"] == pytest.approx(1.0)
    assert _has_color(err_panel, viz.ERROR_COLORS["true positive"]) > 20
    assert _has_color(err_panel, viz.ERROR_COLORS["false negative"]) == 0
    assert _has_color(err_panel, viz.ERROR_COLORS["false positive"]) == 0
    assert _has_color(strip[bar:], viz.EGO_COLOR, tol=30) > 5

    # An empty prediction: the visible vehicle becomes a false negative, IoU 0.
    empty = {"seg": torch.full_like(batch["seg_bev"], -20.0)}
    strip, ious = viz.render_bev_panels(batch, empty, 0, vox, panel_width=200)
    assert ious["simplebev"] == 0.0
    assert _has_color(strip[bar:, 400:], viz.ERROR_COLORS["false negative"]) > 20
    assert _has_color(strip[bar:, 400:], viz.ERROR_COLORS["true positive"]) == 0


def test_gif_and_png_round_trip(tmp_path):
    from PIL import Image

    batch, vox = make_rig_batch([(5.0, 12.0, 0.5, 3)], B=3)
    frames = [viz.render_composite(batch, _oracle(batch), i, vox, cell_width=CELL) for i in range(3)]
    viz.write_png(tmp_path / "a.png", frames[0])
    np.testing.assert_array_equal(viz.read_png(tmp_path / "a.png"), frames[0])
    viz.write_gif(tmp_path / "scene.gif", frames, fps=2, scale=0.5)
    with Image.open(tmp_path / "scene.gif") as gif:
        assert gif.n_frames == 3
        assert gif.size == (round(frames[0].shape[1] * 0.5), round(frames[0].shape[0] * 0.5))


def test_boxes_on_a_real_synthetic_sample_land_where_the_devkit_projects_them(synthetic_root, tmp_path):
    """Dataset batch (box_corners, pix_T_cams, cams_T_ref) through our drawing path vs the devkit's own
    projection of the same annotations, in a camera that is not the reference one."""
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import BoxVisibility

    ds = make_dataset(synthetic_root, "val", False, res_scale=1, cache_dir=tmp_path)
    batch = torch.utils.data.default_collate([ds[1]])
    nusc = NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)
    sample = nusc.get("sample", batch["sample_token"][0])
    names = viz.camera_names_of(batch, 0, batch["images"].shape[1])
    H_img, W_img = batch["images"].shape[-2:]
    checked = 0
    for cam in ("CAM_BACK", "CAM_FRONT_LEFT"):
        s = names.index(cam)
        _, boxes, K = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.ALL)
        boxes = [b for b in boxes if b.name.startswith("vehicle.") and b.corners()[2].min() > 1.0]
        n = int(batch["box_count"][0])
        corners_ref = batch["box_corners"][0, :n].numpy()
        cam_T_ref = batch["cams_T_ref"][0, s].numpy()
        ours_cam = corners_ref @ cam_T_ref[:3, :3].T + cam_T_ref[:3, 3]  # (n, 8, 3)
        segments, _ = viz.project_box_edges(corners_ref, cam_T_ref, batch["pix_T_cams"][0, s].numpy())
        sx, sy = W_img / 1600, H_img / 900  # the val resize; pixel centres kept (u' = s (u + .5) - .5)
        for box in boxes:
            dev_cam = box.corners().T  # (8, 3)
            k = int(np.argmin(np.abs(ours_cam - dev_cam[None]).max(axis=(1, 2))))
            np.testing.assert_allclose(ours_cam[k], dev_cam, atol=2e-3)
            dev_px = view_points(box.corners(), np.asarray(K), normalize=True)[:2].T
            dev_px = np.stack([sx * (dev_px[:, 0] + 0.5) - 0.5, sy * (dev_px[:, 1] + 0.5) - 0.5], axis=1)
            np.testing.assert_allclose(segments[k, :, 0], dev_px[viz.BOX_EDGES[:, 0]], atol=0.05)
            checked += 1
    assert checked >= 2


def test_gif_keeps_the_pictures_colours_and_a_readable_legend(tmp_path):
    """Issue 25 item 9: the GIF palette, fitted to the camera images, turned the ego's cyan into a
    colour near another class's; at eval's default gif_scale the legend was unreadable."""
    from PIL import Image

    from bevtrain.config import EVAL_DEFAULTS

    batch, vox = make_rig_batch([(5.0, 12.0, 0.5, 3), (-8.0, 20.0, 0.1, 1)], B=2)
    noise = torch.randint(0, 256, batch["images"].shape, generator=torch.Generator().manual_seed(0))
    batch["images"] = noise.to(torch.uint8)  # photo-like: thousands of colours compete for the palette
    out = {"seg": torch.randn(batch["seg_bev"].shape, generator=torch.Generator().manual_seed(1)) * 3}
    frames = [viz.render_composite(batch, out, i, vox, cell_width=CELL) for i in range(2)]
    scale = EVAL_DEFAULTS["gif_scale"]
    viz.write_gif(tmp_path / "scene.gif", frames, scale=scale)
    with Image.open(tmp_path / "scene.gif") as gif:
        got = np.asarray(gif.convert("RGB"))
    png = frames[0]
    assert got.shape == png.shape  # the default scale keeps the PNG's size: the legend's text stays legible
    for color in viz.gif_reserved_colors():
        mask = (png == np.array(color)).all(-1)
        assert (got[mask] == np.array(color)).all(), color  # every meaningful colour exact
    assert _has_color(png, viz.EGO_COLOR) > 0 and _has_color(png, viz.ERROR_COLORS["true positive"]) > 0
    legend = slice(png.shape[0] - 48, png.shape[0])
    assert np.abs(got[legend].astype(int) - png[legend]).mean() < 1.0
# ------------------------------------------------------------------------------ several classes
def _multiclass_batch():
    """The rig batch with channels vehicle (its boxes), drivable_area (the forward half of the grid) and
    pedestrian (empty), as the dataset's multi-class contract has them."""
    from bevtrain.classes import resolve_classes

    batch, vox = make_rig_batch([(20.0, 30.0, 0.0, 4), (-20.0, -30.0, 0.0, 1)])
    vehicle, valid = batch["seg_bev"], batch["valid_bev"]
    area = torch.zeros_like(vehicle)
    area[..., vox.Z // 2 :, :] = 1  # rows grow forward: the forward half
    batch["seg_bev"] = torch.cat([vehicle, area, torch.zeros_like(vehicle)], dim=1)
    batch["valid_bev"] = torch.cat([valid, torch.ones_like(valid), torch.ones_like(valid)], dim=1)
    return batch, vox, resolve_classes(["vehicle", "drivable_area", "pedestrian"])


def test_several_classes_colour_the_panels_and_the_error_panel_follows_viz_class():
    batch, vox, classes = _multiclass_batch()
    area_rgb = np.round(0.2 * np.array(viz.BACKGROUND) + 0.8 * np.array(classes[1].color))
    oracle = _oracle(batch)
    strip, ious = viz.render_bev_panels(batch, oracle, 0, vox, panel_width=200, classes=classes)
    bar = 28
    gt_panel, pred_panel, err_panel = strip[bar:, :200], strip[bar:, 200:400], strip[bar:, 400:]
    # The map layer is an underlay over the forward (upper) half only, in GT and prediction alike.
    for panel in (gt_panel, pred_panel):
        ys, _ = np.nonzero(np.abs(panel.astype(int) - area_rgb).max(-1) <= 2)
        assert len(ys) > 5000 and ys.max() < 100
    # The vehicle is outlined in its colour in both; the error panel is the first class's (vehicle).
    for panel in (gt_panel, pred_panel):
        assert _has_color(panel, classes[0].color, tol=40) > 10
    assert ious["simplebev"] == pytest.approx(1.0)
    vehicle_tp = _has_color(err_panel, viz.ERROR_COLORS["true positive"])
    assert 20 < vehicle_tp < 2000

    # viz_class picks the class of the error panel: now the whole forward half is a true positive...
    strip, ious = viz.render_bev_panels(batch, oracle, 0, vox, panel_width=200, classes=classes,
                                        viz_class="drivable_area")
    assert _has_color(strip[bar:, 400:], viz.ERROR_COLORS["true positive"]) > 10 * vehicle_tp
    # ... and an empty drivable-area prediction makes it a false negative, leaving the other classes alone.
    no_area = {"seg": oracle["seg"].clone()}
    no_area["seg"][:, 1] = -20.0
    strip, ious = viz.render_bev_panels(batch, no_area, 0, vox, panel_width=200, classes=classes,
                                        viz_class="drivable_area")
    assert ious["lss"] == 0.0 and _has_color(strip[bar:, 400:], viz.ERROR_COLORS["false negative"]) > 5000
    assert not (np.abs(strip[bar:, 200:400].astype(int) - area_rgb).max(-1) <= 2).any()

    with pytest.raises(ValueError, match=r"viz_class='lane' is not one of the model's classes \['vehicle'"):
        viz.render_bev_panels(batch, oracle, 0, vox, classes=classes, viz_class="lane")
    with pytest.raises(ValueError, match="3 classes"):
        viz.render_bev_panels(batch, {"seg": oracle["seg"][:, :1]}, 0, vox, classes=classes)


def test_several_classes_add_a_legend_row_naming_them():
    batch, vox, classes = _multiclass_batch()
    vehicle_only, _ = make_rig_batch([(20.0, 30.0, 0.0, 4)])
    one = viz.render_composite(vehicle_only, _oracle(vehicle_only), 0, vox, cell_width=CELL)
    many = viz.render_composite(batch, _oracle(batch), 0, vox, cell_width=CELL, classes=classes)
    assert many.shape[0] == one.shape[0] + viz.LEGEND_ROW_H and many.shape[1] == one.shape[1]
    legend = many[-viz.LEGEND_ROW_H - 4 :]
    for c in classes:
        assert _has_color(legend, c.color) >= 50  # each class's swatch (10 x 10 px)
