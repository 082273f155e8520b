"""Our lidar/radar readers and sweep accumulation against the devkit's own classes."""

import numpy as np
import pytest
import torch
from conftest import make_dataset

from bevtrain.data import index, points

NSWEEPS = 3


# -- no data needed -----------------------------------------------------------------------------------
def test_lidar_reader_roundtrip(tmp_path):
    pts = np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32)
    path = tmp_path / "x.pcd.bin"
    pts.tofile(path)
    np.testing.assert_array_equal(points.read_lidar(str(path)), pts[:, :4])
    (tmp_path / "bad.pcd.bin").write_bytes(b"\0" * 6)
    with pytest.raises(points.PointFileError, match="bad.pcd.bin"):
        points.read_lidar(str(tmp_path / "bad.pcd.bin"))


def test_corrupt_radar_names_file(tmp_path):
    p = tmp_path / "r.pcd"
    p.write_bytes(b"# .PCD v0.7\nVERSION 0.7\nFIELDS x\n")
    with pytest.raises(points.PointFileError, match="r.pcd"):
        points.read_radar(str(p))
    with pytest.raises(points.PointFileError, match="missing.pcd"):
        points.read_radar(str(tmp_path / "missing.pcd"))


def test_mirror_points_flips_positions_and_ref_velocities():
    p = np.arange(2 * 19, dtype=np.float32).reshape(2, 19)
    m = points.mirror_points(p, flip_x=True, flip_z=False, metaradar=True)
    assert (m[:, [0, 6, 8]] == -p[:, [0, 6, 8]]).all()
    assert (np.delete(m, [0, 6, 8], axis=1) == np.delete(p, [0, 6, 8], axis=1)).all()
    m = points.mirror_points(p[:, :4], flip_x=False, flip_z=True)
    assert (m[:, 2] == -p[:, 2]).all() and (m[:, [0, 1, 3]] == p[:, [0, 1, 3]]).all()


def test_pad_points():
    padded, n = points.pad_points(np.ones((5, 3), np.float32), 8)
    assert padded.shape == (8, 3) and n == 5 and padded[5:].sum() == 0
    padded, n = points.pad_points(np.ones((9, 3), np.float32), 8)
    assert padded.shape == (8, 3) and n == 8


# -- on the synthetic set, against the devkit ---------------------------------------------------------
@pytest.fixture(scope="module")
def nusc(synthetic_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)


@pytest.fixture(scope="module")
def records(synthetic_root, tmp_path_factory):
    recs, _ = index.load_index(
        synthetic_root,
        "mini",
        "val",
        nsweeps=NSWEEPS,
        cache_dir=tmp_path_factory.mktemp("idx"),
        verbose=False,
    )
    return recs


def _ref_T_global(rec, cam="CAM_FRONT"):
    c = rec["cams"][cam]
    return np.linalg.inv(c["global_T_ego"] @ c["ego_T_cam"])


def _sample_with_history(records):
    """The last sample of a scene: it has NSWEEPS sweeps behind it on every channel."""
    rec = records[len(records) - 1]
    assert all(len(s["paths"]) == NSWEEPS for s in rec["sweeps"].values()), "synthetic set lacks sweeps"
    return rec


def test_lidar_multisweep_matches_devkit(synthetic_root, nusc, records):
    from nuscenes.utils.data_classes import LidarPointCloud

    rec = _sample_with_history(records)
    ours = points.accumulate_lidar(
        str(synthetic_root), rec["sweeps"]["LIDAR_TOP"], _ref_T_global(rec), NSWEEPS, min_distance=2.2
    )
    sample = nusc.get("sample", rec["token"])
    pc, times = LidarPointCloud.from_file_multisweep(
        nusc, sample, "LIDAR_TOP", "CAM_FRONT", nsweeps=NSWEEPS, min_distance=2.2
    )
    assert len(np.unique(times)) == NSWEEPS
    assert ours.shape == (pc.nbr_points(), 4)
    np.testing.assert_allclose(ours[:, :3], pc.points[:3].T, atol=2e-3)
    np.testing.assert_allclose(ours[:, 3], pc.points[3], atol=1e-6)
    # Fewer sweeps are a prefix of more sweeps (newest first).
    one = points.accumulate_lidar(str(synthetic_root), rec["sweeps"]["LIDAR_TOP"], _ref_T_global(rec), 1)
    assert 0 < len(one) < len(ours)
    np.testing.assert_array_equal(one, ours[: len(one)])


@pytest.mark.parametrize("use_filters", [False, True])
def test_radar_multisweep_matches_devkit(synthetic_root, nusc, records, use_filters):
    from nuscenes.utils.data_classes import RadarPointCloud

    rec = _sample_with_history(records)
    chans = [(c, rec["sweeps"][c]) for c in index.RADAR_NAMES]
    ref_time = rec["cams"]["CAM_FRONT"]["timestamp"]
    ours = points.accumulate_radar(
        str(synthetic_root), chans, _ref_T_global(rec), NSWEEPS, ref_time, use_filters, metaradar=True
    )
    sample = nusc.get("sample", rec["token"])
    try:
        RadarPointCloud.default_filters() if use_filters else RadarPointCloud.disable_filters()
        theirs, lags = [], []
        for chan in index.RADAR_NAMES:
            pc, times = RadarPointCloud.from_file_multisweep(
                nusc, sample, chan, "CAM_FRONT", nsweeps=NSWEEPS, min_distance=2.2
            )
            theirs.append(pc.points.T)
            lags.append(times[0])
    finally:
        RadarPointCloud.default_filters()
    theirs = np.concatenate(theirs)
    assert ours.shape == (len(theirs), 3 + len(points.METARADAR_FEATURES)) and len(theirs) > 0
    np.testing.assert_allclose(ours[:, :3], theirs[:, :3], atol=2e-3)
    np.testing.assert_allclose(ours[:, 3:6], theirs[:, 3:6], rtol=1e-6)  # dyn_prop, id, rcs
    np.testing.assert_allclose(ours[:, 10:18], theirs[:, 10:18], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[:, -1], np.concatenate(lags), atol=1e-6)
    # Velocity magnitudes survive the rotation into the ref frame (radar velocities are planar).
    np.testing.assert_allclose(
        np.hypot(ours[:, 6], ours[:, 7]), np.hypot(theirs[:, 6], theirs[:, 7]), rtol=1e-3, atol=1e-3
    )


def test_radar_filters_change_counts_like_devkit(synthetic_root, nusc, records):
    from nuscenes.utils.data_classes import RadarPointCloud

    rec = _sample_with_history(records)
    counts = {}
    for on in (False, True):
        for chan in index.RADAR_NAMES:
            path = f"{synthetic_root}/{rec['sweeps'][chan]['paths'][0]}"
            ours = points.read_radar(path, points.FILTERS_ON if on else points.FILTERS_OFF)
            try:
                RadarPointCloud.default_filters() if on else RadarPointCloud.disable_filters()
                theirs = RadarPointCloud.from_file(path).points.T
            finally:
                RadarPointCloud.default_filters()
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
            counts[on, chan] = len(ours)
    total_on = sum(v for (on, _), v in counts.items() if on)
    total_off = sum(v for (on, _), v in counts.items() if not on)
    assert total_on < total_off, "the synthetic radar should contain points the default filters drop"


# -- radar_features='simplebev': Simple-BEV's radar input, recomputed the way its code does it ----------
def _simplebev_radar_reference(nusc, sample_token, nsweeps, metaradar, vox):
    """Simple-BEV's nuscenesdataset.get_radar_data + padding, then train_nuscenes.run_model's map to the
    reference camera (CAM_FRONT at validation) and vox.voxelize_xyz(_and_feats), written out with the
    devkit, one point at a time in list order (Simple-BEV shuffles first; the last write wins).
    Returns the compressor input (k, Z, X) in bevtrain's fold order (channel y*16 + c)."""
    import os

    from nuscenes.utils.data_classes import RadarPointCloud
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    sample = nusc.get("sample", sample_token)
    ref_sd = nusc.get("sample_data", sample["data"]["RADAR_FRONT"])
    ref_pose = nusc.get("ego_pose", ref_sd["ego_pose_token"])
    ref_time = 1e-6 * ref_sd["timestamp"]
    car_from_global = transform_matrix(
        ref_pose["translation"], Quaternion(ref_pose["rotation"]), inverse=True
    )
    pts = np.zeros((19, 0))
    RadarPointCloud.disable_filters()
    try:
        for chan in ("RADAR_BACK_RIGHT", "RADAR_BACK_LEFT", "RADAR_FRONT", "RADAR_FRONT_LEFT",
                     "RADAR_FRONT_RIGHT"):
            sd = nusc.get("sample_data", sample["data"][chan])
            for _ in range(nsweeps):
                pc = RadarPointCloud.from_file(os.path.join(nusc.dataroot, sd["filename"]))
                pc.remove_close(2.2)
                pose = nusc.get("ego_pose", sd["ego_pose_token"])
                cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
                global_from_car = transform_matrix(pose["translation"], Quaternion(pose["rotation"]))
                car_from_current = transform_matrix(cs["translation"], Quaternion(cs["rotation"]))
                pc.transform(car_from_global @ global_from_car @ car_from_current)
                times = (ref_time - 1e-6 * sd["timestamp"]) * np.ones((1, pc.nbr_points()))
                pts = np.concatenate([pts, np.concatenate([pc.points, times])], 1)
                if sd["prev"] == "":
                    break
                sd = nusc.get("sample_data", sd["prev"])
    finally:
        RadarPointCloud.default_filters()
    V = 700 * nsweeps
    assert pts.shape[1] < V
    pts = np.pad(pts, [(0, 0), (0, V - pts.shape[1])])  # zero rows: the ego origin
    rad = torch.Tensor(pts).T  # (V, 19) float32, as Simple-BEV's torch.Tensor(...)

    cam_sd = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
    cs = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
    cam_T_ego = torch.Tensor(np.linalg.inv(transform_matrix(cs["translation"], Quaternion(cs["rotation"]))))
    xyz = rad[:, :3] @ cam_T_ego[:3, :3].T + cam_T_ego[:3, 3]
    feats = rad[:, 3:]

    Z, Y, X = vox.Z, vox.Y, vox.X
    lo = torch.tensor([vox.xmin, vox.ymin, vox.zmin])
    size = torch.tensor([vox.vox_size_x, vox.vox_size_y, vox.vox_size_z])
    mem = (xyz - lo - size / 2) / size  # Simple-BEV's mem_T_ref
    zero = (torch.zeros(3) - lo - size / 2) / size
    dims = torch.tensor([X, Y, Z])
    ok = ((mem > -0.5) & (mem < dims - 0.5)).all(1) & (mem[:, 2] != 0) & ((mem - zero).norm(dim=1) >= 0.1)
    occ = torch.zeros(Z, Y, X)
    grid = torch.zeros(16, Z, Y, X)
    hits = {}
    for i in range(V):
        x, y, z = (int(v) for v in torch.round(mem[i] * ok[i]))
        occ[z, y, x] = 1.0
        grid[:, z, y, x] = feats[i] * ok[i]
        hits[z, y, x] = hits.get((z, y, x), 0) + int(ok[i])
    occ[0, 0, 0] = 0.0
    grid[:, 0, 0, 0] = 0.0
    shared = sum(1 for k, n in hits.items() if n > 1 and k != (0, 0, 0))
    if metaradar:
        return grid.permute(2, 0, 1, 3).reshape(Y * 16, Z, X), shared
    return occ.amax(dim=1)[None], shared


@pytest.mark.parametrize("metaradar", [False, True])
def test_simplebev_radar_input_equals_simple_bevs_rule(synthetic_root, nusc, tmp_path_factory, metaradar):
    from bevtrain.config import ModelConfig
    from bevtrain.model import Segnet

    radar = dict(use_radar=True, use_metaradar=metaradar, radar_features="simplebev")
    ds = make_dataset(synthetic_root, "val", False, res_scale=0.25, nsweeps=NSWEEPS,
                      cache_dir=tmp_path_factory.mktemp("idx"), **radar)
    model = Segnet(ModelConfig.make(encoder_type="res18", encoder_weights="none", latent_dim=8, **radar))
    vox = model.vox_util  # the paper grid 200 x 8 x 200 (flag defaults)
    assert vox.grid_shape == (200, 8, 200)
    assert model.point_bev_channels() == (16 * vox.Y if metaradar else 1)  # Simple-BEV's compressor input
    assert model.bev_compressor[0].in_channels == 8 * vox.Y + (16 * vox.Y if metaradar else 1)
    shared_total = 0
    for i in (len(ds) - 1, 0):  # a sample with full sweep history, and one at a scene start
        sample = ds[i]
        with torch.no_grad():
            (ours,) = model.point_bev_inputs(sample["radar"][None], sample["radar_count"][None])
        want, shared = _simplebev_radar_reference(nusc, sample["sample_token"], NSWEEPS, metaradar, vox)
        shared_total += shared
        assert ours.shape == (1,) + tuple(want.shape)
        assert want.abs().sum() > 0
        torch.testing.assert_close(ours[0], want, rtol=0, atol=0)
    if metaradar:
        assert shared_total > 0, "no voxel holds two radar points: the last-write rule went untested"


def test_simplebev_radar_mirror_moves_points_not_features(synthetic_root, tmp_path_factory):
    """Simple-BEV flips the radar grid with the BEV features and leaves the values alone."""
    cache = tmp_path_factory.mktemp("idx")
    kw = dict(res_scale=0.25, nsweeps=2, ncams=1, use_radar=True, use_metaradar=True,
              radar_features="simplebev", cache_dir=cache)
    val = make_dataset(synthetic_root, "val", False, **kw)
    train = make_dataset(synthetic_root, "val", True, do_shuffle_cams=False, rand_crop_and_resize=False, **kw)
    flipped = 0
    for i in range(len(val)):
        a, b = val[i], train[i]
        m = np.round(np.diag(b["cams_T_ref"][0].numpy())).astype(np.float32)
        n = int(a["radar_count"])
        assert n == int(b["radar_count"]) > 0
        pa, pb = a["radar"][:n].numpy(), b["radar"][:n].numpy()
        np.testing.assert_allclose(pb[:, :3], pa[:, :3] * m[:3], atol=1e-4)
        np.testing.assert_array_equal(pb[:, 3:], pa[:, 3:])
        flipped += int((m[:3] < 0).any())
    assert flipped > 0
