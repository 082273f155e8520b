"""Numeric checks that a nuScenes-format dataroot follows nuScenes' conventions (issue 24).

    python -m bevtrain.data.verify --conventions --data_dir=DIR --dset=mini [--pictures=4]

A converted dataset (CARLA, a car's own rig) that breaks a convention still trains, on noise. The
conventions (nuScenes; DESIGN.md section 12):

- ``calibrated_sensor`` holds sensor -> ego (translation, rotation as a w, x, y, z unit quaternion),
  ``ego_pose`` ego -> global, ``sample_annotation`` boxes in global;
- ego frame x forward, y left, z up, origin on the ground (rear axle); global z up;
- camera frame x right, y down, z forward (optical axis); pixel centres at integer coordinates, so a
  principal point near ((W - 1) / 2, (H - 1) / 2) and inside the image of the JPEG's size.

Each check reads the tables as plain JSON (vectorised over rows; the devkit is not needed) and
gives findings ``dict(check, table, token, expected, found, cause)``; the summary counts them per
check and lists the first few. Pictures (``pictures``) go through the real dataset and viz.py.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from bevtrain.data import augment, points

CHECK_TITLES = {
    "rotation": "rotation not proper (non-unit quaternion, det != +1)",
    "gravity": "gravity axis not ego/global z",
    "mounting": "sensor height or mounting angle implausible for a road vehicle",
    "intrinsics": "intrinsics do not fit the image",
    "box_unseen": "annotated box that no camera sees",
    "box_height": "annotated box below the ground or far above it",
    "ego_jump": "ego pose jumps between consecutive keyframes",
    "lidar_ground": "lidar ground not near z = 0 in the ego frame",
    "timestamps": "timestamps out of order",
}
QUAT_TOL = 1e-3  # nuScenes' quaternions are unit to ~1e-7
TILT_MAX_DEG = 35.0  # camera y (down) vs -ego z; road cameras are mounted within a few degrees of level
GRAVITY_MAX_DEG = 20.0  # ego z vs global z; steeper than any road (a 36 % grade)
HEIGHT_RANGE_M = (0.1, 4.5)  # sensor mounting height above the ground, car to truck
REACH_M = 15.0  # sensor lateral / longitudinal offset from the ego origin, articulated trucks included
PP_CENTRE_FRACTION = 0.25  # principal point within 25 % of the image size of its centre
BOX_BELOW_M, BOX_ABOVE_M, BOX_GRADE = 1.0, 3.0, 0.1  # box bottom vs ego ground, plus 10 % of its distance
MAX_SPEED_MS, MAX_YAW_RATE = 60.0, 3.0  # m/s, rad/s between keyframes
LIDAR_GROUND_TOL_M = 0.5
SEE_RANGE_M = 150.0  # a camera "sees" a box corner up to this depth; annotations need lidar returns
LIDAR_RANGE_M = (3.0, 25.0)


# -- small vectorised helpers ------------------------------------------------------------------------
def quats_to_rotmats(q_wxyz: np.ndarray) -> np.ndarray:
    """(N, 4) w, x, y, z (normalised here) -> (N, 3, 3) rotation matrices."""
    q = q_wxyz / np.linalg.norm(q_wxyz, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    r = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1)  # fmt: skip
    return r.reshape(q.shape[:-1] + (3, 3))


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _load(table_dir: Path, name: str) -> list:
    path = table_dir / f"{name}.json"
    if not path.is_file():
        return []
    with open(path) as f:
        return json.load(f)


def _arr(rows: list, key: str, n: int) -> np.ndarray:
    return np.asarray([r[key] for r in rows], np.float64).reshape(len(rows), n)


def _finding(check, table, token, expected, found, cause) -> dict:
    return dict(check=check, table=table, token=token, expected=expected, found=found, cause=cause)


def _fmt(v: np.ndarray, digits: int = 3) -> str:
    return "(" + ", ".join(f"{x:.{digits}g}" for x in np.asarray(v).ravel()) + ")"


# -- tables, joined once -----------------------------------------------------------------------------
class Tables:
    """The rows the checks need, as numpy arrays indexed by row; tokens mapped to rows once."""

    def __init__(self, dataroot: Path, version: str):
        d = Path(dataroot) / version
        self.dataroot = Path(dataroot)
        self.sensor = {r["token"]: r for r in _load(d, "sensor")}
        self.calib = _load(d, "calibrated_sensor")
        self.ego = _load(d, "ego_pose")
        self.sample = _load(d, "sample")
        self.sd = _load(d, "sample_data")
        self.ann = _load(d, "sample_annotation")
        self.scene = _load(d, "scene")
        self.calib_idx = {r["token"]: i for i, r in enumerate(self.calib)}
        self.ego_idx = {r["token"]: i for i, r in enumerate(self.ego)}
        self.sample_idx = {r["token"]: i for i, r in enumerate(self.sample)}
        self.sd_idx = {r["token"]: i for i, r in enumerate(self.sd)}
        self.calib_q = _arr(self.calib, "rotation", 4)
        self.calib_t = _arr(self.calib, "translation", 3)
        self.calib_R = quats_to_rotmats(self.calib_q)
        self.ego_q = _arr(self.ego, "rotation", 4)
        self.ego_t = _arr(self.ego, "translation", 3)
        self.ego_R = quats_to_rotmats(self.ego_q)
        sensors = [self.sensor.get(r["sensor_token"], {}) for r in self.calib]
        self.calib_channel = [s.get("channel", "?") for s in sensors]
        self.calib_modality = [s.get("modality", "?") for s in sensors]
        sd = self.sd
        self.sd_calib = np.array([self.calib_idx.get(r["calibrated_sensor_token"], -1) for r in sd], np.int64)
        self.sd_ego = np.array([self.ego_idx.get(r["ego_pose_token"], -1) for r in sd], np.int64)
        self.sd_sample = np.array([self.sample_idx.get(r["sample_token"], -1) for r in sd], np.int64)
        self.sd_key = np.array([bool(r.get("is_key_frame")) for r in sd])
        self.sd_ts = np.array([r["timestamp"] for r in sd], np.int64)
        self.sample_ts = np.array([r["timestamp"] for r in self.sample], np.int64)
        scene_idx = {r["token"]: i for i, r in enumerate(self.scene)}
        self.sample_scene = np.array([scene_idx.get(r["scene_token"], -1) for r in self.sample], np.int64)

    def global_T_sensor(self, sd_rows: np.ndarray) -> np.ndarray:
        """(N, 4, 4) sensor -> global of sample_data rows (global_T_ego @ ego_T_sensor)."""
        c, e = self.sd_calib[sd_rows], self.sd_ego[sd_rows]
        m = np.tile(np.eye(4), (len(sd_rows), 1, 1))
        m[:, :3, :3] = self.ego_R[e] @ self.calib_R[c]
        m[:, :3, 3] = (self.ego_R[e] @ self.calib_t[c][..., None])[..., 0] + self.ego_t[e]
        return m


def _inverse(m: np.ndarray) -> np.ndarray:
    out = np.tile(np.eye(4), m.shape[:-2] + (1, 1))
    rt = np.swapaxes(m[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -(rt @ m[..., :3, 3:4])[..., 0]
    return out


# -- checks ------------------------------------------------------------------------------------------
def check_rotations(t: Tables) -> List[dict]:
    out = []
    for table, rows, q in (("calibrated_sensor", t.calib, t.calib_q), ("ego_pose", t.ego, t.ego_q)):
        norm = np.linalg.norm(q, axis=1)
        for i in np.flatnonzero(~(np.abs(norm - 1.0) <= QUAT_TOL)):
            out.append(_finding(
                "rotation", table, rows[i]["token"], "a unit quaternion w, x, y, z (|q| = 1)",
                f"|q| = {norm[i]:.4g} for {_fmt(q[i], 4)}",
                "a rotation matrix with det -1 (a mirrored / left-handed frame such as UE4's, or one axis "
                "flipped) converted to a quaternion without a check, or a quaternion never normalised"))
    return out


def _mount_problem(R: np.ndarray, tr: np.ndarray, camera: bool) -> str:
    """Why ego_R_sensor / ego_t_sensor is implausible for a road vehicle ('' when plausible)."""
    why = []
    if not HEIGHT_RANGE_M[0] <= tr[2] <= HEIGHT_RANGE_M[1]:
        why.append(f"height z = {tr[2]:.2f} m")
    if np.abs(tr[:2]).max() > REACH_M:
        why.append(f"x, y = {tr[0]:.1f}, {tr[1]:.1f} m from the ego origin")
    # cameras: image y (down) along -ego z; lidar/radar: sensor z along ego z
    axis, want = (R[:, 1], np.array([0.0, 0.0, -1.0])) if camera else (R[:, 2], np.array([0.0, 0.0, 1.0]))
    tilt = float(_angle_deg(axis, want))
    if tilt > TILT_MAX_DEG:
        which = "camera y (image down)" if camera else "sensor z"
        why.append(f"{which} is {tilt:.0f} deg from ego {'-z' if camera else '+z'} ({_fmt(axis, 2)} in ego)")
    return "; ".join(why)


def _mount_cause(R: np.ndarray, tr: np.ndarray, q: np.ndarray, camera: bool) -> str:
    """The conversion mistake that explains an implausible mounting, tried one at a time."""
    tries = [
        ("the rotation is stored transposed (cam_T_ego's rotation where ego_T_cam's is expected)", R.T, tr),
        ("the quaternion is stored x, y, z, w (nuScenes: w, x, y, z)",
         quats_to_rotmats(q[[3, 0, 1, 2]][None])[0], tr),
    ]
    for name, r2, t2 in tries:
        if not _mount_problem(r2, t2, camera):
            return name
    axis = R[:, 1] if camera else R[:, 2]
    up = -axis if camera else axis
    if abs(up[1]) > 0.8 and abs(tr[1]) > 0.5:  # up along ego y, and the mounting height stored in y
        return "the ego frame is y-up (nuScenes: x forward, y left, z up)"
    return ("a camera frame other than x right, y down, z forward, or the ego frame's origin is not on "
            "the ground")


def check_mounting(t: Tables) -> List[dict]:
    out = []
    for i, row in enumerate(t.calib):
        mod = t.calib_modality[i]
        camera = mod == "camera"
        why = _mount_problem(t.calib_R[i], t.calib_t[i], camera)
        if why:
            expected = (f"{mod} {t.calib_channel[i]} at {HEIGHT_RANGE_M[0]}-{HEIGHT_RANGE_M[1]} m height, "
                        + ("image y within " if camera else "z within ") + f"{TILT_MAX_DEG:.0f} deg of "
                        + ("ego -z (down)" if camera else "ego +z"))
            out.append(_finding("mounting", "calibrated_sensor", row["token"], expected, why,
                                _mount_cause(t.calib_R[i], t.calib_t[i], t.calib_q[i], camera)))
    return out


def check_gravity(t: Tables) -> List[dict]:
    z_in_global = t.ego_R[:, :, 2]  # (N, 3) ego z axis in global
    tilt = _angle_deg(z_in_global, np.array([0.0, 0.0, 1.0]))
    out = []
    for i in np.flatnonzero(tilt > GRAVITY_MAX_DEG):
        axes = t.ego_R[i][2]  # global z in ego: which ego axis is up
        k = int(np.abs(axes).argmax())
        up = ("-" if axes[k] < 0 else "+") + "xyz"[k]
        cause = (f"the ego frame is {up[1]}-up (nuScenes: z up), or the quaternion is stored x, y, z, w"
                 if k != 2 else "the ego z axis points down: a mirrored frame or a sign error")
        out.append(_finding("gravity", "ego_pose", t.ego[i]["token"],
                            f"ego z within {GRAVITY_MAX_DEG:.0f} deg of global z",
                            f"ego z is {tilt[i]:.0f} deg from global z; global up is ego {up}", cause))
    return out


def check_intrinsics(t: Tables) -> List[dict]:
    out = []
    first_sd: Dict[int, int] = {}
    for j in np.flatnonzero(t.sd_key):
        first_sd.setdefault(int(t.sd_calib[j]), int(j))
    for i, row in enumerate(t.calib):
        k = row.get("camera_intrinsic")
        if t.calib_modality[i] != "camera" or not k or i not in first_sd:
            continue
        sd = t.sd[first_sd[i]]
        K = np.asarray(k, np.float64)
        w, h = int(sd["width"]), int(sd["height"])
        jpeg = augment.jpeg_size(augment.read_jpeg_bytes(str(t.dataroot / sd["filename"]))) \
            if (t.dataroot / sd["filename"]).is_file() else None
        found = []
        if jpeg is not None and jpeg != (w, h):
            found.append(f"the JPEG {sd['filename']} is {jpeg[0]}x{jpeg[1]}, sample_data says {w}x{h}")
            w, h = jpeg
        cx, cy = K[0, 2], K[1, 2]
        if not (-0.5 <= cx <= w - 0.5 and -0.5 <= cy <= h - 0.5):
            found.append(f"principal point ({cx:.1f}, {cy:.1f}) outside the {w}x{h} image")
        elif abs(cx - (w - 1) / 2) > PP_CENTRE_FRACTION * w or abs(cy - (h - 1) / 2) > PP_CENTRE_FRACTION * h:
            found.append(f"principal point ({cx:.1f}, {cy:.1f}) far from the centre of the {w}x{h} image")
        if found:
            # the image size the principal point implies, as a round multiple of the JPEG's (x2, x0.5, ...)
            scale = round(((2 * cx + 1) / w + (2 * cy + 1) / h) / 2 * 4) / 4
            cause = (f"intrinsics of a {w * scale:.0f}x{h * scale:.0f} image (x{scale:g} the JPEG's size): "
                     f"divide rows 0-1 of K by {scale:g} for the {w}x{h} JPEGs"
                     if scale > 0 and scale != 1 else "intrinsics of another camera or an uncorrected crop"
                     )
            out.append(_finding("intrinsics", "calibrated_sensor", row["token"],
                                f"principal point inside and near the centre ({(w - 1) / 2:.1f}, "
                                f"{(h - 1) / 2:.1f}) of the {w}x{h} image",
                                "; ".join(found), cause))
    return out


def _sample_sensors(t: Tables):
    """Per sample: keyframe camera sample_data rows (S, C) (-1 = none) and the ego sample_data row (S,)."""
    cams = [j for j in np.flatnonzero(t.sd_key) if t.calib_modality[t.sd_calib[j]] == "camera"]
    channels = sorted({t.calib_channel[t.sd_calib[j]] for j in cams})
    table = np.full((len(t.sample), max(1, len(channels))), -1, np.int64)
    col = {c: k for k, c in enumerate(channels)}
    for j in cams:
        table[t.sd_sample[j], col[t.calib_channel[t.sd_calib[j]]]] = j
    ego_sd = np.full(len(t.sample), -1, np.int64)
    for j in np.flatnonzero(t.sd_key):
        if t.calib_modality[t.sd_calib[j]] == "lidar":
            ego_sd[t.sd_sample[j]] = j
    missing = ego_sd < 0
    ego_sd[missing] = table[missing, 0]  # without lidar, the first camera's ego pose
    return table, ego_sd


def _box_corners(center: np.ndarray, wlh: np.ndarray, R: np.ndarray) -> np.ndarray:
    """(N, 8, 3) global corners of boxes (devkit: x along length, y along width)."""
    signs = np.array([[sx, sy, sz] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)], np.float64)
    half = np.stack([wlh[:, 1], wlh[:, 0], wlh[:, 2]], -1)[:, None, :] / 2  # (N, 1, 3) l, w, h
    return center[:, None, :] + (signs[None] * half) @ np.swapaxes(R, 1, 2)


def check_boxes(t: Tables, chunk: int = 50000) -> List[dict]:
    if not t.ann:
        return []
    cam_sd, ego_sd = _sample_sensors(t)
    a_sample = np.array([t.sample_idx.get(r["sample_token"], -1) for r in t.ann], np.int64)
    ok = a_sample >= 0
    center, wlh, q = _arr(t.ann, "translation", 3), _arr(t.ann, "size", 3), _arr(t.ann, "rotation", 4)
    out = []
    sizes = np.array([[t.sd[j]["width"], t.sd[j]["height"]] if j >= 0 else [0, 0] for j in cam_sd.ravel()],
                     np.float64).reshape(cam_sd.shape + (2,))
    cam_T_global = _inverse(t.global_T_sensor(np.maximum(cam_sd.ravel(), 0))).reshape(cam_sd.shape + (4, 4))
    K = np.zeros(cam_sd.shape + (3, 3))
    for s, c in zip(*np.nonzero(cam_sd >= 0)):
        K[s, c] = np.asarray(t.calib[t.sd_calib[cam_sd[s, c]]]["camera_intrinsic"], np.float64)
    e = t.sd_ego[np.maximum(ego_sd, 0)]
    global_T_ego = np.tile(np.eye(4), (len(e), 1, 1))
    global_T_ego[:, :3, :3], global_T_ego[:, :3, 3] = t.ego_R[e], t.ego_t[e]
    ego_T_global = _inverse(global_T_ego)
    for lo in range(0, len(t.ann), chunk):
        idx = np.arange(lo, min(lo + chunk, len(t.ann)))
        idx = idx[ok[idx]]
        s = a_sample[idx]
        corners = _box_corners(center[idx], wlh[idx], quats_to_rotmats(q[idx]))  # (N, 8, 3)
        hom = np.concatenate([corners, np.ones(corners.shape[:2] + (1,))], -1)
        cam = np.einsum("ncij,nkj->ncki", cam_T_global[s], hom)[..., :3]  # (N, C, 8, 3)
        z = cam[..., 2]
        uv = np.einsum("ncij,nckj->ncki", K[s], cam)
        uv = uv[..., :2] / np.where(np.abs(uv[..., 2:]) > 1e-6, uv[..., 2:], 1e-6)
        wh = sizes[s][:, :, None, :]
        in_image = (uv >= -0.5).all(-1) & (uv <= wh - 0.5).all(-1)
        inside = (z > 0.1) & (z < SEE_RANGE_M) & in_image & (cam_sd[s] >= 0)[..., None]
        unseen = ~inside.any(axis=(1, 2))
        ego_c = np.einsum("nij,nkj->nki", ego_T_global[s], hom)[..., :3]  # (N, 8, 3) corners in ego
        bottom = ego_c[..., 2].min(1)
        dist = np.linalg.norm(ego_c[..., :2].mean(1), axis=1)
        below = bottom < -(BOX_BELOW_M + BOX_GRADE * dist)
        above = bottom > BOX_ABOVE_M + BOX_GRADE * dist
        for n in np.flatnonzero(unseen):
            out.append(_finding("box_unseen", "sample_annotation", t.ann[idx[n]]["token"],
                                f"some corner inside a camera of its sample, at most {SEE_RANGE_M:g} m deep",
                                f"centre {_fmt(ego_c[n].mean(0))} m in the ego frame, in no camera's view",
                                "boxes stored in the ego (or sensor) frame where nuScenes stores global, "
                                "wrong ego poses, or camera calibrations off"))
        for n in np.flatnonzero(below | above):
            where = "below" if below[n] else "above"
            out.append(_finding("box_height", "sample_annotation", t.ann[idx[n]]["token"],
                                f"box bottom within -{BOX_BELOW_M:g}..+{BOX_ABOVE_M:g} m (+{BOX_GRADE:g} x "
                                f"distance) of the ego ground z = 0",
                                f"bottom at z = {bottom[n]:.2f} m in the ego frame ({where}), "
                                f"{dist[n]:.0f} m away",
                                "boxes in another frame than global, a z/height convention other than the "
                                "box centre, or ego poses without the right z"))
    return out


def check_ego_jumps(t: Tables) -> List[dict]:
    """Consecutive keyframes of each channel in each scene, by timestamp."""
    key = np.flatnonzero(t.sd_key & (t.sd_sample >= 0) & (t.sd_ego >= 0))
    calib_sensor = np.array([hash(r["sensor_token"]) for r in t.calib], np.int64)
    scene, sensor = t.sample_scene[t.sd_sample[key]], calib_sensor[t.sd_calib[key]]
    order = np.lexsort((t.sd_ts[key], sensor, scene))
    rows = key[order]
    same = (scene[order][1:] == scene[order][:-1]) & (sensor[order][1:] == sensor[order][:-1])
    a, b = rows[:-1][same], rows[1:][same]
    dt = np.maximum((t.sd_ts[b] - t.sd_ts[a]) / 1e6, 1e-3)
    dist = np.linalg.norm(t.ego_t[t.sd_ego[b]] - t.ego_t[t.sd_ego[a]], axis=1)
    rel = np.swapaxes(t.ego_R[t.sd_ego[a]], 1, 2) @ t.ego_R[t.sd_ego[b]]
    angle = np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    bad = (dist / dt > MAX_SPEED_MS) | (angle / dt > MAX_YAW_RATE)
    out, seen = [], set()
    for n in np.flatnonzero(bad):
        token = t.ego[t.sd_ego[b[n]]]["token"]
        if token in seen:
            continue
        seen.add(token)
        out.append(_finding("ego_jump", "ego_pose", token,
                            f"under {MAX_SPEED_MS:g} m/s and {MAX_YAW_RATE:g} rad/s since the previous "
                            f"{t.calib_channel[t.sd_calib[b[n]]]} keyframe",
                            f"{dist[n]:.1f} m and {np.degrees(angle[n]):.0f} deg in {dt[n]:.2f} s "
                            f"(sample_data {t.sd[b[n]]['token']})",
                            "ego poses of another sequence or time base, poses not interpolated to the "
                            "sensor's timestamp, or a unit error (mm, cm)"))
    return out


def check_timestamps(t: Tables) -> List[dict]:
    out = []
    tables = (("sample", t.sample, t.sample_idx, t.sample_ts), ("sample_data", t.sd, t.sd_idx, t.sd_ts))
    for table, rows, idx, ts in tables:
        nxt = np.array([idx.get(r.get("next") or "", -1) for r in rows], np.int64)
        has = np.flatnonzero(nxt >= 0)
        for i in has[ts[nxt[has]] <= ts[has]]:
            out.append(_finding("timestamps", table, rows[i]["token"],
                                f"its next row ({rows[nxt[i]]['token']}) later",
                                f"timestamp {ts[i]} then {ts[nxt[i]]} "
                                f"({(ts[nxt[i]] - ts[i]) / 1e6:+.3f} s)",
                                "prev/next links not in time order, timestamps in another unit than "
                                "microseconds, or clocks of different sensors mixed"))
    return out


def check_lidar_ground(t: Tables, max_samples: int = 20) -> List[dict]:
    rows = [j for j in np.flatnonzero(t.sd_key) if t.calib_modality[t.sd_calib[j]] == "lidar"
            and t.sd[j]["filename"].endswith(".pcd.bin")]
    if not rows:
        return []
    pick = np.asarray(rows)[np.unique(np.linspace(0, len(rows) - 1, min(max_samples, len(rows))).astype(int))]
    out = []
    for j in pick:
        try:
            pts = points.read_lidar(str(t.dataroot / t.sd[j]["filename"]))[:, :3].astype(np.float64)
        except (OSError, ValueError):
            continue  # a broken file is verify's finding, not a convention's
        c = t.sd_calib[j]
        ego = pts @ t.calib_R[c].T + t.calib_t[c]
        r = np.linalg.norm(ego[:, :2], axis=1)
        near = ego[(r > LIDAR_RANGE_M[0]) & (r < LIDAR_RANGE_M[1]), 2]
        if len(near) < 100:
            continue
        ground = float(np.percentile(near, 5))
        if abs(ground) > LIDAR_GROUND_TOL_M:
            out.append(_finding("lidar_ground", "calibrated_sensor", t.calib[c]["token"],
                                f"lidar ground (5th percentile of z at {LIDAR_RANGE_M[0]:g}-"
                                f"{LIDAR_RANGE_M[1]:g} m) within {LIDAR_GROUND_TOL_M} m of ego z = 0",
                                f"ground at z = {ground:.2f} m in the ego frame "
                                f"(sample_data {t.sd[j]['token']})",
                                "the lidar's calibrated_sensor height or rotation is wrong (transposed, "
                                "x, y, z, w, a y-up ego frame) or the ego origin is not on the ground"))
    return out


CHECKS = (check_rotations, check_gravity, check_mounting, check_intrinsics, check_boxes, check_ego_jumps,
          check_timestamps, check_lidar_ground)


def check_conventions(dataroot, version: str, lidar_samples: int = 20) -> dict:
    """{'findings': {check: [finding]}, 'counts', 'rows', 'seconds'} for one dataroot/version."""
    t0 = time.perf_counter()
    t = Tables(Path(dataroot), version)
    found: Dict[str, List[dict]] = defaultdict(list)
    for check in CHECKS:
        items = check(t, lidar_samples) if check is check_lidar_ground else check(t)
        for f in items:
            found[f["check"]].append(f)
    return {
        "dataroot": str(dataroot), "version": version, "findings": dict(found),
        "counts": {k: len(v) for k, v in found.items()},
        "rows": {"calibrated_sensor": len(t.calib), "ego_pose": len(t.ego), "sample": len(t.sample),
                 "sample_data": len(t.sd), "sample_annotation": len(t.ann)},
        "seconds": time.perf_counter() - t0,
    }


def format_conventions(s: dict, show: int = 3) -> str:
    rows = ", ".join(f"{n} {k}" for k, n in s["rows"].items())
    lines = [f"conventions {s['dataroot']} ({s['version']}): {rows} checked in {s['seconds']:.1f} s"]
    if not s["findings"]:
        lines.append("all conventions hold: no findings")
        return "\n".join(lines)
    lines.append(f"{sum(s['counts'].values())} finding(s):")
    for check in CHECK_TITLES:
        items = s["findings"].get(check, [])
        if not items:
            continue
        lines.append(f"  [{check}] {CHECK_TITLES[check]}: {len(items)}")
        for f in items[:show]:
            lines.append(f"    {f['table']} {f['token']}: expected {f['expected']}; found {f['found']}; "
                         f"likely cause: {f['cause']}")
        if len(items) > show:
            lines.append(f"    ... and {len(items) - show} more")
    return "\n".join(lines)


# -- pictures ----------------------------------------------------------------------------------------
def write_pictures(data_dir, dset: str, split: str, n: int, folder, cache_dir=None) -> List[str]:
    """Cameras with the boxes (and lidar points, when present) projected, and the BEV targets, for ``n``
    samples spread over the split, as PNGs in ``folder``; returns their paths."""
    import torch

    from bevtrain.config import DataConfig
    from bevtrain.data.dataset import NuScenesBEVDataset
    from bevtrain.data.index import LIDAR_NAME
    from bevtrain.viz import BevCanvas, _label_bar, render_cameras, write_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(data_dir=str(data_dir), dset=dset)
    if cache_dir:
        settings["cache_dir"] = str(cache_dir)
    probe = NuScenesBEVDataset(DataConfig.make(**settings), split=split, is_train=False)
    lidar = len(probe) and LIDAR_NAME in probe.records[0]["sweeps"]
    ds = NuScenesBEVDataset(DataConfig.make(**settings, use_lidar=bool(lidar)), split=split, is_train=False) \
        if lidar else probe
    paths = []
    for k in np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)) if len(ds) else []:
        item = ds[int(k)]
        batch = {key: (v[None] if torch.is_tensor(v) else [v]) for key, v in item.items()}
        cams = render_cameras(batch, 0)
        if lidar:
            _draw_lidar(cams, batch, ds)
        canvas = BevCanvas(ds.vox, cams.shape[1] // 3)
        seg = item["seg_bev"].numpy().max(0)  # (Z, X) any class
        bev = np.zeros(seg.shape + (3,), np.uint8)
        bev[seg > 0.5] = (255, 255, 255)
        panel = canvas.to_panel(bev)
        ref_T_ego = item["ref_T_ego"].numpy()
        canvas.draw_rings(panel, ref_T_ego)
        canvas.draw_ego(panel, ref_T_ego)
        canvas.draw_scale(panel)
        bev_col = np.concatenate([_label_bar(canvas.width, 28, "BEV targets (white), forward up"), panel], 0)
        strip = np.zeros((bev_col.shape[0], cams.shape[1], 3), np.uint8)
        strip[:, : canvas.width] = bev_col
        title = _label_bar(cams.shape[1], 26, f"{item['scene_name']}  sample {item['sample_token']}")
        path = folder / f"conventions_{int(k):05d}_{item['sample_token']}.png"
        write_png(path, np.ascontiguousarray(np.concatenate([title, cams, strip], 0)))
        paths.append(str(path))
    return paths


def _draw_lidar(cams: np.ndarray, batch: dict, ds) -> None:
    """Lidar points (ref frame) as dots on the camera cells of ``render_cameras``' canvas, by depth."""
    import cv2

    from bevtrain.viz import RIG_LAYOUT, camera_names_of

    pts = batch["lidar"][0, : int(batch["lidar_count"][0]), :3].double().numpy()
    S, _, H, W = batch["images"][0].shape
    cell_w = cams.shape[1] // 3
    cell_h = int(round(H * cell_w / W))
    names = camera_names_of(batch, 0, S)
    for s in range(S):
        if names[s] not in RIG_LAYOUT:
            continue
        r, c = RIG_LAYOUT[names[s]]
        cam_T_ref = batch["cams_T_ref"][0, s].double().numpy()
        cam = pts @ cam_T_ref[:3, :3].T + cam_T_ref[:3, 3]
        cam = cam[cam[:, 2] > 0.5]
        K = batch["pix_T_cams"][0, s, :3, :3].double().numpy()
        uv = cam @ K.T
        uv = uv[:, :2] / uv[:, 2:]
        u, v = uv[:, 0] * cell_w / W, uv[:, 1] * cell_h / H
        keep = (u >= 0) & (u < cell_w - 1) & (v >= 0) & (v < cell_h - 1)
        hue = np.clip(cam[keep, 2] / 40.0 * 120, 0, 120).astype(np.uint8)  # near red, far blue
        colors = cv2.cvtColor(np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 255)], -1)[None],
                              cv2.COLOR_HSV2RGB)[0]
        cell = cams[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]
        cell[v[keep].astype(int), u[keep].astype(int)] = colors


def picture_note(paths: Sequence[str], folder) -> str:
    return f"{len(paths)} picture(s) in {os.path.abspath(folder)}" if paths else "no pictures written"
