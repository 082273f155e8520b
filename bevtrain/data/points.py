"""Lidar / radar readers (no devkit) and sweep accumulation into the reference frame.

Lidar ``.pcd.bin``: float32 records (x, y, z, intensity, ring); we keep x, y, z, intensity.
Radar ``.pcd``: PCD v0.7 with a binary payload of 18 fields per point:
    x y z dyn_prop id rcs vx vy vx_comp vy_comp is_quality_valid ambig_state
    x_rms y_rms invalid_state pdh0 vx_rms vy_rms
Radar filters follow the devkit's ``RadarPointCloud.from_file``: a point is kept when
invalid_state in ``invalid_states``, dyn_prop in ``dynprop_states`` and ambig_state in
``ambig_states``. With ``use_radar_filters`` the devkit defaults apply ([0], range(7), [3]); without,
the devkit's ``disable_filters`` ranges apply (range(18), range(8), range(5): every documented
state value, as Simple-BEV does). A NaN in the first point means an empty cloud (devkit rule).

Accumulation (devkit ``from_file_multisweep`` semantics): for each sweep, newest first, drop points
with |x| < min_distance and |y| < min_distance in the sensor frame, then map sensor -> global (with
the ego pose at that sweep's own timestamp) -> reference frame.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

RADAR_FIELDS = [
    "x",
    "y",
    "z",
    "dyn_prop",
    "id",
    "rcs",
    "vx",
    "vy",
    "vx_comp",
    "vy_comp",
    "is_quality_valid",
    "ambig_state",
    "x_rms",
    "y_rms",
    "invalid_state",
    "pdh0",
    "vx_rms",
    "vy_rms",
]
FILTERS_ON = (frozenset([0]), frozenset(range(7)), frozenset([3]))
FILTERS_OFF = (frozenset(range(18)), frozenset(range(8)), frozenset(range(5)))
MIN_DISTANCE = 2.2  # Simple-BEV's value for both lidar and radar

# Metaradar features (after xyz): the 15 remaining radar fields with both velocity pairs rotated
# into the reference frame (kept as their ref-frame x and z components, the BEV plane), then the
# sweep's time lag in seconds: 16 features, as Simple-BEV's metaradar input.
METARADAR_FEATURES = [
    "dyn_prop",
    "id",
    "rcs",
    "vx_ref",
    "vz_ref",
    "vx_comp_ref",
    "vz_comp_ref",
    "is_quality_valid",
    "ambig_state",
    "x_rms",
    "y_rms",
    "invalid_state",
    "pdh0",
    "vx_rms",
    "vy_rms",
    "time_lag",
]

# Simple-BEV's radar input (nuscenesdataset.get_radar_data, radar_features='simplebev'): the channels
# in its order, then per channel the newest nsweeps sweeps; each sweep's xyz mapped with its own ego
# pose into the ego frame at the RADAR_FRONT keyframe; the 15 fields after xyz kept raw (velocities
# stay in each radar's own frame: the devkit's transform moves xyz only), then the time lag
# t(RADAR_FRONT keyframe) - t(sweep) in seconds: 16 features.
SIMPLEBEV_RADAR_ORDER = [
    "RADAR_BACK_RIGHT", "RADAR_BACK_LEFT", "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT"
]
SIMPLEBEV_RADAR_FEATURES = RADAR_FIELDS[3:] + ["time_lag"]

_PCD_TYPES = {
    ("F", 2): "<f2",
    ("F", 4): "<f4",
    ("F", 8): "<f8",
    ("I", 1): "i1",
    ("I", 2): "<i2",
    ("I", 4): "<i4",
    ("I", 8): "<i8",
    ("U", 1): "u1",
    ("U", 2): "<u2",
    ("U", 4): "<u4",
    ("U", 8): "<u8",
}


LIDAR_POINT_BYTES = 5 * 4  # x, y, z, intensity, ring as float32


class PointFileError(OSError):
    pass


def read_lidar(path: str) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity in the lidar frame."""
    try:
        nbytes = os.path.getsize(path)
        raw = np.fromfile(path, dtype=np.float32)
    except OSError as e:
        raise PointFileError(f"cannot read lidar file {path}: {e}") from e
    # Bytes, not floats: fromfile drops a trailing partial float, so 3 stray bytes would pass unseen.
    # An empty file is refused as verify refuses it: a keyframe's lidar sweep always has points.
    if nbytes == 0 or nbytes % LIDAR_POINT_BYTES:
        raise PointFileError(f"lidar file {path} has {nbytes} bytes, not a non-zero multiple of "
                             f"{LIDAR_POINT_BYTES} (5 float32 per point): cut short or corrupt?")
    return raw.reshape(-1, 5)[:, :4]


def read_radar(path: str, filters=FILTERS_OFF) -> np.ndarray:
    """(N, 18) float64 radar points in the radar frame, after the state filters."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise PointFileError(f"cannot read radar file {path}: {e}") from e
    header = {}
    pos = 0
    while True:
        end = blob.find(b"\n", pos)
        if end < 0:
            raise PointFileError(f"radar file {path}: no DATA line in the PCD header (corrupt?)")
        line = blob[pos:end].decode("ascii", "replace").strip()
        pos = end + 1
        if line and not line.startswith("#"):
            key, _, val = line.partition(" ")
            header[key] = val.split()
        if line.startswith("DATA"):
            break
    try:
        if header["DATA"][0] != "binary":
            raise PointFileError(f"radar file {path}: only binary PCD is supported")
        fields, sizes, types = header["FIELDS"], header["SIZE"], header["TYPE"]
        width = int(header["WIDTH"][0]) * int(header.get("HEIGHT", ["1"])[0])
        dtype = np.dtype([(n, _PCD_TYPES[(t, int(s))]) for n, t, s in zip(fields, types, sizes)])
    except (KeyError, ValueError, IndexError) as e:
        raise PointFileError(f"radar file {path}: bad PCD header ({e})") from e
    if len(blob) - pos < width * dtype.itemsize:
        raise PointFileError(f"radar file {path}: payload shorter than {width} points (truncated?)")
    rec = np.frombuffer(blob, dtype=dtype, count=width, offset=pos)
    pts = np.stack([rec[n].astype(np.float64) for n in fields], axis=1)  # (N, 18)
    if len(pts) == 0 or np.isnan(pts[0]).any():
        return np.zeros((0, len(fields)))
    invalid, dynprop, ambig = filters
    keep = (
        np.isin(pts[:, 14], list(invalid))
        & np.isin(pts[:, 3], list(dynprop))
        & np.isin(pts[:, 11], list(ambig))
    )
    return pts[keep]


def _not_close(xy: np.ndarray, min_distance: float) -> np.ndarray:
    return ~((np.abs(xy[:, 0]) < min_distance) & (np.abs(xy[:, 1]) < min_distance))


def accumulate_lidar(
    dataroot: str, sweeps: dict, ref_T_global: np.ndarray, nsweeps: int, min_distance: float = MIN_DISTANCE
) -> np.ndarray:
    """(N, 4) float32 x, y, z (ref frame), intensity of the newest ``nsweeps`` lidar sweeps."""
    out = []
    for path, global_T_sensor in list(zip(sweeps["paths"], sweeps["global_T_sensor"]))[:nsweeps]:
        pts = read_lidar(f"{dataroot}/{path}")
        pts = pts[_not_close(pts, min_distance)]
        ref_T_sensor = ref_T_global @ global_T_sensor
        xyz = pts[:, :3].astype(np.float64) @ ref_T_sensor[:3, :3].T + ref_T_sensor[:3, 3]
        out.append(np.concatenate([xyz, pts[:, 3:4]], axis=1).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def accumulate_radar(
    dataroot: str,
    sweeps_per_channel: Sequence[Tuple[str, dict]],
    ref_T_global: np.ndarray,
    nsweeps: int,
    ref_time_us: int,
    use_filters: bool,
    metaradar: bool,
    min_distance: float = MIN_DISTANCE,
) -> np.ndarray:
    """(N, 3) or (N, 3 + 16) float32 radar points in the ref frame from every radar channel."""
    filters = FILTERS_ON if use_filters else FILTERS_OFF
    out = []
    for _chan, sweeps in sweeps_per_channel:
        items = list(zip(sweeps["paths"], sweeps["global_T_sensor"], sweeps["timestamps"]))[:nsweeps]
        for path, global_T_sensor, stamp in items:
            pts = read_radar(f"{dataroot}/{path}", filters)
            pts = pts[_not_close(pts, min_distance)]
            ref_T_sensor = ref_T_global @ global_T_sensor
            rot = ref_T_sensor[:3, :3]
            xyz = pts[:, :3] @ rot.T + ref_T_sensor[:3, 3]
            if not metaradar:
                out.append(xyz.astype(np.float32))
                continue
            zeros = np.zeros(len(pts))
            v = np.stack([pts[:, 6], pts[:, 7], zeros], axis=1) @ rot.T  # sensor-plane velocity -> ref
            vc = np.stack([pts[:, 8], pts[:, 9], zeros], axis=1) @ rot.T
            lag = np.full(len(pts), 1e-6 * (ref_time_us - int(stamp)))
            feats = np.stack(
                [
                    pts[:, 3],
                    pts[:, 4],
                    pts[:, 5],
                    v[:, 0],
                    v[:, 2],
                    vc[:, 0],
                    vc[:, 2],
                    pts[:, 10],
                    pts[:, 11],
                    pts[:, 12],
                    pts[:, 13],
                    pts[:, 14],
                    pts[:, 15],
                    pts[:, 16],
                    pts[:, 17],
                    lag,
                ],
                axis=1,
            )
            out.append(np.concatenate([xyz, feats], axis=1).astype(np.float32))
    width = 3 + (len(METARADAR_FEATURES) if metaradar else 0)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def accumulate_radar_simplebev(
    dataroot: str,
    sweeps_by_channel: dict,
    nsweeps: int,
    use_filters: bool,
    metaradar: bool,
    min_distance: float = MIN_DISTANCE,
) -> np.ndarray:
    """(N, 3) or (N, 3 + 16) float32 radar points as Simple-BEV fed them, in the ego frame at the
    RADAR_FRONT keyframe (see SIMPLEBEV_RADAR_ORDER); map them to the reference camera with its
    extrinsics only (``cam_T_ego``), as Simple-BEV did."""
    filters = FILTERS_ON if use_filters else FILTERS_OFF
    front = sweeps_by_channel["RADAR_FRONT"]
    ego_T_global = np.linalg.inv(front["global_T_ego"][0])
    ref_time_us = int(front["timestamps"][0])
    out = []
    for chan in SIMPLEBEV_RADAR_ORDER:
        sweeps = sweeps_by_channel[chan]
        items = list(zip(sweeps["paths"], sweeps["global_T_sensor"], sweeps["timestamps"]))[:nsweeps]
        for path, global_T_sensor, stamp in items:
            pts = read_radar(f"{dataroot}/{path}", filters)
            pts = pts[_not_close(pts, min_distance)]
            ego_T_sensor = ego_T_global @ global_T_sensor
            xyz = pts[:, :3] @ ego_T_sensor[:3, :3].T + ego_T_sensor[:3, 3]
            if metaradar:
                lag = np.full((len(pts), 1), 1e-6 * ref_time_us - 1e-6 * int(stamp))
                xyz = np.concatenate([xyz, pts[:, 3:], lag], axis=1)
            out.append(xyz.astype(np.float32))
    width = 3 + (len(SIMPLEBEV_RADAR_FEATURES) if metaradar else 0)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def mirror_points(points: np.ndarray, flip_x: bool, flip_z: bool, metaradar: bool = False) -> np.ndarray:
    """Apply the BEV mirror M = diag(+-1, 1, +-1) to ref-frame points, and with ``metaradar`` to
    the ref-frame velocities of METARADAR_FEATURES (Simple-BEV's raw features are not mirrored: it
    flips the voxel grid, not the values in it)."""
    if not (flip_x or flip_z):
        return points
    points = points.copy()
    cols_x = [0] + ([6, 8] if metaradar else [])  # x and the ref-x velocity components
    cols_z = [2] + ([7, 9] if metaradar else [])
    if flip_x:
        points[:, cols_x] *= -1
    if flip_z:
        points[:, cols_z] *= -1
    return points


def pad_points(points: np.ndarray, size: int) -> Tuple[np.ndarray, int]:
    """Zero-pad (or truncate) to ``size`` rows; returns (padded, count of real rows)."""
    n = min(len(points), size)
    out = np.zeros((size, points.shape[1]), dtype=np.float32)
    out[:n] = points[:n]
    return out, n
