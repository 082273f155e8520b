"""The conventions check (verify --conventions) on the synthetic set and on broken copies of it.

Each copy has its own tables (v1.0-mini/*.json rewritten as a faulty converter would write them) and
symlinks to the synthetic set's samples/, sweeps/ and maps/, so a break costs only the tables."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bevtrain.data import conventions, verify

VERSION = "v1.0-mini"


def _rotmat(q):
    return conventions.quats_to_rotmats(np.asarray(q, np.float64)[None])[0]


def _quat_trace(R):
    """w, x, y, z from a 3x3 matrix by the textbook trace formula, as converters write it: no check that
    R is a rotation and no normalisation (w from the trace, x, y, z from the skew part)."""
    w = math.sqrt(max(1e-12, 1.0 + np.trace(R))) / 2
    return [w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)]


def _quat_of(R):
    """w, x, y, z of a proper rotation (Shepperd: the largest of w, x, y, z first)."""
    t = np.trace(R)
    m = np.array([t, R[0, 0], R[1, 1], R[2, 2]]).argmax()
    if m == 0:
        return _quat_trace(R)
    i, j, k = [(0, 1, 2), (1, 2, 0), (2, 0, 1)][m - 1]
    s = math.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k]) * 2
    q = np.zeros(4)
    q[0] = (R[k, j] - R[j, k]) / s
    q[1 + i] = s / 4
    q[1 + j] = (R[j, i] + R[i, j]) / s
    q[1 + k] = (R[k, i] + R[i, k]) / s
    return q.tolist()


def broken_copy(root: Path, dst: Path, edit) -> Path:
    """A copy of the synthetic set whose tables ``edit(tables)`` changes in place."""
    (dst / VERSION).mkdir(parents=True)
    for name in ("samples", "sweeps", "maps"):
        (dst / name).symlink_to(root / name)
    tables = {p.stem: json.loads(p.read_text()) for p in (root / VERSION).glob("*.json")}
    edit(tables)
    for name, rows in tables.items():
        (dst / VERSION / f"{name}.json").write_text(json.dumps(rows))
    return dst


def _camera_calibs(tables):
    cams = {s["token"] for s in tables["sensor"] if s["modality"] == "camera"}
    return [c for c in tables["calibrated_sensor"] if c["sensor_token"] in cams]


def transposed_camera_rotation(tables):
    for c in _camera_calibs(tables):
        w, x, y, z = c["rotation"]
        c["rotation"] = [w, -x, -y, -z]  # the inverse rotation: cam_T_ego's where ego_T_cam's belongs


def quaternion_xyzw(tables):
    for row in tables["calibrated_sensor"] + tables["ego_pose"]:
        w, x, y, z = row["rotation"]
        row["rotation"] = [x, y, z, w]


def y_up_ego(tables):
    # new ego axes: x forward, y up, z right (old z -> new y, old y -> new -z)
    new_T_old = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    for c in tables["calibrated_sensor"]:
        c["rotation"] = _quat_of(new_T_old @ _rotmat(c["rotation"]))
        c["translation"] = (new_T_old @ np.asarray(c["translation"])).tolist()
    for e in tables["ego_pose"]:
        e["rotation"] = _quat_of(_rotmat(e["rotation"]) @ new_T_old.T)


def intrinsics_x2(tables):
    for c in _camera_calibs(tables):
        k = np.asarray(c["camera_intrinsic"])
        k[:2] *= 2  # the K of the 3200x1800 originals, the JPEGs stored at 1600x900
        c["camera_intrinsic"] = k.tolist()


def boxes_in_ego(tables):
    sensors = {s["token"]: s for s in tables["sensor"]}
    calib = {c["token"]: c for c in tables["calibrated_sensor"]}
    ego = {e["token"]: e for e in tables["ego_pose"]}
    pose = {}
    for sd in tables["sample_data"]:
        channel = sensors[calib[sd["calibrated_sensor_token"]]["sensor_token"]]["channel"]
        if sd["is_key_frame"] and channel == "LIDAR_TOP":
            pose[sd["sample_token"]] = ego[sd["ego_pose_token"]]
    for a in tables["sample_annotation"]:
        e = pose[a["sample_token"]]
        R = _rotmat(e["rotation"])
        a["translation"] = (R.T @ (np.asarray(a["translation"]) - e["translation"])).tolist()
        a["rotation"] = _quat_of(R.T @ _rotmat(a["rotation"]))


def _keyframe_sample(tables, k=2):
    scene = tables["scene"][0]
    token = scene["first_sample_token"]
    by = {s["token"]: s for s in tables["sample"]}
    for _ in range(k):
        token = by[token]["next"]
    return by[token]


def jumping_ego_pose(tables):
    sample = _keyframe_sample(tables)
    ego = {e["token"]: e for e in tables["ego_pose"]}
    for sd in tables["sample_data"]:
        if sd["sample_token"] == sample["token"] and sd["is_key_frame"]:
            ego[sd["ego_pose_token"]]["translation"][0] += 40.0  # 40 m in half a second


def timestamps_out_of_order(tables):
    sample = _keyframe_sample(tables, 1)
    nxt = next(s for s in tables["sample"] if s["token"] == sample["next"])
    sample["timestamp"], nxt["timestamp"] = nxt["timestamp"], sample["timestamp"]


def negative_det_rotation(tables):
    # a left-handed (UE4-style) ego frame: y flipped on the camera's axes only, det -1, through the trace
    # formula. One camera is enough for the check to name it.
    mirror = np.diag([1.0, -1.0, 1.0])
    for c in _camera_calibs(tables):
        q = _quat_trace(_rotmat(c["rotation"]) @ mirror)
        # for a mounting whose mirror is a 120 deg rotation the formula happens to give |q| = 1: that camera
        # is named by the mounting check instead (its image y then points up)
        if abs(np.linalg.norm(q) - 1) > 0.01:
            c["rotation"] = q
            return
    raise AssertionError("no camera whose mirrored rotation gives a non-unit quaternion")


BREAKS = {
    "transposed camera rotation": (transposed_camera_rotation, "mounting", "transposed"),
    "quaternion x, y, z, w": (quaternion_xyzw, "gravity", "x, y, z, w"),
    "y-up ego frame": (y_up_ego, "gravity", "y-up"),
    "intrinsics of a 2x image": (intrinsics_x2, "intrinsics", "3200x1800"),
    "boxes in the ego frame": (boxes_in_ego, "box_unseen", "ego"),
    "jumping ego pose": (jumping_ego_pose, "ego_jump", "m and 0 deg in 0.5"),
    "timestamps out of order": (timestamps_out_of_order, "timestamps", ""),
    "negative-det rotation": (negative_det_rotation, "rotation", "det -1"),
}


def test_synthetic_set_passes(synthetic_root, tmp_path, capsys):
    rc = verify.main(["--conventions", f"--data_dir={synthetic_root}", "--dset=mini", "--pictures=2",
                      f"--pictures_dir={tmp_path / 'pics'}", f"--cache_dir={tmp_path / 'cache'}"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "all conventions hold" in text
    pics = sorted((tmp_path / "pics").glob("*.png"))
    assert len(pics) == 2
    from bevtrain.viz import read_png

    img = read_png(pics[0])
    assert img.shape[1] == 1200 and img.std() > 10  # cameras drawn, not a blank canvas


@pytest.mark.parametrize("name", list(BREAKS))
def test_broken_copy_is_named(synthetic_root, tmp_path, name):
    edit, check, cause = BREAKS[name]
    root = broken_copy(Path(synthetic_root), tmp_path / "broken", edit)
    summary = conventions.check_conventions(root, VERSION)
    found = summary["findings"].get(check, [])
    assert found, f"{name}: {check} not named; findings: {summary['counts']}"
    text = " ".join(f["found"] + " " + f["cause"] for f in found)
    assert cause in text, text
    for f in found:
        assert f["table"] and f["token"] and f["expected"] and f["found"] and f["cause"]
    assert check in conventions.format_conventions(summary)


def test_pictures_dir_holds_only_pictures(synthetic_root, tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    paths = conventions.write_pictures(synthetic_root, "mini", "val", 1, tmp_path / "p", tmp_path / "cache")
    assert [Path(p).suffix for p in paths] == [".png"]
