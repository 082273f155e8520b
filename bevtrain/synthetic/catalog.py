"""What nuScenes fixes and every synthetic scene shares: scene names, sensor channels and rigs,
category / attribute / visibility tokens, object sizes, timing, and the seeded streams and tokens
that make everything a deterministic function of (seed, scene name, keyframes).

Frames follow nuScenes: global/ego x forward-ish, y left, z up (ground at z = 0); cameras x right,
y down, z forward; LIDAR_TOP x right, y forward, z up; radars x forward, y left, z up.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, List

import numpy as np

# v1.0-mini scene names in the devkit's order; the first two cover both mini splits.
MINI_SCENES = (
    "scene-0061",
    "scene-0103",
    "scene-0553",
    "scene-0655",
    "scene-0757",
    "scene-0796",
    "scene-0916",
    "scene-1077",
    "scene-1094",
    "scene-1100",
)
SCENE_LOCATIONS = {
    "scene-0061": "singapore-onenorth",
    "scene-0103": "boston-seaport",
    "scene-0553": "boston-seaport",
    "scene-0655": "boston-seaport",
    "scene-0757": "boston-seaport",
    "scene-0796": "singapore-queenstown",
    "scene-0916": "singapore-queenstown",
    "scene-1077": "singapore-hollandvillage",
    "scene-1094": "singapore-hollandvillage",
    "scene-1100": "singapore-hollandvillage",
}

KEYFRAME_PERIOD_US = 500_000  # 2 Hz keyframes
LIDAR_SWEEPS_PER_INTERVAL = 1  # non-key lidar sweeps before each keyframe
RADAR_SWEEPS_PER_INTERVAL = 2  # non-key radar sweeps before each keyframe
ANNOTATION_RADIUS = 70.0  # m, box centres within this xy distance of the ego are annotated
LIDAR_RANGE = 60.0  # m; below ANNOTATION_RADIUS so every lidar/radar return lies on an annotated box
RADAR_RANGE = 60.0
RENDER_RADIUS = 120.0  # m, objects farther away are not drawn (a car there is ~17 px long)
# Capture times around a keyframe, as in nuScenes. The sample's timestamp is its LIDAR_TOP scan's: a
# revolution at 20 Hz, clockwise seen from above, that ends with the beam at LIDAR_END_AZIMUTH_DEG
# (ego frame, left positive). Each camera fires when the beam crosses its optical axis, so the six
# fire in sequence within the 50 ms before the keyframe (nuScenes' first v1.0-mini sample:
# CAM_FRONT_LEFT -43 ms, CAM_FRONT -35, CAM_FRONT_RIGHT -28, CAM_BACK_RIGHT -20, CAM_BACK -10,
# CAM_BACK_LEFT -0.5). The radars run free at about 13 Hz: a keyframe's radar scan is the one nearest
# the lidar's, up to half a radar period before or after it.
LIDAR_PERIOD_US = 50_000
LIDAR_END_AZIMUTH_DEG = 106.0
RADAR_PERIOD_US = 77_000

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")
LIDAR = "LIDAR_TOP"

# Rigs close to nuScenes' (translation in the ego frame in m, yaw in degrees, left positive).
# Cameras: (translation, yaw, focal px, cx, cy) at 1600x900.
CAMERA_RIG = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0, 1266.4, 816.3, 491.5),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.50), -55.0, 1260.8, 808.0, 495.3),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0, 1272.6, 826.6, 479.8),
    "CAM_BACK": ((0.03, 0.0, 1.58), 180.0, 809.2, 829.2, 481.8),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.59), 110.0, 1256.7, 817.8, 451.9),
    "CAM_BACK_RIGHT": ((1.01, -0.48, 1.56), -110.0, 1259.5, 807.3, 501.2),
}
LIDAR_RIG = ((0.986, 0.0, 1.84), -90.0)
RADAR_RIG = {
    "RADAR_FRONT": ((3.41, 0.0, 0.50), 0.0),
    "RADAR_FRONT_LEFT": ((2.42, 0.80, 0.78), 89.0),
    "RADAR_FRONT_RIGHT": ((2.42, -0.80, 0.77), -89.0),
    "RADAR_BACK_LEFT": ((-0.56, 0.63, 0.53), 176.0),
    "RADAR_BACK_RIGHT": ((-0.56, -0.62, 0.53), -175.0),
}
RADAR_HALF_FOV_DEG = 60.0

# nuScenes category tokens (the real ones, so tools keyed on them keep working).
CATEGORIES = {
    "human.pedestrian.adult": "1fa93b757fc74fb197cdd60001ad8abf",
    "human.pedestrian.child": "b1c6de4c57f14a5383d9f963fbdcb5cb",
    "human.pedestrian.wheelchair": "b2d7c6c701254928a9e4d6aac9446d79",
    "human.pedestrian.stroller": "6a5888777ca14867a8aee3fe539b56c4",
    "human.pedestrian.personal_mobility": "403fede16c88426885dd73366f16c34a",
    "human.pedestrian.police_officer": "bb867e2064014279863c71a29b1eb381",
    "human.pedestrian.construction_worker": "909f1237d34a49d6bdd27c2fe4581d79",
    "animal": "63a94dfa99bb47529567cd90d3b58384",
    "vehicle.car": "fd69059b62a3469fbaef25340c0eab7f",
    "vehicle.motorcycle": "dfd26f200ade4d24b540184e16050022",
    "vehicle.bicycle": "fc95c87b806f48f8a1faea2dcc2222a4",
    "vehicle.bus.bendy": "003edbfb9ca849ee8a7496e9af3025d4",
    "vehicle.bus.rigid": "fedb11688db84088883945752e480c2c",
    "vehicle.truck": "6021b5187b924d64be64a702e5570edf",
    "vehicle.construction": "5b3cd6f2bca64b83aa3d0008df87d0e4",
    "vehicle.emergency.ambulance": "732cce86872640628788ff1bb81006d4",
    "vehicle.emergency.police": "7b2ff083a64e4d53809ae5d9be563504",
    "vehicle.trailer": "90d0f6f8e7c749149b1b6c3a029841a8",
    "movable_object.barrier": "653f7efbb9514ce7b81d44070d6208c1",
    "movable_object.trafficcone": "85abebdccd4d46c7be428af5a6173947",
    "movable_object.pushable_pullable": "d772e4bae20f493f98e15a76518b31d7",
    "movable_object.debris": "063c5e7f638343d3a7230bc3641caf97",
    "static_object.bicycle_rack": "0a30519ee16a4619b4f4acfe2d78fb55",
}
ATTRIBUTES = {
    "vehicle.moving": ("cb5118da1ab342aa947717dc53544259", "Vehicle is moving."),
    "vehicle.stopped": (
        "c3246a1e22a14fcb878aa61e69ae3329",
        "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move.",
    ),
    "vehicle.parked": (
        "58aa28b1c2a54dc88e169808c07331e3",
        "Vehicle is stationary (usually for longer duration) with no immediate intent to move.",
    ),
    "cycle.with_rider": (
        "a14936d865eb4216b396adae8cb3939c",
        "There is a rider on the bicycle or motorcycle.",
    ),
    "cycle.without_rider": (
        "5a655f9751944309a277276b8f473452",
        "There is NO rider on the bicycle or motorcycle.",
    ),
    "pedestrian.sitting_lying_down": (
        "03aa62109bf043afafdea7d875dd4f43",
        "The human is sitting or lying down.",
    ),
    "pedestrian.standing": ("4d8821270b4a47e3a8a300cbec48188e", "The human is standing."),
    "pedestrian.moving": ("ab83627ff28b465b85c427162dec722f", "The human is moving."),
}
VISIBILITY = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)


def visibility_token(fraction: float) -> str:
    """nuScenes bins of the visible share of an object over all six cameras."""
    if fraction < 0.4:
        return "1"
    if fraction < 0.6:
        return "2"
    if fraction < 0.8:
        return "3"
    return "4"


# Mean size (w, l, h) in m and relative jitter per category.
SIZES = {
    "vehicle.car": ((1.90, 4.60, 1.60), (0.06, 0.09, 0.09)),
    "vehicle.truck": ((2.50, 7.50, 3.00), (0.06, 0.20, 0.12)),
    "vehicle.bus.rigid": ((2.90, 11.5, 3.40), (0.03, 0.08, 0.05)),
    "vehicle.bus.bendy": ((2.90, 17.5, 3.30), (0.03, 0.05, 0.04)),
    "vehicle.trailer": ((2.60, 10.0, 3.80), (0.04, 0.20, 0.08)),
    "vehicle.construction": ((2.80, 6.50, 3.20), (0.08, 0.15, 0.12)),
    "vehicle.motorcycle": ((0.80, 2.10, 1.50), (0.08, 0.08, 0.06)),
    "vehicle.bicycle": ((0.60, 1.75, 1.30), (0.08, 0.06, 0.06)),
    "human.pedestrian.adult": ((0.65, 0.70, 1.75), (0.10, 0.10, 0.06)),
    "movable_object.trafficcone": ((0.42, 0.42, 1.05), (0.08, 0.08, 0.08)),
    "movable_object.barrier": ((0.50, 2.40, 1.00), (0.10, 0.10, 0.08)),
}

VEHICLES = (
    "vehicle.car",
    "vehicle.truck",
    "vehicle.bus.rigid",
    "vehicle.bus.bendy",
    "vehicle.trailer",
    "vehicle.construction",
)
CYCLES = ("vehicle.motorcycle", "vehicle.bicycle")


def stable_hash(*parts) -> str:
    return hashlib.md5("|".join(str(p) for p in parts).encode()).hexdigest()


def seeded_rng(*parts) -> np.random.Generator:
    return np.random.default_rng(int(stable_hash(*parts)[:16], 16))


def yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_rotation(yaw_deg: float) -> np.ndarray:
    """ego_R_cam for a level camera looking along `yaw_deg` (columns: cam x right, y down, z forward)."""
    y = math.radians(yaw_deg)
    forward = np.array([math.cos(y), math.sin(y), 0.0])
    right = np.array([math.sin(y), -math.cos(y), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    return np.stack([right, down, forward], axis=1)


def quaternion_wxyz(r: np.ndarray) -> List[float]:
    """Unit quaternion (w, x, y, z) of a rotation matrix (Shepperd's method)."""
    m = np.asarray(r, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        k = 2.0 * math.sqrt(1.0 + tr)
        q = [0.25 * k, (m[2, 1] - m[1, 2]) / k, (m[0, 2] - m[2, 0]) / k, (m[1, 0] - m[0, 1]) / k]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        k = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / k, 0.25 * k, (m[0, 1] + m[1, 0]) / k, (m[0, 2] + m[2, 0]) / k]
    elif m[1, 1] > m[2, 2]:
        k = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / k, (m[0, 1] + m[1, 0]) / k, 0.25 * k, (m[1, 2] + m[2, 1]) / k]
    else:
        k = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / k, (m[0, 2] + m[2, 0]) / k, (m[1, 2] + m[2, 1]) / k, 0.25 * k]
    q = np.array(q)
    q = q / np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


def camera_capture_offset_us(ego_R_cam: np.ndarray) -> int:
    """When a camera with this rotation fires, in us relative to the LIDAR_TOP keyframe (<= 0): when the
    lidar beam, in its revolution that ends at the keyframe, crosses the camera's optical axis."""
    axis = np.asarray(ego_R_cam)[:, 2]  # the camera's z (forward) in the ego frame
    azimuth = math.degrees(math.atan2(axis[1], axis[0]))
    swept_after = (azimuth - LIDAR_END_AZIMUTH_DEG) % 360.0  # degrees the beam still turns (clockwise)
    return -int(round(swept_after / 360.0 * LIDAR_PERIOD_US))


# The camera rigs of `--rig`: channel -> (translation, yaw, focal px, cx, cy, width, height) at the rig's own
# image size. --width/--height scale every camera by (width / 1600, height / 900), so the nuScenes rig is
# written at exactly that size and the others in proportion (four: 1280x720 at the default 1600x900).
RIGS = {
    "nuscenes": {ch: (*CAMERA_RIG[ch], 1600, 900) for ch in CAMERAS},
    # Four cameras of another layout and size, none with a nuScenes name: a narrower front camera and
    # three wide ones (about 100 degrees) to the left, rear and right, principal points off centre.
    "four": {
        "FRONT_CAM": ((1.80, 0.0, 1.45), 0.0, 1000.0, 642.3, 357.8, 1280, 720),
        "LEFT_CAM": ((1.10, 0.92, 1.62), 90.0, 540.0, 637.1, 362.4, 1280, 720),
        "REAR_CAM": ((-0.60, 0.0, 1.70), 180.0, 540.0, 640.9, 355.2, 1280, 720),
        "RIGHT_CAM": ((1.10, -0.92, 1.62), -90.0, 540.0, 644.6, 359.5, 1280, 720),
    },
    # One forward camera with a 4:3 image.
    "one": {"CAM_FRONT": ((1.70, 0.0, 1.50), 0.0, 820.0, 515.2, 380.6, 1024, 768)},
    # Two cameras of different sizes and shapes: a wide 16:9 one forward, a small 4:3 one backward.
    "mixed": {
        "FRONT_WIDE": ((1.75, 0.0, 1.50), 0.0, 1400.0, 963.4, 537.9, 1920, 1080),
        "REAR_SMALL": ((-0.50, 0.0, 1.65), 180.0, 420.0, 318.7, 243.2, 640, 480),
    },
}
DEFAULT_RIG = "nuscenes"


def camera_sizes(rig: str, width: int, height: int) -> Dict[str, tuple]:
    """(width, height) in pixels of each camera of `rig` when the set is written at width x height."""
    return {ch: (int(round(w * width / 1600.0)), int(round(h * height / 900.0)))
            for ch, (*_, w, h) in RIGS[rig].items()}


def scene_rigs(width: int, height: int, rig: str = DEFAULT_RIG) -> Dict[str, dict]:
    """Calibration per channel: ego_R_sensor (3x3), ego_t_sensor (3,), K (3x3 or None), and for cameras
    size (width, height)."""
    rigs = {}
    sizes = camera_sizes(rig, width, height)
    for ch, (t, yaw, f, cx, cy, w, h) in RIGS[rig].items():
        size = sizes[ch]
        sx, sy = size[0] / w, size[1] / h  # the nuScenes rig: width / 1600.0, height / 900.0
        # a resize keeps pixel centres (at integers) exact: u -> sx * (u + 0.5) - 0.5
        cx, cy = (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5
        k = np.array([[f * sx, 0.0, cx], [0.0, f * sy, cy], [0.0, 0.0, 1.0]])
        rigs[ch] = dict(R=camera_rotation(yaw), t=np.array(t, dtype=np.float64), K=k, modality="camera",
                        size=size)
    rigs[LIDAR] = dict(
        R=yaw_matrix(math.radians(LIDAR_RIG[1])), t=np.array(LIDAR_RIG[0]), K=None, modality="lidar"
    )
    for ch, (t, yaw) in RADAR_RIG.items():
        rigs[ch] = dict(R=yaw_matrix(math.radians(yaw)), t=np.array(t), K=None, modality="radar")
    return rigs
