"""Our lidar/radar readers and sweep accumulation against the devkit's own classes."""

import numpy as np
import pytest

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
