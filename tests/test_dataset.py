"""The dataset end to end on the synthetic set, checked against the devkit's own projections."""

import cv2
import numpy as np
import pytest
import torch
from conftest import make_dataset

from bevtrain.build import to_device
from bevtrain.config import DataConfig
from bevtrain.data import index, targets
from bevtrain.data.dataset import CAMERA_NAMES, EpochSampler, NuScenesBEVDataset, SampleReadError, make_loader


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("index_cache")


@pytest.fixture(scope="module")
def nusc(synthetic_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)


def _ds(root, cache, split="val", is_train=False, **kw):
    return make_dataset(root, split, is_train, **{"res_scale": 1, "cache_dir": cache, **kw})


def _devkit_boxes(nusc, sample_token, cam):
    """Vehicle boxes in ``cam``'s frame (devkit get_sample_data), in the dataset's box order."""
    from nuscenes.utils.geometry_utils import BoxVisibility

    sample = nusc.get("sample", sample_token)
    _, boxes, K = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.NONE)
    return [b for b in boxes if b.name.startswith("vehicle.")], np.asarray(K)


def _devkit_tokens_in_dataset_order(nusc, out):
    """Tokens of the devkit's vehicle boxes ordered like the dataset's: by ground distance in the
    reference frame of the default simplebev raster, the reference camera's extrinsics on the LIDAR_TOP
    keyframe's ego pose (boxes from the devkit in the lidar frame, moved by the calibration tables)."""
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    sample = nusc.get("sample", out["sample_token"])

    def ego_T_sensor(channel):
        sd = nusc.get("sample_data", sample["data"][channel])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        return transform_matrix(cs["translation"], Quaternion(cs["rotation"]))

    ref_cam = CAMERA_NAMES[int(out["cam_ids"][0])]
    ref_T_lidar = np.linalg.inv(ego_T_sensor(ref_cam)) @ ego_T_sensor("LIDAR_TOP")
    boxes, _ = _devkit_boxes(nusc, out["sample_token"], "LIDAR_TOP")
    centres = np.array([ref_T_lidar[:3, :3] @ b.center + ref_T_lidar[:3, 3] for b in boxes]).reshape(-1, 3)
    order = np.argsort(np.linalg.norm(centres[:, [0, 2]], axis=1), kind="stable")  # the mirror keeps it
    return [boxes[i].token for i in order[: len(out["box_corners"])]]


def test_contract_val(synthetic_root, cache):
    ds = _ds(synthetic_root, cache)
    out = ds[0]
    S, (H, W) = 6, (224, 400)
    assert out["images"].shape == (S, 3, H, W) and out["images"].dtype == torch.uint8
    bev = (1, 200, 200)
    shapes = dict(pix_T_cams=(S, 4, 4), cams_T_ref=(S, 4, 4), ref_T_ego=(4, 4), center_bev=bev,
                  offset_bev=(2, 200, 200), box_corners=(64, 8, 3))  # fmt: skip
    for key, shape in shapes.items():
        assert out[key].shape == shape and out[key].dtype == torch.float32, key
    for key in ("seg_bev", "valid_bev"):  # 0/1 masks, uint8 until build.to_device
        assert out[key].shape == bev and out[key].dtype == torch.uint8, key
        assert set(out[key].unique().tolist()) <= {0, 1}, key
    on_device = to_device(out, torch.device("cpu"))
    assert on_device["seg_bev"].dtype == on_device["valid_bev"].dtype == torch.float32
    assert torch.equal(on_device["seg_bev"], out["seg_bev"].float())
    assert out["box_visibility"].shape == (64,) and out["box_visibility"].dtype == torch.int64
    n = int(out["box_count"])
    assert out["box_class"].dtype == torch.int64 and out["box_class"].tolist() == [0] * n + [-1] * (64 - n)
    assert out["cam_ids"].tolist() == [1, 0, 2, 3, 4, 5]  # reference camera (CAM_FRONT) first
    # the reference frame is the reference camera itself under the exact raster (under simplebev it
    # sits on the lidar keyframe's ego pose: test_cams_T_ref_places_each_camera_at_its_own_capture_pose)
    exact = _ds(synthetic_root, cache, target_raster="exact")[0]
    torch.testing.assert_close(exact["cams_T_ref"][0], torch.eye(4), atol=1e-6, rtol=0)
    assert "radar" not in out and "lidar" not in out
    assert isinstance(out["sample_token"], str) and out["scene_name"].startswith("scene-")
    assert out["index"].item() == 0
    assert out["seg_bev"].sum() > 0, "the synthetic sample should have vehicles in the grid"


def test_boxes_project_like_devkit(synthetic_root, cache, nusc):
    from nuscenes.utils.geometry_utils import view_points

    ds = _ds(synthetic_root, cache)
    for i in (0, len(ds) - 1):
        out = ds[i]
        rec = ds.records[i]
        n = int(out["box_count"])
        corners = out["box_corners"][:n].double().numpy()
        tokens = _devkit_tokens_in_dataset_order(nusc, out)
        checked = 0
        for s, cam_id in enumerate(out["cam_ids"].tolist()):
            cam = CAMERA_NAMES[cam_id]
            boxes, K = _devkit_boxes(nusc, out["sample_token"], cam)
            by_tok = {b.token: b for b in boxes}
            cam_T_ref = out["cams_T_ref"][s].double().numpy()
            K_raw = rec["cams"][cam]["pix_T_cam"]
            sx, sy = 400 / rec["cams"][cam]["width"], 224 / rec["cams"][cam]["height"]
            for tok, c_ref in zip(tokens, corners):
                theirs_cam = by_tok[tok].corners()  # (3, 8)
                ours_cam = (c_ref @ cam_T_ref[:3, :3].T + cam_T_ref[:3, 3]).T
                np.testing.assert_allclose(ours_cam, theirs_cam, atol=2e-3)
                front = theirs_cam[2] > 0.5
                if not front.any():
                    continue
                theirs_px = view_points(theirs_cam[:, front], K, normalize=True)[:2]
                ours_h = K_raw[:3, :3] @ ours_cam[:, front]
                np.testing.assert_allclose(ours_h[:2] / ours_h[2], theirs_px, atol=0.5)
                # After the validation resize: pixel centres map by u' = s (u + 0.5) - 0.5.
                aug_h = out["pix_T_cams"][s, :3, :3].double().numpy() @ ours_cam[:, front]
                want = np.stack([sx * (theirs_px[0] + 0.5) - 0.5, sy * (theirs_px[1] + 0.5) - 0.5])
                np.testing.assert_allclose(aug_h[:2] / aug_h[2], want, atol=0.5 * max(sx, sy))
                checked += 1
        assert checked > 0


def _warp_check(img_aug, img_orig_rgb, K_aug, K_raw):
    """Mean |augmented - original resampled through K_raw K_aug^-1| over the image area both see."""
    H, W = img_aug.shape[1:]
    uu, vv = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    rays = np.linalg.inv(K_aug[:3, :3]) @ np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)])
    src = K_raw[:3, :3] @ rays
    mx = (src[0] / src[2]).reshape(H, W).astype(np.float32)
    my = (src[1] / src[2]).reshape(H, W).astype(np.float32)
    # Pre-blur the full-resolution original to roughly the augmented sampling density.
    scale = abs(K_raw[0, 0] / K_aug[0, 0])
    blurred = cv2.GaussianBlur(img_orig_rgb, (0, 0), max(0.5, 0.5 * scale))
    want = cv2.remap(blurred, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    oh, ow = img_orig_rgb.shape[:2]
    inside = (mx > 2) & (mx < ow - 3) & (my > 2) & (my < oh - 3)
    got = img_aug.transpose(1, 2, 0).astype(np.float32)
    return np.abs(got - want.astype(np.float32))[inside].mean(), inside.mean()


def test_train_augmentation_keeps_image_content_and_geometry(synthetic_root, cache, nusc):
    ds = _ds(synthetic_root, cache, is_train=True, split="train", seed=3)
    flips = 0
    for i in range(3):
        out = ds[i]
        rec = ds.records[i]
        for s, cam_id in enumerate(out["cam_ids"].tolist()):
            cam = CAMERA_NAMES[cam_id]
            K_aug = out["pix_T_cams"][s].double().numpy()
            K_raw = rec["cams"][cam]["pix_T_cam"]
            flips += K_aug[0, 0] < 0
            orig = cv2.imread(f"{synthetic_root}/{rec['cams'][cam]['path']}")[:, :, ::-1].copy()
            err, frac = _warp_check(out["images"][s].numpy(), orig, K_aug, K_raw)
            assert frac > 0.5
            # A one-pixel error in the intrinsics must read clearly worse than the real thing.
            K_off = K_aug.copy()
            K_off[0, 2] += 1.5
            err_off, _ = _warp_check(out["images"][s].numpy(), orig, K_off, K_raw)
            assert err < 6 and err < 0.8 * err_off, (cam, err, err_off)
        # Geometry with the BEV mirror: cameras see the (mirrored) boxes where the devkit puts them.
        tokens = _devkit_tokens_in_dataset_order(nusc, out)
        n = int(out["box_count"])
        for s, cam_id in enumerate(out["cam_ids"].tolist()):
            boxes, _ = _devkit_boxes(nusc, out["sample_token"], CAMERA_NAMES[cam_id])
            by_tok = {b.token: b for b in boxes}
            cam_T_ref = out["cams_T_ref"][s].double().numpy()
            for tok, c_ref in zip(tokens, out["box_corners"][:n].double().numpy()):
                ours_cam = (c_ref @ cam_T_ref[:3, :3].T + cam_T_ref[:3, 3]).T
                np.testing.assert_allclose(ours_cam, by_tok[tok].corners(), atol=2e-3)
    assert flips > 0, "expected some horizontally flipped cameras"


@pytest.mark.parametrize("raster", ["simplebev", "exact"])
def test_bev_mirror_flips_targets_and_points_consistently(synthetic_root, cache, raster):
    # rich radar: ref-frame velocities mirror too (simplebev: test_points.test_simplebev_radar_mirror_...)
    kw = dict(use_radar=True, use_metaradar=True, radar_features="rich", use_lidar=True, nsweeps=2, ncams=1,
              target_raster=raster)  # fmt: skip
    val = _ds(synthetic_root, cache, **kw)
    train = _ds(synthetic_root, cache, is_train=True, do_shuffle_cams=False, rand_crop_and_resize=False, **kw)
    seen = set()
    for i in range(len(val)):
        a, b = val[i], train[i]
        assert b["cam_ids"].tolist() == [1]
        m = np.round(np.diag(b["cams_T_ref"][0].numpy())).astype(int)  # ref cam: cam_T_ref = M
        fx, fz = m[0] == -1, m[2] == -1
        seen.add((fx, fz))
        want = {k: a[k].numpy() for k in ("seg_bev", "valid_bev", "center_bev", "offset_bev")}
        for axis, on, ch in ((-1, fx, 0), (-2, fz, 1)):
            if on:
                want = {k: np.flip(v, axis) for k, v in want.items()}
                want["offset_bev"] = want["offset_bev"].copy()
                want["offset_bev"][ch] *= -1
        for k, v in want.items():
            np.testing.assert_array_equal(b[k].numpy(), v, err_msg=k)
        M = np.diag(m).astype(np.float32)
        for key, ncols in (("radar", 19), ("lidar", 4)):
            assert a[f"{key}_count"] == b[f"{key}_count"] > 0
            pa, pb = a[key].numpy(), b[key].numpy()
            assert pa.shape[1] == ncols
            np.testing.assert_allclose(pb[:, :3], pa[:, :3] @ M[:3, :3], atol=1e-4)
        np.testing.assert_allclose(b["radar"][:, [6, 8]], a["radar"][:, [6, 8]] * m[0], atol=1e-5)
        np.testing.assert_allclose(b["box_corners"].numpy(), a["box_corners"].numpy() @ M[:3, :3], atol=1e-4)
        torch.testing.assert_close(b["ref_T_ego"], torch.from_numpy(M) @ a["ref_T_ego"], atol=1e-4, rtol=0)
        if raster != "exact":
            continue  # Simple-BEV's maps are pinned unflipped in test_simplebev_raster.py
        # Targets equal the rasterisation of the boxes the sample reports (same frame, same flips).
        n = int(b["box_count"])
        corners = b["box_corners"][:n].double().numpy()
        seg, valid, _, _ = targets.bev_targets(
            corners, corners.mean(1), b["box_visibility"][:n].numpy(), train.vox
        )
        np.testing.assert_array_equal(b["seg_bev"].numpy(), seg)
        np.testing.assert_array_equal(b["valid_bev"].numpy(), valid)
    assert len(seen) >= 3, f"flip combinations seen: {seen}"


def test_valid_masks_exactly_visibility_one(synthetic_root, cache):
    ds = _ds(synthetic_root, cache, split="train", target_raster="exact")
    found = False
    for i in range(len(ds)):
        out = ds[i]
        n = int(out["box_count"])
        vis = out["box_visibility"][:n].numpy()
        corners = out["box_corners"][:n].double().numpy()
        inv = targets.bev_targets(corners[vis == 1], corners[vis == 1].mean(1), vis[vis == 1], ds.vox)[0]
        np.testing.assert_array_equal(out["valid_bev"].numpy() == 0, inv > 0)
        found |= bool((inv > 0).any())
    assert found, "no visibility-1 vehicle in the grid in the synthetic train split"


def test_camera_selection(synthetic_root, cache):
    assert _ds(synthetic_root, cache, ncams=1)[0]["cam_ids"].tolist() == [1]
    assert _ds(synthetic_root, cache, ncams=3, refcam_id=4)[0]["cam_ids"].tolist() == [4, 0, 1]
    tr = _ds(synthetic_root, cache, is_train=True, ncams=3, res_scale=0.5)
    refs = set()
    for i in range(6):
        ids = tr[i]["cam_ids"].tolist()
        assert len(set(ids)) == 3
        refs.add(ids[0])
    assert len(refs) > 1, "do_shuffle_cams should vary the reference camera"
    every = _ds(synthetic_root, cache, is_train=True, res_scale=0.5)  # all six cameras
    ids = [every[i]["cam_ids"].tolist() for i in range(8)]
    assert all(sorted(x) == list(range(6)) for x in ids)
    assert len({x[0] for x in ids}) > 1, "do_shuffle_cams should vary the reference camera with ncams=6 too"
    fixed = _ds(synthetic_root, cache, is_train=True, ncams=3, do_shuffle_cams=False, res_scale=0.5)
    assert all(fixed[i]["cam_ids"][0] == 1 for i in range(4))


def test_augmentation_is_reproducible(synthetic_root, cache):
    ds = _ds(synthetic_root, cache, is_train=True, res_scale=0.5)
    a, b, c = ds[(2, 0)], ds[(2, 0)], ds[(2, 1)]
    for k in ("images", "pix_T_cams", "cams_T_ref", "seg_bev"):
        torch.testing.assert_close(a[k], b[k])
    assert not torch.equal(a["pix_T_cams"], c["pix_T_cams"])


def test_samplers_split_without_duplicates():
    n = 11
    val = [list(EpochSampler(n, False, False, r, 3)) for r in range(3)]
    got = sorted(i for part in val for i, _ in part)
    assert got == list(range(n))  # every sample once, no padding
    train = [EpochSampler(n, True, True, r, 3, seed=5) for r in range(3)]
    for s in train:
        s.set_epoch(4)
    parts = [[i for i, _ in s] for s in train]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 9 and all(len(p) == 3 for p in parts)
    s = EpochSampler(n, True, True, seed=5)
    s.set_epoch(7)
    e7 = list(s)
    assert all(e == 7 for _, e in e7)
    assert [i for i, _ in list(s)] != [i for i, _ in e7]  # auto-advanced to epoch 8
    s.set_epoch(7, skip=4)
    assert list(s) == e7[4:]


def test_loader_batches_and_worker_independence(synthetic_root, cache):
    ds = _ds(synthetic_root, cache, is_train=True, res_scale=0.5, split="train")
    l0 = make_loader(ds, batch_size=3, nworkers=0, shuffle=True, is_train=True, seed=1)
    l2 = make_loader(ds, batch_size=3, nworkers=2, shuffle=True, is_train=True, seed=1)
    assert len(l0) == len(ds) // 3
    for loader in (l0, l2):
        loader.sampler.set_epoch(2)
    b0 = list(l0)
    b2 = list(l2)
    assert len(b0) == len(b2) == len(ds) // 3
    assert b0[0]["images"].shape == (3, 6, 3, 112, 200)
    for x, y in zip(b0, b2):
        torch.testing.assert_close(x["images"], y["images"])
        torch.testing.assert_close(x["pix_T_cams"], y["pix_T_cams"])
    val = _ds(synthetic_root, cache, res_scale=0.5)
    seen = []
    for rank in range(2):
        for batch in make_loader(val, 3, 0, shuffle=False, is_train=False, rank=rank, world_size=2):
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(val)))


def test_clear_errors_for_missing_and_corrupt_files(synthetic_root, cache, tmp_path):
    ds = _ds(synthetic_root, cache, res_scale=0.5)
    rec = ds.records[0]
    rec["cams"]["CAM_BACK"]["path"] = "samples/CAM_BACK/gone.jpg"
    ds.records = index.PackedRecords([rec])
    with pytest.raises(SampleReadError, match=rf"{rec['token']}.*CAM_BACK.*gone\.jpg"):
        ds[0]
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    rec["cams"]["CAM_BACK"]["path"] = str(bad)
    ds.records = index.PackedRecords([rec])
    with pytest.raises(SampleReadError, match="corrupt.jpg"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="v1.0-mini"):
        _ds(tmp_path, cache)


@pytest.mark.parametrize(
    "bad,error,message",
    [
        (dict(target_raster="fillpoly"), ValueError, "target_raster='fillpoly': use one of"),
        (dict(seqlen=2), NotImplementedError, "seqlen=2: only single frames"),
        (dict(ncams=-1), ValueError, "ncams=-1 must be >= 0"),
        (dict(use_metaradar=True), ValueError, "use_metaradar needs use_radar=True"),
        (dict(radar_features="dense"), ValueError, "radar_features='dense'; valid: simplebev, rich"),
        (dict(nsweeps=0), ValueError, "nsweeps=0 must be >= 1"),
        (dict(compat="sb"), ValueError, "compat='sb'; valid: none, simplebev"),
        (dict(bad_samples="ignore"), ValueError, r"bad_samples='ignore' must be one of \['stop', 'skip'\]"),
    ],
)
def test_settings_are_checked_before_the_index_is_read(tmp_path, bad, error, message):
    """A data section the dataset cannot use (one built without flag validation, e.g. by replace) is
    refused by name, before any file is opened: data_dir does not even exist."""
    data = DataConfig.make(data_dir=str(tmp_path / "absent"), dset="mini").replace(**bad)
    with pytest.raises(error, match=message):
        NuScenesBEVDataset(data, split="val", is_train=False)


@pytest.mark.parametrize("bad, message", [(dict(ncams=7), "ncams=7 must be in 1..6 (0 = all)"),
                                         (dict(refcam_id=6), "refcam_id=6 must index the 6 camera(s)")])
def test_camera_settings_are_checked_against_the_rig(synthetic_root, tmp_path, bad, message):
    """ncams and refcam_id are bounded by the rig the index found (nuScenes' six here), named in the error."""
    from bevtrain.data.dataset import RigError

    with pytest.raises(RigError) as e:
        _ds(synthetic_root, tmp_path, **bad)
    assert message in str(e.value) and ", ".join(CAMERA_NAMES) in str(e.value)


def test_ref_T_ego_is_the_lidar_keyframe_ego_pose_in_the_reference_frame(synthetic_root, tmp_path):
    """ref_T_ego (the ego origin and heading for the distance bands and the BEV drawings) maps the ego
    frame at the LIDAR_TOP keyframe, Simple-BEV's sample ego, into the reference frame: checked
    against the devkit's ego_pose and calibrated_sensor tables."""
    import json
    import shutil

    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    # The synthetic cameras capture 0-43 ms before the LIDAR_TOP keyframe, a few decimetres away (none
    # when the car stands still); move the LIDAR_TOP keyframes' ego poses further (1.5 m, 3 degrees of
    # yaw) in a copy so that the two poses differ in every sample.
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    tables = root / "v1.0-mini"
    lidar_poses = {r["ego_pose_token"] for r in json.loads((tables / "sample_data.json").read_text())
                   if r["is_key_frame"] and "/LIDAR_TOP/" in r["filename"]}
    poses = json.loads((tables / "ego_pose.json").read_text())
    yaw = Quaternion(axis=[0, 0, 1], degrees=3)
    for rec in poses:
        if rec["token"] in lidar_poses:
            x, y, z = rec["translation"]
            rec["translation"] = [x + 1.2, y - 0.9, z]
            rec["rotation"] = list((yaw * Quaternion(rec["rotation"])).elements)
    (tables / "ego_pose.json").write_text(json.dumps(poses))
    nusc = NuScenes("v1.0-mini", dataroot=str(root), verbose=False)

    def pose(table, token):
        rec = nusc.get(table, token)
        return transform_matrix(rec["translation"], Quaternion(rec["rotation"]))

    ds = _ds(root, tmp_path / "cache")  # validation: CAM_FRONT is the reference camera, no flips
    for i in (0, len(ds) - 1):
        out = ds[i]
        sample = nusc.get("sample", out["sample_token"])
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        front = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
        global_T_cam = pose("ego_pose", front["ego_pose_token"]) @ pose(
            "calibrated_sensor", front["calibrated_sensor_token"])
        # the reference frame is tied to CAM_FRONT at its own timestamp by cams_T_ref[0]
        ref_T_cam = np.linalg.inv(out["cams_T_ref"][0].double().numpy())
        ref_T_global = ref_T_cam @ np.linalg.inv(global_T_cam)
        expected = ref_T_global @ pose("ego_pose", lidar["ego_pose_token"])
        np.testing.assert_allclose(out["ref_T_ego"].double().numpy(), expected, atol=1e-4, rtol=0)
        # the ego at the camera's timestamp is elsewhere (so the check above can fail)
        at_camera = ref_T_global @ pose("ego_pose", front["ego_pose_token"])
        assert np.abs(at_camera - expected)[:3, 3].max() > 0.5


def _table_pose(nusc, table: str, token: str) -> np.ndarray:
    """4x4 of an ego_pose or calibrated_sensor row, as the devkit reads it."""
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    rec = nusc.get(table, token)
    return transform_matrix(rec["translation"], Quaternion(rec["rotation"]))


def _capture_poses(nusc, sample_token: str, cam_ids):
    """From the devkit's tables, per camera slot: ego_T_cam (calibration) and global_T_ego at that
    camera's own capture; and global_T_ego at the LIDAR_TOP keyframe."""
    sample = nusc.get("sample", sample_token)
    sds = [nusc.get("sample_data", sample["data"][CAMERA_NAMES[c]]) for c in cam_ids]
    ego_T_cams = [_table_pose(nusc, "calibrated_sensor", sd["calibrated_sensor_token"]) for sd in sds]
    global_T_egos = [_table_pose(nusc, "ego_pose", sd["ego_pose_token"]) for sd in sds]
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    return ego_T_cams, global_T_egos, _table_pose(nusc, "ego_pose", lidar["ego_pose_token"])


def test_compat_cams_T_ref_is_simplebevs_static_rig(synthetic_root, cache, nusc):
    """compat=simplebev: cams_T_ref = inv(ego_T_camX) @ ego_T_cam0 then the BEV mirror, from the
    calibration alone (Simple-BEV's get_camM_T_camXs), although every synthetic camera captures at
    its own time and ego pose; in validation, and in training with flips and shuffled cameras."""
    mirrored = 0
    for split, is_train, samples in (("val", False, None), ("train", True, range(6))):
        ds = _ds(synthetic_root, cache, split=split, is_train=is_train, compat="simplebev", seed=5)
        for i in samples or range(len(ds)):
            out = ds[i]
            draw = ds.draw_augmentation(i, ds.epoch)
            mirror = np.diag([-1.0 if draw.flip_x else 1.0, 1.0, -1.0 if draw.flip_z else 1.0, 1.0])
            mirrored += draw.flip_x or draw.flip_z
            ego_T_cams, _, _ = _capture_poses(nusc, out["sample_token"], out["cam_ids"].tolist())
            want = np.stack([np.linalg.inv(e) @ ego_T_cams[0] @ mirror for e in ego_T_cams])
            np.testing.assert_allclose(out["cams_T_ref"].double().numpy(), want, atol=2e-6, rtol=0)
    assert mirrored > 0, "expected some mirrored training samples"


@pytest.mark.parametrize("raster", ["simplebev", "exact"])
def test_cams_T_ref_places_each_camera_at_its_own_capture_pose(synthetic_root, cache, nusc, raster):
    """compat=none: each camera at its own capture's ego pose; the reference frame is the reference
    camera on the LIDAR_TOP keyframe's ego pose (simplebev raster) or at its own capture (exact), all
    from the devkit's tables. On the synthetic set, whose cameras fire 0-43 ms before the lidar, this
    differs from compat's static rig by the ego motion between the captures."""
    ds = _ds(synthetic_root, cache, target_raster=raster)
    static = _ds(synthetic_root, cache, target_raster=raster, compat="simplebev")
    largest = 0.0
    for i in range(len(ds)):
        out = ds[i]
        ego_T_cams, global_T_egos, global_T_lidar_ego = _capture_poses(
            nusc, out["sample_token"], out["cam_ids"].tolist())
        global_T_cams = [g @ e for g, e in zip(global_T_egos, ego_T_cams)]
        global_T_ref = (global_T_lidar_ego @ ego_T_cams[0]) if raster == "simplebev" else global_T_cams[0]
        want = np.stack([np.linalg.inv(g) @ global_T_ref for g in global_T_cams])
        np.testing.assert_allclose(out["cams_T_ref"].double().numpy(), want, atol=1e-5, rtol=0)
        largest = max(largest, float((out["cams_T_ref"] - static[i]["cams_T_ref"]).abs().max()))
    assert largest > 0.1, "the two placements should differ by the ego motion between captures (m)"
