"""Ray casting of a synthetic scene: camera images (z-buffered boxes over a textured ground and a
sky), lidar sweeps and radar returns. All numpy, vectorised over pixels / rays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np

from .world import (
    AMBIENT,
    DIFFUSE,
    LIDAR_RANGE,
    MAP_RES,
    RADAR_HALF_FOV_DEG,
    RADAR_RANGE,
    RENDER_RADIUS,
    SUN_DIRECTION,
    Actor,
    ActorState,
    Scene,
    yaw_matrix,
)

SKY_HORIZON = np.array([205.0, 214.0, 228.0])
SKY_ZENITH = np.array([105.0, 148.0, 212.0])
HAZE = np.array([200, 208, 220], np.int32)
FOG_DISTANCE = 600.0  # m
NEAR = 0.05  # m, camera near plane
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float64)


@dataclass
class PlacedObject:
    """An actor at one instant, in the ego frame."""

    actor: Actor
    state: ActorState
    ego_R_obj: np.ndarray  # (3, 3)
    ego_t_obj: np.ndarray  # (3,) bottom centre of the box
    lo: np.ndarray  # (P, 3) part boxes in the object frame
    hi: np.ndarray  # (P, 3)
    face_rgb: np.ndarray  # (P, 6, 3) uint8 shaded colour of each part face (+x,-x,+y,-y,+z,-z)
    decals: List[list]  # per part: (face, axis_a, axis_b, a0, a1, b0, b1, shaded rgb uint8 (3,))
    centre: np.ndarray  # (3,) centre of the outer box, object frame
    radius: float  # of the outer box's bounding sphere


def _actor_geometry(scene: Scene, actor: Actor):
    """Part boxes and unshaded face colours of an actor (they never change)."""
    cache = scene.__dict__.setdefault("_geometry_cache", {})
    if actor.aid not in cache:
        lo = np.stack([p.lo for p in actor.parts])
        hi = np.stack([p.hi for p in actor.parts])
        base = np.array([[p.side] * 4 + [p.top, p.side] for p in actor.parts], np.float64)  # (P, 6, 3)
        lo_all, hi_all = lo.min(axis=0), hi.max(axis=0)
        centre = 0.5 * (lo_all + hi_all)
        sphere = 0.5 * float(np.linalg.norm(hi_all - lo_all))
        cache[actor.aid] = (lo, hi, base, centre, sphere)
    return cache[actor.aid]


def place_objects(scene: Scene, t: float, ego, radius: float = RENDER_RADIUS) -> List[PlacedObject]:
    ego_R_global = yaw_matrix(ego.yaw).T
    placed = []
    for actor in scene.actors:
        where = scene.actor_position(actor, t)
        if where is None or math.hypot(where[0] - ego.x, where[1] - ego.y) > radius:
            continue
        st = scene.actor_state(actor, t)
        lo, hi, base, centre, sphere = _actor_geometry(scene, actor)
        global_R_obj = yaw_matrix(st.yaw)
        ego_R_obj = ego_R_global @ global_R_obj
        ego_t = ego_R_global @ np.array([st.x - ego.x, st.y - ego.y, 0.0])
        normals_world = FACE_NORMALS @ global_R_obj.T  # (6, 3)
        shades = AMBIENT + DIFFUSE * np.clip(normals_world @ SUN_DIRECTION, 0.0, None)  # (6,)
        face_rgb = np.clip(np.round(base * shades[None, :, None]), 0, 255).astype(np.uint8)
        decals = []
        for p in actor.parts:
            shaded = []
            for face, a0, a1, b0, b1, rgb in p.decals:
                ax, bx = [k for k in range(3) if k != face // 2]
                colour = np.clip(np.round(np.asarray(rgb, np.float64) * shades[face]), 0, 255).astype(
                    np.uint8
                )
                shaded.append((face, ax, bx, a0, a1, b0, b1, colour))
            decals.append(shaded)
        placed.append(PlacedObject(actor, st, ego_R_obj, ego_t, lo, hi, face_rgb, decals, centre, sphere))
    return placed


def _slab(o, d, inv, lo, hi) -> np.ndarray:
    """Entry depth of rays o + t d (object frame) into the box [lo, hi]; inf where they miss.
    d, inv: 3 arrays of equal shape (ray directions and their reciprocals)."""
    t1 = (lo[0] - o[0]) * inv[0]
    t2 = (hi[0] - o[0]) * inv[0]
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    for k in (1, 2):
        t1 = (lo[k] - o[k]) * inv[k]
        t2 = (hi[k] - o[k]) * inv[k]
        np.maximum(tnear, np.minimum(t1, t2), out=tnear)
        np.minimum(tfar, np.maximum(t1, t2), out=tfar)
    return np.where((tnear <= tfar) & (tnear > 1e-4), tnear, np.inf)


def _entry_face(o, d, lo, hi) -> np.ndarray:
    """Index (+x,-x,+y,-y,+z,-z) of the face through which rays known to hit [lo, hi] enter it."""
    inv = tuple(_safe_inv(x) for x in d)
    tmin = [np.minimum((lo[k] - o[k]) * inv[k], (hi[k] - o[k]) * inv[k]) for k in range(3)]
    axis = np.where(tmin[0] >= np.maximum(tmin[1], tmin[2]), 0, np.where(tmin[1] >= tmin[2], 1, 2))
    d_axis = np.where(axis == 0, d[0], np.where(axis == 1, d[1], d[2]))
    return axis * 2 + (d_axis > 0)  # the entry face's outward normal opposes the ray


def _hit_parts(o, d, ob: PlacedObject, outer: bool = True):
    """Nearest part hit per ray: (ray indices that hit, depth, part index). With `outer`, parts are
    tested only on rays that hit the object's outer box."""
    inv = tuple(_safe_inv(x) for x in d)
    if outer:
        t_out = _slab(o, d, inv, ob.lo.min(axis=0), ob.hi.max(axis=0))
        idx = np.flatnonzero(np.isfinite(t_out))
        if len(idx) == 0:
            return idx, np.zeros(0), np.zeros(0, np.int64)
        d = tuple(x[idx] for x in d)
        inv = tuple(x[idx] for x in inv)
    else:
        idx = np.arange(len(d[0]))
    best = np.full(idx.shape, np.inf, dtype=d[0].dtype)
    part = np.full(idx.shape, -1, np.int64)
    for p in range(len(ob.lo)):
        tp = _slab(o, d, inv, ob.lo[p], ob.hi[p])
        closer = tp < best
        best[closer] = tp[closer]
        part[closer] = p
    hit = part >= 0
    return idx[hit], best[hit], part[hit]


def _safe_inv(d):
    # Axis-parallel rays give +-inf (callers silence the warning): the slab test handles them; a NaN
    # would need a ray exactly in a face plane, and then counts as a miss.
    return 1.0 / d


class Camera:
    """Static per-camera precomputation: pixel rays, the ground below the horizon and the sky.

    The background (ground texture, fog, sky) is sampled at half resolution and upscaled
    bilinearly; objects are ray cast at full resolution.
    """

    def __init__(self, R: np.ndarray, t: np.ndarray, K: np.ndarray, width: int, height: int):
        self.R, self.t, self.K = R, t, K
        self.W, self.H = width, height
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # Pixel centres sit at integer coordinates (OpenCV's and nuScenes' calibration convention, and
        # the one bevtrain's augmentation and lifting use): pixel j's ray goes through u = j.
        self.a = ((np.arange(width) - cx) / fx).astype(np.float32)  # (W,) x/z of each column
        self.b = ((np.arange(height) - cy) / fy).astype(np.float32)  # (H,) y/z of each row
        self.cam_R_ego = R.T
        self.depth0 = self._ground_depth(self.a, self.b).astype(np.float32)  # (H, W), inf above the horizon
        # Half-resolution background: block centres of 2x2 pixel blocks.
        hw, hh = (width + 1) // 2, (height + 1) // 2
        ha = ((2 * np.arange(hw) + 0.5 - cx) / fx).astype(np.float32)
        hb = ((2 * np.arange(hh) + 0.5 - cy) / fy).astype(np.float32)
        depth = self._ground_depth(ha, hb)
        ground = depth < 2000.0
        rows = np.flatnonzero(ground.any(axis=1))
        # Level cameras: the ground is every row below the horizon, so it is one contiguous block.
        self.ground_start = int(rows[0]) * hw if len(rows) else hh * hw
        dx, dy, dz = self._ego_rays(ha, hb)
        dg = np.where(ground, depth, 0.0).ravel()[self.ground_start :]
        self.ground_ex = (t[0] + dg * dx.ravel()[self.ground_start :]).astype(np.float32)
        self.ground_ey = (t[1] + dg * dy.ravel()[self.ground_start :]).astype(np.float32)
        dist = dg * np.sqrt(dx.ravel()[self.ground_start :] ** 2 + dy.ravel()[self.ground_start :] ** 2)
        fog = np.where(ground.ravel()[self.ground_start :], 1.0 - np.exp(-dist / FOG_DISTANCE), 1.0)
        self.fog = np.round(256 * fog).astype(np.uint16)[:, None]
        norm = np.sqrt(dx**2 + dy**2 + dz**2)
        elev = np.clip(dz / norm, 0.0, 1.0)[..., None] ** 0.6
        sky = SKY_HORIZON * (1 - elev) + SKY_ZENITH * elev
        self.sky_half = np.clip(sky, 0, 255).astype(np.uint8)  # (hh, hw, 3)
        self.haze = np.asarray(HAZE, np.uint16)
        a0, a1, b0, b1 = float(self.a[0]), float(self.a[-1]), float(self.b[0]), float(self.b[-1])
        planes = [(1.0, 0.0, -a1), (-1.0, 0.0, a0), (0.0, 1.0, -b1), (0.0, -1.0, b0)]
        self.frustum = [np.array(p) / np.linalg.norm(p) for p in planes]

    def _ego_rays(self, a, b):
        R = self.R
        dx = R[0, 0] * a[None, :] + R[0, 1] * b[:, None] + R[0, 2]
        dy = R[1, 0] * a[None, :] + R[1, 1] * b[:, None] + R[1, 2]
        dz = R[2, 0] * a[None, :] + R[2, 1] * b[:, None] + R[2, 2]
        return dx, dy, dz  # ego-frame ray per pixel with camera depth 1

    def _ground_depth(self, a, b):
        _, _, dz = self._ego_rays(a.astype(np.float64), b.astype(np.float64))
        with np.errstate(divide="ignore"):
            return np.where(dz < -1e-6, -self.t[2] / dz, np.inf)

    def background(self, scene: Scene, ego) -> np.ndarray:
        half = self.sky_half.copy()
        flat = half.reshape(-1, 3)
        c, s = math.cos(ego.yaw), math.sin(ego.yaw)
        wx = c * self.ground_ex - s * self.ground_ey + np.float32(ego.x)
        wy = s * self.ground_ex + c * self.ground_ey + np.float32(ego.y)
        rows, cols = scene.texture.shape[:2]
        ix = np.clip((wx * (1.0 / MAP_RES)).astype(np.int32), 0, cols - 1)
        iy = np.clip((wy * (1.0 / MAP_RES)).astype(np.int32), 0, rows - 1)
        ground = scene.texture.reshape(-1, 3)[iy * cols + ix].astype(np.uint16)
        blend = (ground * (256 - self.fog) + self.haze * self.fog) >> 8
        flat[self.ground_start :] = blend.astype(np.uint8)
        return cv2.resize(half, (self.W, self.H), interpolation=cv2.INTER_LINEAR)

    def render(self, scene: Scene, ego, objects: List[PlacedObject]):
        """RGB image (H, W, 3) uint8, and per object the unoccluded and visible pixel counts."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._render(scene, ego, objects)

    def _render(self, scene: Scene, ego, objects: List[PlacedObject]):
        """Image and per-object unoccluded / visible pixel counts.

        Objects are drawn nearest first; pixels already covered by something nearer than an
        object's nearest point skip its shading and only enter its unoccluded count (estimated
        on every 4th such pixel).
        """
        H, W = self.H, self.W
        img = self.background(scene, ego)
        flat = img.reshape(-1, 3)
        depth_flat = self.depth0.copy().reshape(-1)
        owner_flat = np.full(H * W, -1, np.int32)
        unoccluded = np.zeros(len(objects), np.int64)
        if not objects:
            return img, unoccluded, np.zeros(0, np.int64)
        centres = np.stack([ob.ego_t_obj + ob.ego_R_obj @ ob.centre for ob in objects])
        cam = (centres - self.t[None, :]) @ self.cam_R_ego.T  # (N, 3) box centres in the camera frame
        radius = np.array([ob.radius for ob in objects])
        inside = cam[:, 2] > -radius
        for plane in self.frustum:  # outward unit normals of the four side planes
            inside &= cam @ plane <= radius
        for k in np.flatnonzero(inside)[np.argsort(cam[inside, 2])]:
            ob = objects[k]
            cam_R_obj = (self.cam_R_ego @ ob.ego_R_obj).astype(np.float32)
            cam_t_obj = (self.cam_R_ego @ (ob.ego_t_obj - self.t)).astype(np.float32)
            footprint = self._silhouette(ob, cam_R_obj, cam_t_obj)
            if footprint is None:
                continue
            pix, rows, cols, z_near = footprint
            obj_R_cam = cam_R_obj.T
            o = obj_R_cam @ (-cam_t_obj)  # camera centre in the object frame
            open_ = depth_flat[pix] > z_near
            hidden = np.flatnonzero(~open_)[::4]
            if len(hidden):
                d = self._rays(obj_R_cam, rows[hidden], cols[hidden])
                unoccluded[k] += 4 * len(_hit_parts(o, d, ob)[0])
            sel = np.flatnonzero(open_)
            if len(sel) == 0:
                continue
            pix = pix[sel]
            d = self._rays(obj_R_cam, rows[sel], cols[sel])
            idx, t_hit, part = _hit_parts(o, d, ob, outer=False)
            unoccluded[k] += len(idx)
            win = t_hit < depth_flat[pix[idx]]
            if not win.any():
                continue
            idx, t_hit, part = idx[win], t_hit[win], part[win]
            d = tuple(x[idx] for x in d)
            target = pix[idx]
            depth_flat[target] = t_hit
            owner_flat[target] = k
            flat[target] = _shade_hits(o, d, t_hit, part, ob)
        visible = np.bincount(owner_flat[owner_flat >= 0], minlength=len(objects))[: len(objects)]
        return img, unoccluded, visible

    def _rays(self, obj_R_cam, rows, cols):
        a = self.a[cols]
        b = self.b[rows]
        return tuple(obj_R_cam[i, 0] * a + obj_R_cam[i, 1] * b + obj_R_cam[i, 2] for i in range(3))

    def _silhouette(self, ob: PlacedObject, cam_R_obj, cam_t_obj):
        """Pixels covered by the object's outer box: flat indices, rows, cols and the nearest depth."""
        lo, hi = ob.lo.min(axis=0), ob.hi.max(axis=0)
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        cam = corners @ cam_R_obj.T.astype(np.float64) + cam_t_obj  # (8, 3)
        z = cam[:, 2]
        if (z <= NEAR).all():
            return None
        pts = [cam[z > NEAR]]
        if (z <= NEAR).any():  # clip the box edges at the near plane
            for i in range(8):
                for j in range(i + 1, 8):
                    if bin(i ^ j).count("1") == 1 and (z[i] - NEAR) * (z[j] - NEAR) < 0:
                        f = (NEAR - z[i]) / (z[j] - z[i])
                        pts.append((cam[i] + f * (cam[j] - cam[i]))[None])
        p = np.concatenate(pts)
        u = self.K[0, 0] * p[:, 0] / p[:, 2] + self.K[0, 2]  # pixel-centre coordinates
        v = self.K[1, 1] * p[:, 1] / p[:, 2] + self.K[1, 2]
        u0, u1 = max(0, int(math.floor(u.min())) - 1), min(self.W, int(math.ceil(u.max())) + 2)
        v0, v1 = max(0, int(math.floor(v.min())) - 1), min(self.H, int(math.ceil(v.max())) + 2)
        if u0 >= u1 or v0 >= v1:
            return None
        mask = np.zeros((v1 - v0, u1 - u0), np.uint8)
        uv = np.stack([u - u0, v - v0], axis=1)
        uv = np.clip(uv, -(2**14), 2**14)
        hull = cv2.convexHull(np.round(uv * 16).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1, cv2.LINE_8, 4)
        mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))  # pixel-centre rounding at the rim
        r, c = np.nonzero(mask)
        if len(r) == 0:
            return None
        rows, cols = (r + v0).astype(np.int64), (c + u0).astype(np.int64)
        return rows * self.W + cols, rows, cols, float(max(z.min(), NEAR))


def _shade_hits(o, d, t_hit, part, ob: PlacedObject) -> np.ndarray:
    """Colours (N, 3) uint8 of hits: the entry face's shaded colour, then the part's decals."""
    face = np.zeros(len(t_hit), np.int64)
    parts = np.unique(part)
    for p in parts:
        m = np.flatnonzero(part == p) if len(parts) > 1 else np.arange(len(part))
        face[m] = _entry_face(o, tuple(x[m] for x in d), ob.lo[p], ob.hi[p])
    rgb = ob.face_rgb[part, face]
    for p in parts:
        by_face = {}
        for decal in ob.decals[p]:
            by_face.setdefault(decal[0], []).append(decal)
        for f, decals in by_face.items():
            m = np.flatnonzero((part == p) & (face == f))
            if len(m) == 0:
                continue
            ax, bx = decals[0][1], decals[0][2]
            ha = o[ax] + t_hit[m] * d[ax][m]  # object-frame hit coordinates in the face plane
            hb = o[bx] + t_hit[m] * d[bx][m]
            for _, _, _, a0, a1, b0, b1, colour in decals:
                on = (ha >= a0) & (ha <= a1) & (hb >= b0) & (hb <= b1)
                rgb[m[on]] = colour
    return rgb


def cast_rays(*args, **kwargs) -> Tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return _cast_rays(*args, **kwargs)


def _cast_rays(
    origin: np.ndarray,
    dirs: np.ndarray,
    objects: List[PlacedObject],
    max_range: float,
    with_ground: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest hit of unit rays (N, 3) from `origin` (ego frame). Returns range (inf = none) and the
    index of the object hit (-1 = ground or nothing)."""
    n = len(dirs)
    best = np.full(n, np.inf)
    who = np.full(n, -1, np.int64)
    if with_ground:
        dz = dirs[:, 2]
        with np.errstate(divide="ignore"):
            tg = np.where(dz < -1e-6, -origin[2] / dz, np.inf)
        best = np.where(tg <= max_range, tg, np.inf)
    for k, ob in enumerate(objects):
        rel = ob.ego_t_obj - origin
        radius = 0.5 * float(np.linalg.norm(ob.hi.max(axis=0) - ob.lo.min(axis=0))) + 0.5
        if np.linalg.norm(rel) - radius > max_range:
            continue
        obj_R_ego = ob.ego_R_obj.T
        o = obj_R_ego @ (origin - ob.ego_t_obj)
        dobj = dirs @ obj_R_ego.T
        d = (dobj[:, 0], dobj[:, 1], dobj[:, 2])
        idx, t_hit, _ = _hit_parts(o, d, ob)
        closer = (t_hit < best[idx]) & (t_hit <= max_range)
        best[idx[closer]] = t_hit[closer]
        who[idx[closer]] = k
    return best, who


# Lidar: HDL-32E-like fan, modest resolution to keep the set small.
LIDAR_BEAMS = np.radians(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTHS = 600
INTENSITY = {"vehicle": 40.0, "human": 20.0, "movable_object": 60.0}
GROUND_INTENSITY = np.array([6.0, 14.0, 4.0, 90.0, 80.0])  # per ground label (grass, sidewalk, road, paint)


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
            records.append(
                (
                    p[0],
                    p[1],
                    0.0,
                    dyn,
                    0,
                    RCS[ob.actor.category] + rng.normal(0, 2.0),
                    v_raw[0],
                    v_raw[1],
                    v_comp[0],
                    v_comp[1],
                    1,
                    3,
                    19,
                    19,
                    0,
                    1,
                    17,
                    3,
                )
            )
    # Clutter: multipath / low-RCS ghosts, each flagged so that a default filter rejects it.
    for _ in range(int(rng.integers(2, 7))):
        a = rng.uniform(-half, half)
        r = rng.uniform(3.0, RADAR_RANGE)
        reason = rng.integers(3)
        invalid = int(rng.choice([1, 2, 6])) if reason == 0 else 0
        ambig = int(rng.choice([0, 1, 4])) if reason == 1 else 3
        dyn = 7 if reason == 2 else int(rng.choice([1, 3]))
        records.append(
            (
                r * math.cos(a),
                r * math.sin(a),
                0.0,
                dyn,
                0,
                rng.normal(-5.0, 3.0),
                0.0,
                0.0,
                0.0,
                0.0,
                0,
                ambig,
                19,
                19,
                invalid,
                5,
                17,
                3,
            )
        )
    arr = np.array(records, dtype=RADAR_DTYPE)
    arr["id"] = np.arange(len(arr))
    return arr


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
