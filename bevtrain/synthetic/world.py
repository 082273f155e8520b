"""One synthetic scene's world: roads, ground texture, ego motion, actors and where they are at a
time. Everything is a deterministic function of (seed, scene name, keyframes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import cv2
import numpy as np

from . import streetmap
from .catalog import (
    CYCLES,
    KEYFRAME_PERIOD_US,
    MINI_SCENES,
    SCENE_LOCATIONS,
    SIZES,
    VEHICLES,
    seeded_rng,
    stable_hash,
)
from .looks import Part, object_parts
from .streetmap import LANE, ROAD_HALF, SIDEWALK_HALF

# ---------------------------------------------------------------------------------------------
# Roads
# ---------------------------------------------------------------------------------------------
PARKING_OFFSET = 8.25  # (lane, road and sidewalk widths: streetmap)
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


# Category mixes (category, probability) of moving traffic and of parked vehicles.
TRAFFIC_MIX = (
    ("vehicle.car", 0.74),
    ("vehicle.truck", 0.09),
    ("vehicle.bus.rigid", 0.06),
    ("vehicle.bus.bendy", 0.02),
    ("vehicle.trailer", 0.02),
    ("vehicle.construction", 0.02),
    ("vehicle.motorcycle", 0.05),
)
PARKED_MIX = (
    ("vehicle.car", 0.8),
    ("vehicle.truck", 0.06),
    ("vehicle.trailer", 0.04),
    ("vehicle.motorcycle", 0.05),
    ("vehicle.bicycle", 0.03),
    ("vehicle.bus.rigid", 0.02),
)


def _draw_category(rng, mix) -> str:
    return str(rng.choice([c for c, _ in mix], p=[p for _, p in mix]))


# ---------------------------------------------------------------------------------------------
# Actors and the scene
# ---------------------------------------------------------------------------------------------
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
    """One scene's world: roads, street map, ground texture, ego motion and actors.

    ``layout_only``: just the ego motion and the roads (cheap): enough for ``extent``."""

    def __init__(self, name: str, seed: int, keyframes: int, layout_only: bool = False):
        self.name = name
        self.seed = seed
        self.keyframes = keyframes
        rng = seeded_rng("scene", seed, name)
        # The street map's own stream (junction near the start, car park), so that it leaves the draws of
        # everything else where they were.
        map_rng = seeded_rng("streetmap", seed, name)
        self.duration = (keyframes - 1) * KEYFRAME_PERIOD_US * 1e-6
        self._make_ego_profile(rng)
        self._make_roads(rng, map_rng)
        if layout_only:
            return
        self.streetmap = streetmap.build(self, map_rng)
        self._make_texture(rng)
        self.actors: List[Actor] = []
        self._populate(rng)
        self._add_carpark_cars(map_rng)

    @property
    def extent(self) -> Tuple[float, float]:
        """(width, height) in metres of the scene's ground, which starts at (0, 0) in its own coordinates."""
        rows, cols = self.map_size
        return cols * MAP_RES, rows * MAP_RES

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
    def _make_roads(self, rng, map_rng):
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
        # A junction (crossings, stop lines) just ahead of the ego's start, unless one is near already.
        s_cross = self.ego_s0 + float(map_rng.uniform(25.0, 45.0))
        x, y, h = main_road.pose(s_cross)
        if all(np.hypot(x - p[0], y - p[1]) >= 60.0 for p, _ in intersections):
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
        label = streetmap.paint_labels(self.streetmap, (rows, cols), MAP_RES)
        self.label = label
        # Mottling (asphalt patches, grass) plus fine grain, as a brightness offset in [0, 28].
        base = np.array(  # per streetmap label: grass, sidewalk, road, white, yellow paint, car park
            [[58, 90, 36], [136, 134, 126], [60, 60, 63], [201, 201, 194], [191, 158, 38], [92, 86, 98]],
            np.uint8,
        )
        coarse = rng.integers(0, 19, (rows // 16 + 2, cols // 16 + 2), dtype=np.uint8)
        coarse = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_LINEAR)
        grain = rng.integers(0, 11, (rows, cols), dtype=np.uint8)
        self.texture = base[label]
        self.texture += (coarse + grain)[..., None]

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

    def _static_actor(self, rng, category, x, y, yaw) -> Actor:
        return self._new_actor(rng, category, "static", static_pose=(float(x), float(y), float(yaw)))

    def _populate(self, rng):
        """Traffic, parked vehicles, a construction zone, sidewalk life and side-street traffic.

        The order of the steps is the order of the draws from `rng`: keep it, or every scene changes.
        """
        travel = float(self._s_grid[-1])
        ego_lo, ego_hi = self.ego_s0 - 80.0, self.ego_s0 + travel + 80.0
        density = float(rng.uniform(0.6, 1.4))
        self._add_ego_lane_traffic(rng)
        self._add_lane_traffic(rng, density)
        zone = None
        if rng.random() < 0.6:
            z0 = float(rng.uniform(ego_lo + 40.0, ego_hi - 40.0))
            zone = (z0, z0 + float(rng.uniform(20.0, 40.0)), 1 if rng.random() < 0.5 else -1)
        self._add_parked(rng, density, zone)
        if zone:
            self._add_construction_zone(rng, *zone)
        self._add_sidewalk_life(rng, density)
        self._add_side_street_traffic(rng)

    def _add_ego_lane_traffic(self, rng):
        """Vehicles in the ego lane keep a constant gap to the ego (so they never collide)."""
        gaps = list(rng.uniform(12.0, 40.0, int(rng.integers(0, 3))))
        if gaps:
            gaps = list(np.cumsum(gaps) + np.arange(len(gaps)) * 6.0)
        gaps += [-float(rng.uniform(10.0, 30.0))] if rng.random() < 0.6 else []
        for g in gaps:
            cat = _draw_category(rng, TRAFFIC_MIX)
            self._new_actor(rng, cat, "follow", rider=cat in CYCLES, offset=LANE / 2, s0=float(g))

    def _add_lane_traffic(self, rng, density):
        """Other lanes of the main road: one speed per lane, vehicles spaced along the whole road."""
        main = self.roads[0]
        duration = self.duration + 2.0
        for offset, direction in ((1.5 * LANE, 1), (-LANE / 2, -1), (-1.5 * LANE, -1)):
            speed = float(rng.uniform(3.0, 13.0))
            s, s_end = -speed * duration - 20.0, main.length + speed * duration + 20.0
            s += float(rng.uniform(0.0, 30.0))
            while s < s_end:
                cat = _draw_category(rng, TRAFFIC_MIX)
                lane = dict(offset=offset, direction=direction, s0=s, speed=speed)
                a = self._new_actor(rng, cat, "lane", rider=cat in CYCLES, **lane)
                s += a.wlh[1] + float(rng.uniform(12.0, 80.0)) / density

    def _add_parked(self, rng, density, zone):
        """Parking strips on both sides of the main road, except at junctions and the zone's side."""
        main = self.roads[0]
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
                cat = _draw_category(rng, PARKED_MIX)
                mean_l = SIZES[cat][0][1]
                x, y, h = main.pose(s + mean_l / 2, side * PARKING_OFFSET)
                a = self._static_actor(rng, cat, x, y, h if side > 0 else h + math.pi)
                s += a.wlh[1] + float(rng.uniform(0.8, 6.0))

    def _add_construction_zone(self, rng, z0, z1, side):
        """Cones along the lane edge, barriers on the kerb, maybe a machine, and a few workers."""
        main = self.roads[0]
        for s in np.arange(z0, z1, 3.0):
            x, y, h = main.pose(s, side * (2 * LANE + 0.3))
            self._static_actor(rng, "movable_object.trafficcone", x, y, h)
        s = z0 + 2.0
        while s < z1 - 2.0:
            x, y, h = main.pose(s + 1.3, side * (ROAD_HALF - 0.4))
            a = self._static_actor(rng, "movable_object.barrier", x, y, h)
            s += a.wlh[1] + 0.3
        x, y, h = main.pose(0.5 * (z0 + z1), side * (PARKING_OFFSET - 0.3))
        if z1 - z0 > 26:
            self._static_actor(rng, "vehicle.construction", x, y, h)
        for _ in range(int(rng.integers(1, 3))):
            x, y, h = main.pose(float(rng.uniform(z0, z1)), side * (ROAD_HALF + 0.6))
            self._static_actor(rng, "human.pedestrian.adult", x, y, rng.uniform(-math.pi, math.pi))

    def _add_sidewalk_life(self, rng, density):
        """Pedestrians walking or standing on both sidewalks, and parked bicycles."""
        main = self.roads[0]
        for side in (1, -1):
            for _ in range(int(main.length / 40.0 * density)):
                offset = side * float(rng.uniform(ROAD_HALF + 1.0, SIDEWALK_HALF - 0.6))
                s = float(rng.uniform(0.0, main.length))
                if rng.random() < 0.7:
                    direction = 1 if rng.random() < 0.5 else -1
                    self._new_actor(
                        rng,
                        "human.pedestrian.adult",
                        "lane",
                        offset=offset,
                        direction=direction,
                        s0=s,
                        speed=float(rng.uniform(0.9, 1.7)),
                    )
                else:
                    x, y, _ = main.pose(s, offset)
                    self._static_actor(rng, "human.pedestrian.adult", x, y, rng.uniform(-math.pi, math.pi))
            for _ in range(int(rng.integers(0, 4))):
                x, y, h = main.pose(float(rng.uniform(0.0, main.length)), side * (ROAD_HALF + 0.5))
                self._static_actor(rng, "vehicle.bicycle", x, y, h + math.pi / 2)

    def _add_side_street_traffic(self, rng):
        """Side streets: cars waiting at the junction, cars driving away, parked cars."""
        for ridx in range(1, len(self.roads)):
            road = self.roads[ridx]
            centre = road.length / 2
            for direction in (1, -1):
                lane = dict(road=ridx, offset=direction * LANE / 2, direction=direction)
                if rng.random() < 0.6:
                    s_wait = centre - direction * (ROAD_HALF + 6.0)
                    self._new_actor(rng, "vehicle.car", "lane", s0=s_wait, speed=0.0, **lane)
                if rng.random() < 0.7:
                    speed = float(rng.uniform(4.0, 10.0))
                    s_start = centre + direction * (ROAD_HALF + 4.0 + float(rng.uniform(0.0, 25.0)))
                    cat = _draw_category(rng, TRAFFIC_MIX)
                    self._new_actor(rng, cat, "lane", s0=s_start, speed=speed, **lane)
                for side in (1, -1):
                    for _ in range(int(rng.integers(0, 3))):
                        s = centre + side * float(rng.uniform(ROAD_HALF + 10.0, 65.0))
                        x, y, h = road.pose(s, direction * PARKING_OFFSET)
                        if self._static_clear(x, y, 6.0):
                            self._static_actor(rng, "vehicle.car", x, y, h if direction > 0 else h + math.pi)

    def _add_carpark_cars(self, rng):
        """Cars in about half the car park's bays (drawn from the street map's stream)."""
        for x, y, yaw in self.streetmap.carpark_slots:
            if rng.random() < 0.5:
                self._static_actor(rng, "vehicle.car", x, y, yaw + (math.pi if rng.random() < 0.5 else 0.0))

    def _static_clear(self, x, y, radius) -> bool:
        for a in self.actors:
            if a.mode == "static" and math.hypot(a.static_pose[0] - x, a.static_pose[1] - y) < radius:
                return False
        return not self.near_intersection((x, y), 2.0)

    # ---- state at a time -----------------------------------------------------------------
    def ego_state(self, t: float) -> ActorState:
        return self._moving_state(lambda tt: self.roads[0].pose(self.ego_s0 + self.ego_s(tt), LANE / 2), t)

    def _road_pose(self, actor: Actor, t: float):
        """(x, y, lane heading) of a moving actor's box centre at time t; None when off its road."""
        road = self.roads[actor.road]
        if actor.mode == "follow":
            s = self.ego_s0 + float(self.ego_s(t)) + actor.s0
        else:
            s = actor.s0 + actor.direction * actor.speed * t
        if not (0.0 <= s <= road.length):
            return None
        return road.pose(s, actor.offset)

    def actor_state(self, actor: Actor, t: float) -> ActorState | None:
        if actor.mode == "static":
            x, y, yaw = actor.static_pose
            return ActorState(x, y, yaw, 0.0, 0.0)

        def pose(tt):
            where = self._road_pose(actor, tt)
            if where is None:
                return None
            x, y, h = where
            return x, y, (float(h) if actor.direction > 0 else float(h) + math.pi)

        return self._moving_state(pose, t)

    def actor_position(self, actor: Actor, t: float) -> Tuple[float, float] | None:
        """Where the actor's box centre is (cheaper than actor_state)."""
        if actor.mode == "static":
            return actor.static_pose[0], actor.static_pose[1]
        where = self._road_pose(actor, t)
        return None if where is None else (float(where[0]), float(where[1]))

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
            f"{len(self.roads) - 1} side roads{', turn at junction' if turns else ''}"
            f"{', car park' if self.streetmap.carparks else ''}; {', '.join(cats)}"
        )


LOCATION_GAP = 100.0  # m of empty map between neighbouring scenes of one location


def scene_origin(name: str, seed: int, keyframes: int) -> np.ndarray:
    """Where a scene's world (its own coordinates start at 0, 0) sits in its location's map: the scenes of a
    location (MINI_SCENES order) side by side along x, LOCATION_GAP apart, whichever of them are generated."""
    x = 0.0
    for other in MINI_SCENES:
        if other == name:
            return np.array([x, 0.0])
        if SCENE_LOCATIONS[other] == SCENE_LOCATIONS[name]:
            x += Scene(other, seed, keyframes, layout_only=True).extent[0] + LOCATION_GAP
    raise ValueError(f"unknown scene {name!r}")


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
