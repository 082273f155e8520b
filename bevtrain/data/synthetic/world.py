"""What a synthetic scene contains: sensor rigs, categories, roads, actors and how they move.

Frames follow nuScenes: global/ego x forward-ish, y left, z up (ground at z = 0); cameras x right,
y down, z forward; LIDAR_TOP x right, y forward, z up; radars x forward, y left, z up.
Everything is a deterministic function of (seed, scene name, keyframes).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import cv2
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

# Colours (RGB) per category: bodies vary per instance around these palettes.
GLASS = (38, 48, 60)
UNDERBODY = (30, 30, 32)
CAR_PALETTE = (
    (228, 228, 226),
    (170, 173, 178),
    (48, 48, 52),
    (92, 94, 100),
    (165, 28, 30),
    (30, 62, 150),
    (26, 44, 92),
    (40, 92, 62),
    (192, 172, 132),
    (210, 160, 30),
)
TRUCK_PALETTE = ((236, 236, 232), (200, 200, 196), (150, 60, 40), (40, 80, 150), (60, 110, 70))
BUS_PALETTE = ((200, 40, 40), (120, 50, 150), (40, 130, 70), (230, 190, 40), (215, 215, 210))
TRAILER_PALETTE = ((205, 205, 200), (150, 62, 42), (60, 90, 140), (180, 180, 175))
CONSTRUCTION_PALETTE = ((232, 178, 20), (230, 120, 22), (210, 196, 40))
CYCLE_PALETTE = ((180, 30, 30), (30, 30, 30), (30, 80, 170), (220, 220, 220), (40, 140, 60))
SHIRT_PALETTE = (
    (200, 40, 40),
    (40, 80, 180),
    (230, 230, 225),
    (40, 40, 45),
    (60, 150, 70),
    (230, 180, 40),
    (150, 60, 150),
    (230, 120, 40),
)
TROUSER_PALETTE = ((35, 45, 80), (30, 30, 34), (120, 105, 80), (80, 80, 85))
SKIN_PALETTE = ((235, 200, 170), (200, 150, 110), (140, 95, 65), (95, 65, 45))
CONE_ORANGE = (240, 100, 20)
BARRIER_PALETTE = ((172, 172, 166), (232, 112, 30), (225, 225, 222))

# Fixed sun: every face's brightness is shade(normal) (tests recompute it).
SUN_DIRECTION = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])
AMBIENT, DIFFUSE = 0.5, 0.5


def shade(normal_world) -> float:
    """Brightness factor of a flat face with this outward unit normal (global frame)."""
    return AMBIENT + DIFFUSE * max(0.0, float(np.dot(normal_world, SUN_DIRECTION)))


def stable_hash(*parts) -> str:
    return hashlib.md5("|".join(str(p) for p in parts).encode()).hexdigest()


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(int(stable_hash(*parts)[:16], 16))


def _jitter(rng, rgb, amount=14) -> Tuple[int, int, int]:
    c = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in c)


def body_color(category: str, instance_token: str) -> Tuple[int, int, int]:
    """Unshaded RGB of the main body of an instance.

    For vehicle.car, bus, trailer and construction vehicles the body covers every side face of the
    annotation box at PROBE_HEIGHT of the box height (tests probe images there).
    """
    rng = _rng("body", category, instance_token)
    palette = {
        "vehicle.car": CAR_PALETTE,
        "vehicle.truck": TRUCK_PALETTE,
        "vehicle.bus.rigid": BUS_PALETTE,
        "vehicle.bus.bendy": BUS_PALETTE,
        "vehicle.trailer": TRAILER_PALETTE,
        "vehicle.construction": CONSTRUCTION_PALETTE,
        "vehicle.motorcycle": CYCLE_PALETTE,
        "vehicle.bicycle": CYCLE_PALETTE,
        "human.pedestrian.adult": TROUSER_PALETTE,
        "movable_object.trafficcone": (CONE_ORANGE,),
        "movable_object.barrier": BARRIER_PALETTE,
    }[category]
    return _jitter(rng, palette[rng.integers(len(palette))], 10 if len(palette) > 1 else 6)


PROBE_HEIGHT = 0.35
PROBE_CATEGORIES = ("vehicle.car", "vehicle.bus.rigid", "vehicle.bus.bendy", "vehicle.trailer")


@dataclass
class Part:
    """An axis-aligned box in the object frame (x forward, y left, z up from the ground), in m."""

    lo: np.ndarray
    hi: np.ndarray
    side: Tuple[int, int, int]
    top: Tuple[int, int, int]
    # Painted rectangles: (face, a0, a1, b0, b1, rgb), face in (+x,-x,+y,-y,+z,-z) order and a, b
    # the face's two in-plane axes in x, y, z order, in m in the object frame.
    decals: List[tuple] = field(default_factory=list)


def object_parts(category: str, instance_token: str, wlh: Sequence[float], rider: bool) -> List[Part]:
    """Blocky but characteristic geometry of one instance inside its annotation box."""
    w, l, h = wlh
    rng = _rng("parts", category, instance_token)
    body = body_color(category, instance_token)
    parts: List[Part] = []

    def add(x0, x1, y0, y1, z0, z1, side, top=None) -> Part:
        part = Part(
            np.array([x0 * l, y0 * w, z0 * h]),
            np.array([x1 * l, y1 * w, z1 * h]),
            side,
            side if top is None else top,
        )
        parts.append(part)
        return part

    def paint(part, faces, a0, a1, b0, b1, rgb):
        """Decal in box-relative units of the face's two in-plane axes."""
        for face in faces:
            axes = [k for k in range(3) if k != face // 2]
            scale = [(l, w, h)[k] for k in axes]
            part.decals.append((face, a0 * scale[0], a1 * scale[0], b0 * scale[1], b1 * scale[1], rgb))

    if category == "vehicle.car":
        shell = add(-0.5, 0.5, -0.5, 0.5, 0.0, 0.56, body)
        paint(shell, [0, 1], -0.5, 0.5, 0.0, 0.16, UNDERBODY)  # bumpers and the shadowed underside
        paint(shell, [2, 3], -0.5, 0.5, 0.0, 0.14, UNDERBODY)
        add(-0.30, 0.20, -0.44, 0.44, 0.56, 1.0, GLASS, body)
        for y0, y1 in ((0.26, 0.44), (-0.44, -0.26)):
            paint(shell, [0], y0, y1, 0.40, 0.50, (235, 235, 215))  # head lights
            paint(shell, [1], y0, y1, 0.40, 0.50, (190, 20, 20))  # tail lights
        for x0, x1 in ((0.22, 0.38), (-0.38, -0.22)):
            paint(shell, [2, 3], x0, x1, 0.14, 0.30, (28, 28, 30))  # wheels
    elif category == "vehicle.truck":
        cab = _jitter(rng, TRUCK_PALETTE[rng.integers(len(TRUCK_PALETTE))])
        add(-0.48, 0.48, -0.47, 0.47, 0.0, 0.22, UNDERBODY)
        front = add(0.28, 0.5, -0.5, 0.5, 0.12, 0.68, cab)
        add(0.30, 0.48, -0.46, 0.46, 0.68, 0.92, GLASS, cab)
        cargo = add(-0.5, 0.26, -0.5, 0.5, 0.20, 1.0, body)
        for y0, y1 in ((0.28, 0.45), (-0.45, -0.28)):
            paint(front, [0], y0, y1, 0.22, 0.30, (235, 235, 215))
            paint(cargo, [1], y0, y1, 0.24, 0.30, (190, 20, 20))
    elif category in ("vehicle.bus.rigid", "vehicle.bus.bendy"):
        shell = add(-0.5, 0.5, -0.5, 0.5, 0.0, 1.0, body, (225, 225, 222))
        paint(shell, [0, 1, 2, 3], -0.5, 0.5, 0.0, 0.08, UNDERBODY)
        paint(shell, [2, 3], -0.47, 0.5, 0.55, 0.86, GLASS)  # window band
        paint(shell, [0], -0.45, 0.45, 0.45, 0.9, GLASS)  # wind screen
        paint(shell, [1], -0.4, 0.4, 0.6, 0.86, GLASS)
        for y0, y1 in ((0.3, 0.45), (-0.45, -0.3)):
            paint(shell, [0], y0, y1, 0.15, 0.22, (235, 235, 215))
            paint(shell, [1], y0, y1, 0.15, 0.22, (190, 20, 20))
        if category == "vehicle.bus.bendy":
            paint(shell, [2, 3], 0.08, 0.14, 0.10, 0.95, (40, 40, 42))  # the articulation
    elif category == "vehicle.trailer":
        shell = add(-0.5, 0.5, -0.5, 0.5, 0.0, 1.0, body)
        paint(shell, [0, 1, 2, 3], -0.5, 0.5, 0.0, 0.25, UNDERBODY)
        for y0, y1 in ((0.3, 0.45), (-0.45, -0.3)):
            paint(shell, [1], y0, y1, 0.27, 0.33, (190, 20, 20))
    elif category == "vehicle.construction":
        add(-0.45, 0.45, -0.5, 0.5, 0.0, 0.22, (52, 50, 48))
        add(-0.5, 0.2, -0.5, 0.5, 0.2, 0.62, body)
        add(-0.2, 0.15, -0.42, 0.42, 0.62, 1.0, GLASS, body)
        add(0.2, 0.5, -0.1, 0.1, 0.35, 0.92, body)
    elif category in ("vehicle.motorcycle", "vehicle.bicycle"):
        frame_half = 0.25 if category == "vehicle.motorcycle" else 0.12
        add(-0.5, 0.5, -frame_half, frame_half, 0.0, 0.55, body)
        if rider:
            shirt = _jitter(rng, SHIRT_PALETTE[rng.integers(len(SHIRT_PALETTE))])
            add(-0.22, 0.12, -0.42, 0.42, 0.55, 0.86, shirt)
            add(
                -0.10,
                0.06,
                -0.2,
                0.2,
                0.86,
                1.0,
                (30, 30, 30)
                if category == "vehicle.motorcycle"
                else SKIN_PALETTE[rng.integers(len(SKIN_PALETTE))],
            )
    elif category == "human.pedestrian.adult":
        shirt = _jitter(rng, SHIRT_PALETTE[rng.integers(len(SHIRT_PALETTE))])
        skin = SKIN_PALETTE[rng.integers(len(SKIN_PALETTE))]
        add(-0.25, 0.25, -0.32, 0.32, 0.0, 0.47, body)
        add(-0.30, 0.30, -0.5, 0.5, 0.47, 0.83, shirt)
        add(-0.17, 0.17, -0.2, 0.2, 0.86, 1.0, skin)
    elif category == "movable_object.trafficcone":
        add(-0.5, 0.5, -0.5, 0.5, 0.0, 0.06, (200, 80, 18))
        add(-0.3, 0.3, -0.3, 0.3, 0.06, 0.45, body)
        add(-0.23, 0.23, -0.23, 0.23, 0.45, 0.65, (235, 235, 235))
        add(-0.15, 0.15, -0.15, 0.15, 0.65, 1.0, body)
    elif category == "movable_object.barrier":
        if body[0] > 200 and body[1] < 150:  # plastic orange/white striped
            for i in range(5):
                add(
                    -0.5 + i * 0.2,
                    -0.3 + i * 0.2,
                    -0.5,
                    0.5,
                    0.0,
                    1.0,
                    body if i % 2 == 0 else (235, 235, 232),
                )
        else:  # concrete jersey barrier
            add(-0.5, 0.5, -0.5, 0.5, 0.0, 0.35, body)
            add(-0.5, 0.5, -0.25, 0.25, 0.35, 1.0, body)
    else:
        raise ValueError(f"synthetic generator has no look for category {category!r}")
    return parts


# ---------------------------------------------------------------------------------------------
# Roads
# ---------------------------------------------------------------------------------------------
LANE = 3.5
ROAD_HALF = 9.5  # two lanes per direction + a parking strip of 2.5 m
PARKING_OFFSET = 8.25
SIDEWALK_HALF = 13.0
TURN_RADIUS = 14.0
MAP_RES = 0.1  # m per pixel for the ground texture and the map mask (nuScenes map masks: 0.1 m)
MARGIN = 90.0  # m of ground around the roads


class Road:
    """A centreline sampled every ~0.5 m; s is the arclength, heading in radians."""

    def __init__(self, xy: np.ndarray):
        self.xy = np.asarray(xy, dtype=np.float64)
        d = np.diff(self.xy, axis=0)
        self.s = np.concatenate([[0.0], np.cumsum(np.hypot(d[:, 0], d[:, 1]))])
        heading = np.arctan2(d[:, 1], d[:, 0])
        self.heading = np.unwrap(np.concatenate([heading, heading[-1:]]))
        self.length = float(self.s[-1])

    def pose(self, s, offset=0.0):
        """Position (x, y) at arclength s shifted `offset` m to the right, and the heading."""
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        h = np.interp(s, self.s, self.heading)
        return x + offset * np.sin(h), y - offset * np.cos(h), h

    def shifted(self, dxy) -> Road:
        return Road(self.xy + np.asarray(dxy)[None, :])


def _integrate(start, heading, segments, step=0.5) -> np.ndarray:
    """Polyline from (length, curvature) segments."""
    pts = [np.array(start, dtype=np.float64)]
    h = heading
    for length, kappa in segments:
        n = max(1, int(round(length / step)))
        ds = length / n
        for _ in range(n):
            h += kappa * ds * 0.5
            pts.append(pts[-1] + ds * np.array([math.cos(h), math.sin(h)]))
            h += kappa * ds * 0.5
    return np.stack(pts)


def _straight(p, heading, back, ahead) -> np.ndarray:
    d = np.array([math.cos(heading), math.sin(heading)])
    s = np.arange(-back, ahead + 0.25, 0.5)
    return np.asarray(p)[None, :] + s[:, None] * d[None, :]


# ---------------------------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------------------------
VEHICLES = (
    "vehicle.car",
    "vehicle.truck",
    "vehicle.bus.rigid",
    "vehicle.bus.bendy",
    "vehicle.trailer",
    "vehicle.construction",
)
CYCLES = ("vehicle.motorcycle", "vehicle.bicycle")


@dataclass
class Actor:
    aid: int
    category: str
    wlh: Tuple[float, float, float]
    mode: str  # 'static' | 'lane' (constant speed along a road) | 'follow' (keeps a gap to the ego)
    instance_token: str = ""
    road: int = 0
    offset: float = 0.0
    direction: int = 1
    s0: float = 0.0
    speed: float = 0.0
    static_pose: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    rider: bool = False
    parts: List[Part] = field(default_factory=list)


@dataclass
class ActorState:
    x: float
    y: float
    yaw: float
    vx: float
    vy: float

    @property
    def speed(self) -> float:
        return math.hypot(self.vx, self.vy)


class Scene:
    """One scene's world: roads, ground texture, ego motion and actors."""

    def __init__(self, name: str, seed: int, keyframes: int):
        self.name = name
        self.seed = seed
        self.keyframes = keyframes
        rng = _rng("scene", seed, name)
        self.duration = (keyframes - 1) * KEYFRAME_PERIOD_US * 1e-6
        self._make_ego_profile(rng)
        self._make_roads(rng)
        self._make_texture(rng)
        self.actors: List[Actor] = []
        self._populate(rng)

    # ---- ego -----------------------------------------------------------------------------
    def _make_ego_profile(self, rng):
        t_end = self.duration + 2.0
        knots_t = np.arange(-2.0, t_end + 5.0, 5.0)
        style = rng.choice(["cruise", "slow", "stop"], p=[0.6, 0.2, 0.2])
        if style == "cruise":
            knots_v = rng.uniform(6.0, 12.0, len(knots_t))
        elif style == "slow":
            knots_v = rng.uniform(1.5, 5.0, len(knots_t))
        else:
            knots_v = rng.uniform(4.0, 10.0, len(knots_t))
            k = int(rng.integers(1, max(2, len(knots_t) - 1)))
            knots_v[k] = 0.0
            if k + 1 < len(knots_t):
                knots_v[k + 1] = 0.0
        self._t_grid = np.arange(-2.0, t_end + 0.005, 0.01)
        v = np.interp(self._t_grid, knots_t, knots_v)
        s = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * 0.01)])
        self._s_grid = s - np.interp(0.0, self._t_grid, s)  # s = 0 at keyframe 0
        self.style = str(style)

    def ego_s(self, t):
        return np.interp(t, self._t_grid, self._s_grid)

    # ---- roads ---------------------------------------------------------------------------
    def _make_roads(self, rng):
        travel = float(self._s_grid[-1] - self._s_grid[0])
        self.ego_s0 = 110.0  # arclength of the ego on the main road at keyframe 0
        total = self.ego_s0 + travel + 130.0
        turn_s: float | None = None
        if travel > 40.0 and rng.random() < 0.5:
            turn_s = self.ego_s0 + rng.uniform(0.25, 0.6) * travel

        def random_segment(max_len):
            if rng.random() < 0.55:
                return (float(rng.uniform(30.0, 90.0)), 0.0)
            radius = float(rng.uniform(90.0, 220.0))
            angle = math.radians(float(rng.uniform(10.0, 35.0)))
            return (min(radius * angle, max_len), (1 if rng.random() < 0.5 else -1) / radius)

        segments: List[Tuple[float, float]] = [(float(rng.uniform(40.0, 80.0)), 0.0)]
        length = segments[0][0]
        if turn_s is not None:
            while turn_s - length > 60.0:
                segments.append(random_segment(turn_s - length - 20.0))
                length += segments[-1][0]
            if turn_s > length:
                segments.append((turn_s - length, 0.0))
                length = turn_s
            sign = 1.0 if rng.random() < 0.5 else -1.0
            segments.append((0.5 * math.pi * TURN_RADIUS, sign / TURN_RADIUS))
            segments.append((30.0, 0.0))
            length += segments[-2][0] + 30.0
        while length < total:
            segments.append(random_segment(1e9))
            length += segments[-1][0]
        heading0 = float(rng.uniform(-math.pi, math.pi))
        main = _integrate((0.0, 0.0), heading0, segments)
        roads = [main]
        intersections: List[Tuple[np.ndarray, float]] = []  # (point, radius without markings)
        main_road = Road(main)
        # A 90-degree turn happens at a four-way intersection: both straight roads cross there.
        s_acc = 0.0
        for seg_len, kappa in segments:
            if abs(kappa) > 0.05:
                x, y, h_in = main_road.pose(s_acc)
                corner = np.array([x, y]) + TURN_RADIUS * np.array([math.cos(h_in), math.sin(h_in)])
                h_out = h_in + math.copysign(math.pi / 2, kappa)
                roads.append(_straight(corner, h_in, 70.0, 70.0))
                roads.append(_straight(corner, h_out, 70.0, 70.0))
                intersections.append((corner, TURN_RADIUS + 9.0))
            s_acc += seg_len
        # Side streets crossing straight stretches.
        for _ in range(int(rng.integers(0, 3))):
            s_cross = float(rng.uniform(40.0, main_road.length - 40.0))
            if any(np.hypot(*(np.array(main_road.pose(s_cross)[:2]) - p)) < 60.0 for p, _ in intersections):
                continue
            x, y, h = main_road.pose(s_cross)
            roads.append(_straight((x, y), h + math.pi / 2, 70.0, 70.0))
            intersections.append((np.array([x, y]), 15.0))
        all_pts = np.concatenate(roads)
        shift = MARGIN - all_pts.min(axis=0)
        self.roads = [Road(r + shift[None, :]) for r in roads]
        self.intersections = [(p + shift, r) for p, r in intersections]
        extent = all_pts.max(axis=0) + shift + MARGIN
        self.map_size = (
            int(math.ceil(extent[1] / MAP_RES)),
            int(math.ceil(extent[0] / MAP_RES)),
        )  # rows, cols

    def near_intersection(self, xy, extra=0.0) -> bool:
        return any(np.hypot(*(np.asarray(xy) - p)) < r + extra for p, r in self.intersections)

    # ---- ground --------------------------------------------------------------------------
    def _make_texture(self, rng):
        rows, cols = self.map_size
        label = np.zeros((rows, cols), np.uint8)  # 0 grass, 1 sidewalk, 2 road, 3 white, 4 yellow paint

        def to_px(xy):
            return np.round(xy / MAP_RES * 4).astype(np.int32).reshape(-1, 1, 2)  # 2 fractional bits

        for road in self.roads:
            cv2.polylines(label, [to_px(road.xy)], False, 1, int(2 * SIDEWALK_HALF / MAP_RES), cv2.LINE_8, 2)
        for road in self.roads:
            cv2.polylines(label, [to_px(road.xy)], False, 2, int(2 * ROAD_HALF / MAP_RES), cv2.LINE_8, 2)
        self.drivable = label.copy()
        for road in self.roads:
            s = np.arange(0.0, road.length, 0.5)
            clear = np.ones_like(s, dtype=bool)
            xs, ys, _ = road.pose(s)
            for p, r in self.intersections:
                clear &= np.hypot(xs - p[0], ys - p[1]) > r
            dash = (s % 9.0) < 3.0
            for offset, colour, on in (
                (-0.15, 4, clear),
                (0.15, 4, clear),
                (-LANE, 3, clear & dash),
                (LANE, 3, clear & dash),
                (-2 * LANE, 3, clear),
                (2 * LANE, 3, clear),
            ):
                x, y, _ = road.pose(s, offset)
                pts = np.stack([x, y], axis=1)
                for run in _runs(on):
                    if len(run) >= 2:
                        cv2.polylines(label, [to_px(pts[run])], False, colour, 2, cv2.LINE_8, 2)
        self.label = label
        # Mottling (asphalt patches, grass) plus fine grain, as a brightness offset in [0, 28].
        base = np.array(
            [[58, 90, 36], [136, 134, 126], [60, 60, 63], [201, 201, 194], [191, 158, 38]], np.uint8
        )
        coarse = rng.integers(0, 19, (rows // 16 + 2, cols // 16 + 2), dtype=np.uint8)
        coarse = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_LINEAR)
        grain = rng.integers(0, 11, (rows, cols), dtype=np.uint8)
        self.texture = base[label]
        self.texture += (coarse + grain)[..., None]

    def map_mask(self) -> np.ndarray:
        """nuScenes-style semantic prior (drivable + sidewalk = 255), row 0 at the largest y."""
        return np.flipud(np.where(self.drivable > 0, 255, 0).astype(np.uint8))

    # ---- actors --------------------------------------------------------------------------
    def _new_actor(self, rng, category, mode, rider=False, **kw) -> Actor:
        mean, jit = SIZES[category]
        wlh = tuple(float(m * (1.0 + rng.uniform(-j, j))) for m, j in zip(mean, jit))
        if category in CYCLES and not rider:
            wlh = (wlh[0], wlh[1], wlh[2] * 0.72)
        aid = len(self.actors)
        token = stable_hash("instance", self.seed, self.name, aid)
        actor = Actor(aid, category, wlh, mode, instance_token=token, rider=rider, **kw)
        actor.parts = object_parts(category, token, wlh, rider)
        self.actors.append(actor)
        return actor

    def _populate(self, rng):
        main = self.roads[0]
        travel = float(self._s_grid[-1])
        ego_lo, ego_hi = self.ego_s0 - 80.0, self.ego_s0 + travel + 80.0
        density = float(rng.uniform(0.6, 1.4))

        def traffic_category():
            return str(
                rng.choice(
                    [
                        "vehicle.car",
                        "vehicle.truck",
                        "vehicle.bus.rigid",
                        "vehicle.bus.bendy",
                        "vehicle.trailer",
                        "vehicle.construction",
                        "vehicle.motorcycle",
                    ],
                    p=[0.74, 0.09, 0.06, 0.02, 0.02, 0.02, 0.05],
                )
            )

        # Vehicles in the ego lane keep a constant gap to the ego (so they never collide).
        gaps = list(rng.uniform(12.0, 40.0, int(rng.integers(0, 3))))
        if gaps:
            gaps = list(np.cumsum(gaps) + np.arange(len(gaps)) * 6.0)
        gaps += [-float(rng.uniform(10.0, 30.0))] if rng.random() < 0.6 else []
        for g in gaps:
            cat = traffic_category()
            self._new_actor(rng, cat, "follow", rider=cat in CYCLES, offset=LANE / 2, s0=float(g))
        # Other lanes: one speed per lane, vehicles spaced along the whole road.
        duration = self.duration + 2.0
        for offset, direction in ((1.5 * LANE, 1), (-LANE / 2, -1), (-1.5 * LANE, -1)):
            speed = float(rng.uniform(3.0, 13.0))
            s, s_end = -speed * duration - 20.0, main.length + speed * duration + 20.0
            s += float(rng.uniform(0.0, 30.0))
            while s < s_end:
                cat = traffic_category()
                a = self._new_actor(
                    rng,
                    cat,
                    "lane",
                    rider=cat in CYCLES,
                    offset=offset,
                    direction=direction,
                    s0=s,
                    speed=speed,
                )
                s += a.wlh[1] + float(rng.uniform(12.0, 80.0)) / density
        # Parking strips, a construction zone, sidewalks.
        zone = None
        if rng.random() < 0.6:
            z0 = float(rng.uniform(ego_lo + 40.0, ego_hi - 40.0))
            zone = (z0, z0 + float(rng.uniform(20.0, 40.0)), 1 if rng.random() < 0.5 else -1)
        for side in (1, -1):
            s = 5.0 + float(rng.uniform(0.0, 10.0))
            while s < main.length - 5.0:
                x, y, h = main.pose(s, side * PARKING_OFFSET)
                if zone and zone[2] == side and zone[0] - 3 < s < zone[1] + 3:
                    s = zone[1] + 3.0
                    continue
                if self.near_intersection((x, y), 6.0) or rng.random() > 0.4 * density:
                    s += float(rng.uniform(4.0, 15.0))
                    continue
                cat = str(
                    rng.choice(
                        [
                            "vehicle.car",
                            "vehicle.truck",
                            "vehicle.trailer",
                            "vehicle.motorcycle",
                            "vehicle.bicycle",
                            "vehicle.bus.rigid",
                        ],
                        p=[0.8, 0.06, 0.04, 0.05, 0.03, 0.02],
                    )
                )
                mean_l = SIZES[cat][0][1]
                x, y, h = main.pose(s + mean_l / 2, side * PARKING_OFFSET)
                yaw = h if side > 0 else h + math.pi
                a = self._new_actor(rng, cat, "static", static_pose=(float(x), float(y), float(yaw)))
                s += a.wlh[1] + float(rng.uniform(0.8, 6.0))
        if zone:
            z0, z1, side = zone
            for s in np.arange(z0, z1, 3.0):
                x, y, h = main.pose(s, side * (2 * LANE + 0.3))
                self._new_actor(
                    rng, "movable_object.trafficcone", "static", static_pose=(float(x), float(y), float(h))
                )
            s = z0 + 2.0
            while s < z1 - 2.0:
                x, y, h = main.pose(s + 1.3, side * (ROAD_HALF - 0.4))
                a = self._new_actor(
                    rng, "movable_object.barrier", "static", static_pose=(float(x), float(y), float(h))
                )
                s += a.wlh[1] + 0.3
            mid = 0.5 * (z0 + z1)
            x, y, h = main.pose(mid, side * (PARKING_OFFSET - 0.3))
            if z1 - z0 > 26:
                self._new_actor(
                    rng, "vehicle.construction", "static", static_pose=(float(x), float(y), float(h))
                )
            for _ in range(int(rng.integers(1, 3))):
                x, y, h = main.pose(float(rng.uniform(z0, z1)), side * (ROAD_HALF + 0.6))
                self._new_actor(
                    rng,
                    "human.pedestrian.adult",
                    "static",
                    static_pose=(float(x), float(y), float(rng.uniform(-math.pi, math.pi))),
                )
        for side in (1, -1):
            n_ped = int(main.length / 40.0 * density)
            for _ in range(n_ped):
                offset = side * float(rng.uniform(ROAD_HALF + 1.0, SIDEWALK_HALF - 0.6))
                s = float(rng.uniform(0.0, main.length))
                if rng.random() < 0.7:
                    self._new_actor(
                        rng,
                        "human.pedestrian.adult",
                        "lane",
                        offset=offset,
                        direction=1 if rng.random() < 0.5 else -1,
                        s0=s,
                        speed=float(rng.uniform(0.9, 1.7)),
                    )
                else:
                    x, y, _ = main.pose(s, offset)
                    self._new_actor(
                        rng,
                        "human.pedestrian.adult",
                        "static",
                        static_pose=(float(x), float(y), float(rng.uniform(-math.pi, math.pi))),
                    )
            for _ in range(int(rng.integers(0, 4))):
                s = float(rng.uniform(0.0, main.length))
                x, y, h = main.pose(s, side * (ROAD_HALF + 0.5))
                self._new_actor(
                    rng, "vehicle.bicycle", "static", static_pose=(float(x), float(y), float(h + math.pi / 2))
                )
        # Side streets: cars waiting at the junction, cars driving away, parked cars.
        for ridx in range(1, len(self.roads)):
            road = self.roads[ridx]
            centre = road.length / 2
            for direction in (1, -1):
                if rng.random() < 0.6:
                    s_wait = centre - direction * (ROAD_HALF + 6.0)
                    off = direction * LANE / 2
                    self._new_actor(
                        rng,
                        "vehicle.car",
                        "lane",
                        road=ridx,
                        offset=off,
                        direction=direction,
                        s0=s_wait,
                        speed=0.0,
                    )
                if rng.random() < 0.7:
                    speed = float(rng.uniform(4.0, 10.0))
                    s_start = centre + direction * (ROAD_HALF + 4.0 + float(rng.uniform(0.0, 25.0)))
                    self._new_actor(
                        rng,
                        traffic_category(),
                        "lane",
                        road=ridx,
                        offset=direction * LANE / 2,
                        direction=direction,
                        s0=s_start,
                        speed=speed,
                    )
                for side in (1, -1):
                    for _ in range(int(rng.integers(0, 3))):
                        s = centre + side * float(rng.uniform(ROAD_HALF + 10.0, 65.0))
                        x, y, h = road.pose(s, direction * PARKING_OFFSET)
                        if self._static_clear(x, y, 6.0):
                            self._new_actor(
                                rng,
                                "vehicle.car",
                                "static",
                                static_pose=(float(x), float(y), float(h if direction > 0 else h + math.pi)),
                            )

    def _static_clear(self, x, y, radius) -> bool:
        for a in self.actors:
            if a.mode == "static" and math.hypot(a.static_pose[0] - x, a.static_pose[1] - y) < radius:
                return False
        return not self.near_intersection((x, y), 2.0)

    # ---- state at a time -----------------------------------------------------------------
    def ego_state(self, t: float) -> ActorState:
        return self._moving_state(lambda tt: self.roads[0].pose(self.ego_s0 + self.ego_s(tt), LANE / 2), t)

    def actor_state(self, actor: Actor, t: float) -> ActorState | None:
        if actor.mode == "static":
            x, y, yaw = actor.static_pose
            return ActorState(x, y, yaw, 0.0, 0.0)
        road = self.roads[actor.road]

        def pose(tt):
            if actor.mode == "follow":
                s = self.ego_s0 + float(self.ego_s(tt)) + actor.s0
            else:
                s = actor.s0 + actor.direction * actor.speed * tt
            if not (0.0 <= s <= road.length):
                return None
            x, y, h = road.pose(s, actor.offset)
            return x, y, (float(h) if actor.direction > 0 else float(h) + math.pi)

        return self._moving_state(pose, t)

    def actor_position(self, actor: Actor, t: float) -> Tuple[float, float] | None:
        """Where the actor's box centre is (cheaper than actor_state)."""
        if actor.mode == "static":
            return actor.static_pose[0], actor.static_pose[1]
        road = self.roads[actor.road]
        if actor.mode == "follow":
            s = self.ego_s0 + float(self.ego_s(t)) + actor.s0
        else:
            s = actor.s0 + actor.direction * actor.speed * t
        if not (0.0 <= s <= road.length):
            return None
        x, y, _ = road.pose(s, actor.offset)
        return float(x), float(y)

    @staticmethod
    def _moving_state(pose, t: float, dt: float = 0.02) -> ActorState | None:
        """State from a pose function of time; the velocity is the true motion of the box centre
        (on an offset lane of a curve it differs from the lane's centreline speed)."""
        now = pose(t)
        if now is None:
            return None
        before, after = pose(t - dt), pose(t + dt)
        t0, t1 = (
            (t - dt, before) if before is not None else (t, now),
            (t + dt, after) if after is not None else (t, now),
        )
        span = t1[0] - t0[0]
        vx = float(t1[1][0] - t0[1][0]) / span if span > 0 else 0.0
        vy = float(t1[1][1] - t0[1][1]) / span if span > 0 else 0.0
        return ActorState(float(now[0]), float(now[1]), float(now[2]), vx, vy)

    def describe(self) -> str:
        turns = sum(1 for p, r in self.intersections if r > 20)
        cats = sorted({a.category.split(".")[-1] for a in self.actors})
        return (
            f"Synthetic {SCENE_LOCATIONS.get(self.name, 'town')}: {self.style} ego, "
            f"{len(self.roads) - 1} side roads{', turn at junction' if turns else ''}; {', '.join(cats)}"
        )


def _runs(mask: np.ndarray) -> List[np.ndarray]:
    """Index arrays of the contiguous True runs of a 1-D mask."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1) + 1
    return np.split(idx, breaks)


def attribute_names(actor: Actor, state: ActorState) -> List[str]:
    moving = state.speed > 0.3
    if actor.category in VEHICLES:
        if moving:
            return ["vehicle.moving"]
        return ["vehicle.stopped"] if actor.mode != "static" else ["vehicle.parked"]
    if actor.category in CYCLES:
        return ["cycle.with_rider"] if actor.rider else ["cycle.without_rider"]
    if actor.category.startswith("human.pedestrian"):
        return ["pedestrian.moving"] if moving else ["pedestrian.standing"]
    return []


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


def scene_rigs(width: int, height: int) -> Dict[str, dict]:
    """Calibration per channel: ego_R_sensor (3x3), ego_t_sensor (3,), K (3x3 or None)."""
    rigs = {}
    sx, sy = width / 1600.0, height / 900.0
    for ch, (t, yaw, f, cx, cy) in CAMERA_RIG.items():
        # a resize keeps pixel centres (at integers) exact: u -> sx * (u + 0.5) - 0.5
        cx, cy = (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5
        k = np.array([[f * sx, 0.0, cx], [0.0, f * sy, cy], [0.0, 0.0, 1.0]])
        rigs[ch] = dict(R=camera_rotation(yaw), t=np.array(t, dtype=np.float64), K=k, modality="camera")
    rigs[LIDAR] = dict(
        R=yaw_matrix(math.radians(LIDAR_RIG[1])), t=np.array(LIDAR_RIG[0]), K=None, modality="lidar"
    )
    for ch, (t, yaw) in RADAR_RIG.items():
        rigs[ch] = dict(R=yaw_matrix(math.radians(yaw)), t=np.array(t), K=None, modality="radar")
    return rigs
