"""target_raster='simplebev' reproduces Simple-BEV's targets cell for cell.

The expected maps are recomputed here from Simple-BEV's rule (nuscenesdataset.get_seg_bev and
get_center_and_offset_bev), in numpy + cv2, from boxes and poses read through the real devkit:
boxes through the LIDAR_TOP keyframe's ego pose, then into the reference camera with its
extrinsics only; the top face's corners to mem coordinates ((v - min) / cell - 0.5), truncated
towards zero, filled with cv2.fillPoly (the face drawn in its cyclic order: Simple-BEV's
[0, 1, 3, 2] order of the y-sorted corners is that order for a flat or tilted face); valid = 0
under visibility-1 boxes; centres: exp(-d^2 / 18) around the rounded mem centre, zeroed below
0.001; offsets 2 * (cell - rounded centre) on each box's own cells (later boxes own shared cells).

Two data sets: the synthetic test set as generated (level cameras, sensors sharing one pose per
keyframe), and a copy of its tables with real-nuScenes-like poses (tilted camera extrinsics and
lidar ego pose, each camera's ego pose moved away from the lidar keyframe's), where using the
wrong pose or the exact rule shows.
"""

import json
import shutil

import cv2
import numpy as np
import pytest
from conftest import make_dataset
from pyquaternion import Quaternion

from bevtrain.data.dataset import CAMERA_NAMES, NuScenesBEVDataset

GRID = dict(Z=200, Y=8, X=200, bounds=(-50.0, 50.0, -5.0, 5.0, -50.0, 50.0), scene_centroid=(0.0, 1.0, 0.0))


@pytest.fixture(scope="module")
def tilted_root(synthetic_root, tmp_path_factory):
    """The test set's tables with tilted extrinsics and ego poses; images and sweeps linked."""
    root = tmp_path_factory.mktemp("tilted")
    for sub in ("samples", "sweeps", "maps"):
        if (synthetic_root / sub).exists():
            (root / sub).symlink_to(synthetic_root / sub)
    src, dst = synthetic_root / "v1.0-mini", root / "v1.0-mini"
    shutil.copytree(src, dst)
    load = lambda name: json.loads((dst / f"{name}.json").read_text())  # noqa: E731
    sensors = {s["token"]: s for s in load("sensor")}
    calibs = load("calibrated_sensor")
    channel_of_calib = {c["token"]: sensors[c["sensor_token"]]["channel"] for c in calibs}
    tilt = Quaternion(axis=[1, 0, 0], degrees=1.3) * Quaternion(axis=[0, 1, 0], degrees=-0.8)
    for c in calibs:
        if channel_of_calib[c["token"]].startswith("CAM_"):
            c["rotation"] = list((tilt * Quaternion(c["rotation"])).elements)
    channel_of_pose = {
        sd["ego_pose_token"]: channel_of_calib[sd["calibrated_sensor_token"]] for sd in load("sample_data")
    }
    poses = load("ego_pose")
    for p in poses:
        q = Quaternion(p["rotation"])
        channel = channel_of_pose[p["token"]]
        if channel.startswith("CAM_"):  # the car moved between the lidar sweep and this exposure
            p["translation"] = list(np.asarray(p["translation"]) + q.rotate([0.6, -0.25, 0.03]))
            p["rotation"] = list((q * Quaternion(axis=[0, 0, 1], degrees=1.1)).elements)
        elif channel == "LIDAR_TOP":
            p["rotation"] = list((q * Quaternion(axis=[0, 1, 0], degrees=0.7)).elements)
    (dst / "calibrated_sensor.json").write_text(json.dumps(calibs))
    (dst / "ego_pose.json").write_text(json.dumps(poses))
    return root


def _nusc(root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-mini", dataroot=str(root), verbose=False)


def _simplebev_maps(nusc, sample_token, ref_cam, Z, X, bounds, scene_centroid, **_):
    """Simple-BEV's seg, valid, center, offset for ``ref_cam`` as reference; also the smallest
    distance of a drawn corner / rounded centre to a truncation / rounding boundary."""
    sample = nusc.get("sample", sample_token)
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    pose = nusc.get("ego_pose", lidar["ego_pose_token"])
    cam = nusc.get("sample_data", sample["data"][ref_cam])
    calib = nusc.get("calibrated_sensor", cam["calibrated_sensor_token"])
    lo = np.array([bounds[0] + scene_centroid[0], bounds[4] + scene_centroid[2]])
    cell = np.array([(bounds[1] - bounds[0]) / X, (bounds[5] - bounds[4]) / Z])

    def to_mem(xz):  # (..., 2) metres -> (col, row), integer at cell centres
        return (xz - lo) / cell - 0.5

    ids = np.zeros((Z, X))
    valid = np.ones((Z, X))
    centres, margin = [], np.inf
    for token in sample["anns"]:
        ann = nusc.get("sample_annotation", token)
        if not ann["category_name"].startswith("vehicle."):
            continue
        box = nusc.get_box(token)
        box.translate(-np.array(pose["translation"]))
        box.rotate(Quaternion(pose["rotation"]).inverse)
        box.translate(-np.array(calib["translation"]))
        box.rotate(Quaternion(calib["rotation"]).inverse)
        corners = box.corners().T  # (8, 3) camera frame: y points down
        top = to_mem(corners[np.argsort(corners[:, 1], kind="stable")[:4]][:, [0, 2]])  # (4, 2)
        mid = top.mean(axis=0)
        top = top[np.argsort(np.arctan2(top[:, 1] - mid[1], top[:, 0] - mid[0]))]
        pts = np.trunc(top).astype(np.int32)
        centre = to_mem(box.center[[0, 2]])
        if pts.max(axis=0).min() >= -1 and pts[:, 0].min() <= X and pts[:, 1].min() <= Z:
            margin = min(margin, np.abs(top - np.round(top)).min(), np.abs(np.abs(centre % 1) - 0.5).min())
        cv2.fillPoly(ids, [pts], len(centres) + 1.0)
        if ann["visibility_token"] == "1":
            cv2.fillPoly(valid, [pts], 0.0)
        centres.append(np.round(centre))
    centres = np.array(centres).reshape(-1, 2)

    offset = np.zeros((2, Z, X), np.float32)
    rows, cols = np.nonzero(ids)
    owner = ids[rows, cols].astype(int) - 1
    offset[0, rows, cols] = 2 * (cols - centres[owner, 0])
    offset[1, rows, cols] = 2 * (rows - centres[owner, 1])
    rr, cc = np.mgrid[0:Z, 0:X]
    center = np.zeros((Z, X))
    for c0, r0 in centres:
        g = np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / 18.0)
        center = np.maximum(center, np.where(g < 0.001, 0.0, g))
    return (ids > 0).astype(np.float32), valid.astype(np.float32), center, offset, margin


def _check_sample(nusc, out, ref_cam):
    seg, valid, center, offset, margin = _simplebev_maps(nusc, out["sample_token"], ref_cam, **GRID)
    # Simple-BEV works in float32, this recomputation in float64: they can only disagree on a corner
    # within float32 rounding (~1e-5 cells) of a cell boundary.
    why = f"(closest corner/centre to a cell boundary: {margin:.1e} cells)"
    np.testing.assert_array_equal(out["seg_bev"][0].numpy(), seg, err_msg=f"seg_bev {why}")
    np.testing.assert_array_equal(out["valid_bev"][0].numpy(), valid, err_msg=f"valid_bev {why}")
    np.testing.assert_array_equal(out["offset_bev"].numpy(), offset, err_msg=f"offset_bev {why}")
    np.testing.assert_allclose(out["center_bev"][0].numpy(), center, rtol=1e-6, atol=1e-7, err_msg="center")
    return int(seg.sum()), int((valid == 0).sum())


@pytest.mark.parametrize("tilted", [False, True], ids=["synthetic", "tilted-poses"])
def test_val_maps_equal_simplebev_rule(synthetic_root, tilted_root, tmp_path, tilted):
    root = tilted_root if tilted else synthetic_root
    nusc = _nusc(root)
    ds = make_dataset(root, "val", False, res_scale=0.25, cache_dir=tmp_path, target_raster="simplebev",
                      **GRID)
    cells = invalid = 0
    for i in range(len(ds)):
        out = ds[i]
        assert CAMERA_NAMES[int(out["cam_ids"][0])] == "CAM_FRONT"
        s, v = _check_sample(nusc, out, "CAM_FRONT")
        cells, invalid = cells + s, invalid + v
    assert cells > 1000 and invalid > 0, (cells, invalid)


def test_shuffled_reference_camera_and_frames_stay_consistent(tilted_root, tmp_path):
    """Training with a random reference camera: the maps follow Simple-BEV's rule for that camera,
    and the reported boxes and cams_T_ref place the boxes where the devkit sees them in every camera
    (at each camera's own ego pose), so images and targets agree."""
    from nuscenes.utils.geometry_utils import BoxVisibility

    nusc = _nusc(tilted_root)
    ds = make_dataset(
        tilted_root, "val", True, res_scale=0.25, cache_dir=tmp_path, rand_flip=False,
        rand_crop_and_resize=False, do_shuffle_cams=True, seed=5, target_raster="simplebev", **GRID,
    )  # fmt: skip
    refs = set()
    for i in range(len(ds)):
        out = ds[i]
        ref_cam = CAMERA_NAMES[int(out["cam_ids"][0])]
        refs.add(ref_cam)
        _check_sample(nusc, out, ref_cam)
        # ref_T_ego is the reference camera's extrinsics, inverted (the distance bands use it).
        calib = nusc.get("calibrated_sensor", nusc.get("sample_data", nusc.get("sample", out["sample_token"])[
            "data"][ref_cam])["calibrated_sensor_token"])  # fmt: skip
        ego_T_ref = np.eye(4)
        ego_T_ref[:3, :3] = Quaternion(calib["rotation"]).rotation_matrix
        ego_T_ref[:3, 3] = calib["translation"]
        np.testing.assert_allclose(out["ref_T_ego"].numpy(), np.linalg.inv(ego_T_ref), atol=1e-5)
        n = int(out["box_count"])
        corners_ref = out["box_corners"][:n].double().numpy()
        sample = nusc.get("sample", out["sample_token"])
        for s, cam_id in enumerate(out["cam_ids"].tolist()):
            cam = CAMERA_NAMES[cam_id]
            _, boxes, _ = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.NONE)
            theirs = np.stack([b.corners().T for b in boxes if b.name.startswith("vehicle.")])  # (M, 8, 3)
            cam_T_ref = out["cams_T_ref"][s].double().numpy()
            ours = corners_ref @ cam_T_ref[:3, :3].T + cam_T_ref[:3, 3]  # (n, 8, 3)
            gap = np.abs(ours[:, None] - theirs[None]).max(axis=(2, 3))  # (n, M)
            worst = gap.min(axis=1).max()
            assert worst < 2e-3, f"{out['sample_token']}: a box is {worst} m off in {cam}"
    assert len(refs) >= 3, refs


def test_exact_raster_differs_and_is_smaller(synthetic_root, tmp_path):
    """The two rules are different ground truths: Simple-BEV's footprints cover more cells."""
    kw = dict(split="val", is_train=False, res_scale=0.25, cache_dir=tmp_path, **GRID)
    sb = make_dataset(synthetic_root, target_raster="simplebev", **kw)
    ex = make_dataset(synthetic_root, target_raster="exact", **kw)
    a = sum(float(sb[i]["seg_bev"].sum()) for i in range(len(sb)))
    b = sum(float(ex[i]["seg_bev"].sum()) for i in range(len(ex)))
    assert a > 1.1 * b > 0, (a, b)
    with pytest.raises(ValueError, match="target_raster='fillpoly': use one of"):
        NuScenesBEVDataset(sb.data.replace(target_raster="fillpoly"), "val", is_train=False)
