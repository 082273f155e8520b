"""Ray casting of a synthetic scene: objects placed in the ego frame, ray / box intersection, and
camera images (z-buffered boxes over a textured ground and a sky). All numpy, vectorised over
pixels / rays; the lidar and radar that cast rays with it are in `sensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np

from .catalog import RENDER_RADIUS, yaw_matrix
from .looks import AMBIENT, DIFFUSE, SUN_DIRECTION
from .world import MAP_RES, Actor, ActorState, Scene

SKY_HORIZON = np.array([205.0, 214.0, 228.0])
SKY_ZENITH = np.array([105.0, 148.0, 212.0])
HAZE = np.array([200, 208, 220], np.int32)
FOG_DISTANCE = 600.0  # m
NEAR = 0.05  # m, camera near plane
SHADE_YAW_TOL = 1e-6  # rad; a shade moves by < 1e-3 of a colour level within it
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
    outer_lo: np.ndarray  # (3,) the outer box around all parts, object frame
    outer_hi: np.ndarray  # (3,)
    centre: np.ndarray  # (3,) centre of the outer box, object frame
    radius: float  # of the outer box's bounding sphere


def _actor_geometry(scene: Scene, actor: Actor):
    """Part boxes, unshaded face colours and outer box of an actor (they never change)."""
    cache = scene.__dict__.setdefault("_geometry_cache", {})
    if actor.aid not in cache:
        lo = np.stack([p.lo for p in actor.parts])
        hi = np.stack([p.hi for p in actor.parts])
        base = np.array([[p.side] * 4 + [p.top, p.side] for p in actor.parts], np.float64)  # (P, 6, 3)
        lo_all, hi_all = lo.min(axis=0), hi.max(axis=0)
        centre = 0.5 * (lo_all + hi_all)
        sphere = 0.5 * float(np.linalg.norm(hi_all - lo_all))
        cache[actor.aid] = (lo, hi, base, lo_all, hi_all, centre, sphere)
    return cache[actor.aid]


def _shaded_looks(scene: Scene, actor: Actor, yaw: float, global_R_obj: np.ndarray, base: np.ndarray):
    """Face colours and decals of an actor shaded for its heading. Each sensor time places every actor
    anew, so the last shading is kept per actor and reused while the heading stays within
    SHADE_YAW_TOL of it (parked and straight-driving actors: their heading only wobbles by rounding)."""
    cache = scene.__dict__.setdefault("_looks_cache", {})
    kept = cache.get(actor.aid)
    if kept is not None and abs(kept[0] - yaw) < SHADE_YAW_TOL:
        return kept[1], kept[2]
    normals_world = FACE_NORMALS @ global_R_obj.T  # (6, 3)
    shades = AMBIENT + DIFFUSE * np.clip(normals_world @ SUN_DIRECTION, 0.0, None)  # (6,)
    face_rgb = np.clip(np.round(base * shades[None, :, None]), 0, 255).astype(np.uint8)
    decals = []
    for p in actor.parts:
        shaded = []
        for face, a0, a1, b0, b1, rgb in p.decals:
            ax, bx = [k for k in range(3) if k != face // 2]
            colour = np.clip(np.round(np.asarray(rgb, np.float64) * shades[face]), 0, 255).astype(np.uint8)
            shaded.append((face, ax, bx, a0, a1, b0, b1, colour))
        decals.append(shaded)
    cache[actor.aid] = (yaw, face_rgb, decals)
    return face_rgb, decals


def place_objects(scene: Scene, t: float, ego, radius: float = RENDER_RADIUS) -> List[PlacedObject]:
    ego_R_global = yaw_matrix(ego.yaw).T
    placed = []
    for actor in scene.actors:
        where = scene.actor_position(actor, t)
        if where is None or math.hypot(where[0] - ego.x, where[1] - ego.y) > radius:
            continue
        st = scene.actor_state(actor, t)
        lo, hi, base, lo_all, hi_all, centre, sphere = _actor_geometry(scene, actor)
        global_R_obj = yaw_matrix(st.yaw)
        ego_R_obj = ego_R_global @ global_R_obj
        ego_t = ego_R_global @ np.array([st.x - ego.x, st.y - ego.y, 0.0])
        face_rgb, decals = _shaded_looks(scene, actor, st.yaw, global_R_obj, base)
        placed.append(
            PlacedObject(
                actor, st, ego_R_obj, ego_t, lo, hi, face_rgb, decals, lo_all, hi_all, centre, sphere
            )
        )
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
        t_out = _slab(o, d, inv, ob.outer_lo, ob.outer_hi)
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
        lo, hi = ob.outer_lo, ob.outer_hi
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
        if np.linalg.norm(rel) - (ob.radius + 0.5) > max_range:
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
