"""Lidar and radar of a synthetic scene: ray-cast scans in nuScenes' formats, the radar's binary PCD
writer, and the per-box point counts that annotations carry."""

from __future__ import annotations

import math
from typing import List

import numpy as np

from .catalog import LIDAR_RANGE, RADAR_HALF_FOV_DEG, RADAR_RANGE
from .render import PlacedObject, cast_rays
from .world import MAP_RES, Scene

# Lidar: HDL-32E-like fan, modest resolution to keep the set small.
LIDAR_BEAMS = np.radians(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTHS = 600
INTENSITY = {"vehicle": 40.0, "human": 20.0, "movable_object": 60.0}
# per ground label (streetmap: grass, sidewalk, road, white and yellow paint, car park)
GROUND_INTENSITY = np.array([6.0, 14.0, 4.0, 90.0, 80.0, 8.0])


def lidar_scan(
    scene: Scene, ego, objects: List[PlacedObject], rig: dict, rng: np.random.Generator
) -> np.ndarray:
    """(N, 5) float32 x, y, z, intensity, ring in the LIDAR_TOP frame."""
    az = np.arange(LIDAR_AZIMUTHS) * (2 * math.pi / LIDAR_AZIMUTHS) + rng.uniform(
        0, 2 * math.pi / LIDAR_AZIMUTHS
    )
    el, azg = np.meshgrid(LIDAR_BEAMS, az, indexing="ij")
    ring = np.repeat(np.arange(len(LIDAR_BEAMS)), LIDAR_AZIMUTHS)
    dirs_lidar = np.stack([np.cos(el) * np.cos(azg), np.cos(el) * np.sin(azg), np.sin(el)], -1).reshape(-1, 3)
    dirs = dirs_lidar @ rig["R"].T  # ego frame
    rng_hit, who = cast_rays(rig["t"], dirs, objects, LIDAR_RANGE)
    keep = np.isfinite(rng_hit)
    r = rng_hit[keep] + rng.normal(0.0, 0.01, keep.sum())
    pts_ego = rig["t"][None, :] + dirs[keep] * r[:, None]
    who = who[keep]
    ground = who < 0
    pts_ego[ground, 2] = np.clip(pts_ego[ground, 2], -0.01, 0.01)  # the ground is flat: noise only in x, y
    intensity = np.empty(len(pts_ego))
    if ground.any():
        c, s = math.cos(ego.yaw), math.sin(ego.yaw)
        gx = c * pts_ego[ground, 0] - s * pts_ego[ground, 1] + ego.x
        gy = s * pts_ego[ground, 0] + c * pts_ego[ground, 1] + ego.y
        rows, cols = scene.label.shape
        lab = scene.label[
            np.clip((gy / MAP_RES).astype(int), 0, rows - 1), np.clip((gx / MAP_RES).astype(int), 0, cols - 1)
        ]
        intensity[ground] = GROUND_INTENSITY[lab]
    for k in np.unique(who[~ground]):
        intensity[who == k] = INTENSITY[objects[k].actor.category.split(".")[0]]
    intensity = np.clip(intensity + rng.normal(0.0, 2.0, len(intensity)), 0.0, 255.0)
    pts = (pts_ego - rig["t"][None, :]) @ rig["R"]  # ego -> lidar: R^T (p - t)
    out = np.stack([pts[:, 0], pts[:, 1], pts[:, 2], intensity, ring[keep]], axis=1)
    return out.astype(np.float32)


RADAR_DTYPE = np.dtype(
    [
        ("x", "<f4"),
        ("y", "<f4"),
        ("z", "<f4"),
        ("dyn_prop", "i1"),
        ("id", "<i2"),
        ("rcs", "<f4"),
        ("vx", "<f4"),
        ("vy", "<f4"),
        ("vx_comp", "<f4"),
        ("vy_comp", "<f4"),
        ("is_quality_valid", "i1"),
        ("ambig_state", "i1"),
        ("x_rms", "i1"),
        ("y_rms", "i1"),
        ("invalid_state", "i1"),
        ("pdh0", "i1"),
        ("vx_rms", "i1"),
        ("vy_rms", "i1"),
    ]
)
RCS = {
    "vehicle.car": 8.0,
    "vehicle.truck": 18.0,
    "vehicle.bus.rigid": 20.0,
    "vehicle.bus.bendy": 22.0,
    "vehicle.trailer": 18.0,
    "vehicle.construction": 16.0,
    "vehicle.motorcycle": 2.0,
    "vehicle.bicycle": -3.0,
    "human.pedestrian.adult": -6.0,
    "movable_object.trafficcone": -8.0,
    "movable_object.barrier": 3.0,
}
RETURNS = {
    "vehicle.truck": 5,
    "vehicle.bus.rigid": 6,
    "vehicle.bus.bendy": 7,
    "vehicle.trailer": 5,
    "vehicle.construction": 4,
    "vehicle.car": 3,
}


def radar_scan(ego, objects: List[PlacedObject], rig: dict, rng: np.random.Generator) -> np.ndarray:
    """Structured array (RADAR_DTYPE) of returns in the radar frame: object returns that pass the
    devkit's default filters, plus clutter that the default filters drop."""
    half = math.radians(RADAR_HALF_FOV_DEG)
    records = _object_returns(ego, objects, rig, rng, half) + _clutter(rng, half)
    arr = np.array([tuple(r[name] for name in RADAR_DTYPE.names) for r in records], dtype=RADAR_DTYPE)
    arr["id"] = np.arange(len(arr))
    return arr


def _radar_record(x, y, dyn_prop, rcs, v_raw, v_comp, **flags) -> dict:
    """One return's 18 fields; `flags` overrides the fields of a return that the devkit's default
    filters keep."""
    rec = dict(x=x, y=y, z=0.0, dyn_prop=dyn_prop, id=0, rcs=rcs, vx=v_raw[0], vy=v_raw[1])
    rec.update(vx_comp=v_comp[0], vy_comp=v_comp[1], is_quality_valid=1, ambig_state=3)
    rec.update(x_rms=19, y_rms=19, invalid_state=0, pdh0=1, vx_rms=17, vy_rms=3)
    rec.update(flags)
    return rec


def _object_returns(ego, objects: List[PlacedObject], rig: dict, rng, half: float) -> List[dict]:
    """A few returns per object hit by the radar's fan, with Doppler velocities."""
    az = np.linspace(-half, half, 481)
    dirs_radar = np.stack([np.cos(az), np.sin(az), np.zeros_like(az)], -1)
    dirs = dirs_radar @ rig["R"].T
    rng_hit, who = cast_rays(rig["t"], dirs, objects, RADAR_RANGE, with_ground=False)
    ego_v = np.array([ego.speed, 0.0, 0.0])  # ego frame
    records = []
    for k in np.unique(who[who >= 0]):
        ob = objects[k]
        rays = np.flatnonzero(who == k)
        small = ob.actor.category not in RETURNS
        if small and rng.random() < 0.25:
            continue  # weak reflectors are missed now and then
        n = min(len(rays), RETURNS.get(ob.actor.category, 1))
        pick = rays[np.sort(rng.choice(len(rays), n, replace=False))] if n < len(rays) else rays
        # The object's velocity in the ego frame (global velocity rotated by the ego yaw).
        c, s = math.cos(ego.yaw), math.sin(ego.yaw)
        v_obj = np.array([c * ob.state.vx + s * ob.state.vy, -s * ob.state.vx + c * ob.state.vy, 0.0])
        moving = ob.state.speed > 0.3
        for i in pick:
            p_ego = rig["t"] + dirs[i] * rng_hit[i]
            p_ego[:2] += rng.normal(0.0, 0.03, 2)
            p = rig["R"].T @ (p_ego - rig["t"])
            radial = p / max(np.linalg.norm(p), 1e-6)
            v_comp_r = rig["R"].T @ v_obj
            v_rel_r = rig["R"].T @ (v_obj - ego_v)
            v_comp = radial * float(v_comp_r @ radial)  # Doppler sees the radial component only
            v_raw = radial * float(v_rel_r @ radial)
            if moving:
                dyn = 2 if float(v_comp_r @ radial) < 0 else 0  # oncoming / moving
            else:
                dyn = 1
            rcs = RCS[ob.actor.category] + rng.normal(0, 2.0)
            records.append(_radar_record(p[0], p[1], dyn, rcs, v_raw, v_comp))
    return records


def _clutter(rng, half: float) -> List[dict]:
    """Multipath / low-RCS ghosts, each flagged so that a default filter rejects it."""
    records = []
    for _ in range(int(rng.integers(2, 7))):
        a = rng.uniform(-half, half)
        r = rng.uniform(3.0, RADAR_RANGE)
        reason = rng.integers(3)
        invalid = int(rng.choice([1, 2, 6])) if reason == 0 else 0
        ambig = int(rng.choice([0, 1, 4])) if reason == 1 else 3
        dyn = 7 if reason == 2 else int(rng.choice([1, 3]))
        rcs = rng.normal(-5.0, 3.0)
        flags = dict(is_quality_valid=0, ambig_state=ambig, invalid_state=invalid, pdh0=5)
        records.append(
            _radar_record(r * math.cos(a), r * math.sin(a), dyn, rcs, (0.0, 0.0), (0.0, 0.0), **flags)
        )
    return records


def write_radar_pcd(path, points: np.ndarray) -> None:
    """Binary PCD v0.7 with nuScenes' 18 radar fields."""
    names = points.dtype.names
    sizes = [points.dtype[n].itemsize for n in names]
    types = ["F" if points.dtype[n].kind == "f" else "I" for n in names]
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {' '.join(names)}\nSIZE {' '.join(map(str, sizes))}\nTYPE {' '.join(types)}\n"
        f"COUNT {' '.join('1' for _ in names)}\nWIDTH {len(points)}\nHEIGHT 1\n"
        f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(points)}\nDATA binary\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(points.tobytes())
        # The devkit's reader asserts that bytes remain after the last field it decodes.
        f.write(b"\n")


def points_in_box_counts(points_ego: np.ndarray, objects: List[PlacedObject], margin: float) -> np.ndarray:
    """How many points (N, 3), ego frame, fall inside each object's box grown by `margin` m."""
    counts = np.zeros(len(objects), np.int64)
    if len(points_ego) == 0:
        return counts
    for k, ob in enumerate(objects):
        w, l, h = ob.actor.wlh
        local = (points_ego - ob.ego_t_obj[None, :]) @ ob.ego_R_obj
        inside = (
            (np.abs(local[:, 0]) <= l / 2 + margin)
            & (np.abs(local[:, 1]) <= w / 2 + margin)
            & (local[:, 2] >= -margin)
            & (local[:, 2] <= h + margin)
        )
        counts[k] = int(inside.sum())
    return counts
