"""A scene's street map as vector geometry: the one source of both the painted ground its cameras and
lidar see (``paint_labels``) and the nuScenes map expansion v1.3 it writes (``expansion_records``).

Layers (scene coordinates, metres, x east, y north; the writer adds the scene's place in its location):

- drivable_area: the roads (``ROAD_HALF`` either side of each centreline), the car park and its driveway;
- road_segment: each road's strip away from junctions, and each junction (``is_intersection``);
- lane: the four lanes of each road between its markings (none inside junctions);
- walkway: the sidewalks (``SIDEWALK_HALF`` either side of each centreline, off the drivable area);
- ped_crossing: a zebra crossing across every road arm of every junction, ``CROSSING_DEPTH`` deep;
- stop_line: a ``STOP_LINE_DEPTH`` bar across the incoming lanes just outside each crossing;
- carpark_area: one car park per scene beside the main road near the ego's drive, with painted bays;
- road_divider: the centre line (painted as a double yellow line); lane_divider: the lines between lanes
  (dashed white) and at the parking strip (solid white).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import cv2
import numpy as np
from shapely.geometry import LineString, MultiPolygon, Point, Polygon
from shapely.ops import unary_union

LANE = 3.5
ROAD_HALF = 9.5  # two lanes per direction + a parking strip of 2.5 m
SIDEWALK_HALF = 13.0
CROSSING_DEPTH = 4.0  # m along the road
CROSSING_FROM_EDGE = 1.5  # m between a crossing and the end of the junction's markings
STOP_LINE_DEPTH = 0.6
STOP_LINE_GAP = 0.5  # m between a crossing and its stop line
CARPARK_LENGTH = 30.0
BAY_WIDTH, BAY_DEPTH, AISLE = 2.5, 5.0, 7.0
CARPARK_DEPTH = 2 * BAY_DEPTH + AISLE
DRIVEWAY_HALF = 3.0
SIMPLIFY = 0.01  # m: polygon / line simplification tolerance

# Ground labels of the painted texture (render and lidar intensity look them up).
GRASS, SIDEWALK, ROAD, WHITE, YELLOW, CARPARK = range(6)


@dataclass
class Marking:
    """A painted line: polyline points (k,2), colour label, width in m."""

    xy: np.ndarray
    label: int
    width: float


@dataclass
class StreetMap:
    drivable: List[Polygon] = field(default_factory=list)
    road_segments: List[Tuple[Polygon, bool]] = field(default_factory=list)  # (polygon, is_intersection)
    # (area, its start edge (2,2), its end edge (2,2))
    lanes: List[Tuple[Polygon, np.ndarray, np.ndarray]] = field(default_factory=list)
    walkways: List[Polygon] = field(default_factory=list)
    crossings: List[Polygon] = field(default_factory=list)
    stop_lines: List[Tuple[Polygon, int]] = field(default_factory=list)  # (polygon, its crossing's index)
    carparks: List[Tuple[Polygon, float]] = field(default_factory=list)  # (polygon, bay heading in rad)
    road_dividers: List[np.ndarray] = field(default_factory=list)
    lane_dividers: List[Tuple[np.ndarray, bool]] = field(default_factory=list)  # (points, dashed)
    roads_area: Polygon | MultiPolygon | None = None
    markings: List[Marking] = field(default_factory=list)  # paint only: stripes, bars, bays, lines
    carpark_slots: List[Tuple[float, float, float]] = field(default_factory=list)  # (x, y, yaw) bay centres


def _parts(geom) -> List[Polygon]:
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]


def _band(road, s0: float, s1: float, a: float, b: float, step: float = 1.0) -> Polygon:
    """The area between offsets a and b (m right of the centreline) from arclength s0 to s1."""
    s = np.linspace(s0, s1, max(2, int(math.ceil(abs(s1 - s0) / step)) + 1))
    xa, ya, _ = road.pose(s, a)
    xb, yb, _ = road.pose(s, b)
    ring = np.concatenate([np.stack([xa, ya], 1), np.stack([xb, yb], 1)[::-1]])
    return Polygon(ring).buffer(0)


def _runs(mask: np.ndarray) -> List[np.ndarray]:
    """Index arrays of the contiguous True runs of a 1-D mask."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)


def road_samples(roads, intersections):
    """Per road: arclengths every 0.5 m and where lane markings run (away from junctions, and not on a
    stretch an earlier road already covers, e.g. a junction's straight road along the main road)."""
    out = []
    for k, road in enumerate(roads):
        s = np.arange(0.0, road.length, 0.5)
        xs, ys, _ = road.pose(s)
        clear = np.ones_like(s, dtype=bool)
        for p, r in intersections:
            clear &= np.hypot(xs - p[0], ys - p[1]) > r
        pts = np.stack([xs, ys], 1)
        for other in roads[:k]:
            ref = other.xy[::2]
            d = np.hypot(pts[:, None, 0] - ref[None, :, 0], pts[:, None, 1] - ref[None, :, 1]).min(axis=1)
            clear &= d > 1.0
        out.append((s, clear))
    return out


def build(scene, rng) -> StreetMap:
    """The street map of a scene with roads, intersections and an ego path; ``rng`` places the car park."""
    sm = StreetMap()
    roads, junctions = scene.roads, scene.intersections
    lines = [LineString(r.xy) for r in roads]
    road_polys = [ln.buffer(ROAD_HALF, quad_segs=4) for ln in lines]
    roads_area = unary_union(road_polys)
    sm.roads_area = roads_area
    carpark, driveway, heading, bay_marks, slots = _place_carpark(scene, rng, roads_area, lines)
    sm.markings += bay_marks
    sm.carpark_slots = slots
    drivable = unary_union([roads_area] + ([carpark, driveway] if carpark is not None else []))
    drivable = drivable.simplify(SIMPLIFY)
    sm.drivable = _parts(drivable)
    walk = unary_union([ln.buffer(SIDEWALK_HALF, quad_segs=4) for ln in lines]).difference(drivable)
    if carpark is not None:
        walk = walk.difference(carpark.buffer(0.01))
    sm.walkways = [p for p in _parts(walk.simplify(SIMPLIFY)) if p.area > 1.0]
    # Road segments: junctions, and each road's strip between them.
    discs = [Point(p).buffer(r, quad_segs=8).intersection(roads_area) for p, r in junctions]
    sm.road_segments = [(p, True) for d in discs for p in _parts(d.simplify(SIMPLIFY))]
    taken = unary_union(discs) if discs else None
    for poly in road_polys:
        rest = poly.difference(taken) if taken is not None else poly
        sm.road_segments += [(p, False) for p in _parts(rest.simplify(SIMPLIFY)) if p.area > 1.0]
    _lanes_and_dividers(sm, roads, road_samples(roads, junctions))
    _crossings_and_stop_lines(sm, roads, junctions, drivable)
    if carpark is not None:
        sm.carparks.append((carpark.simplify(SIMPLIFY), heading))
    return sm


def _lanes_and_dividers(sm: StreetMap, roads, samples) -> None:
    for road, (s, clear) in zip(roads, samples):
        dash = (s % 9.0) < 3.0
        for run in _runs(clear):
            if len(run) < 2:
                continue
            line = _offset_line(road, s[run])

            sm.road_dividers.append(_simplified(line(0.0)))
            for offset, dashed in ((-LANE, True), (LANE, True), (-2 * LANE, False), (2 * LANE, False)):
                sm.lane_dividers.append((_simplified(line(offset)), dashed))
            for a, b in ((0.0, LANE), (LANE, 2 * LANE), (-LANE, 0.0), (-2 * LANE, -LANE)):
                la, lb = line(a), line(b)
                edges = (np.stack([la[0], lb[0]]), np.stack([la[-1], lb[-1]]))
                sm.lanes += [(p, *edges) for p in _parts(Polygon(np.concatenate([la, lb[::-1]])).buffer(0)
                                                         .simplify(SIMPLIFY))]
            # Paint: double yellow centre line, dashed lane lines, solid lines at the parking strips.
            for offset in (-0.15, 0.15):
                sm.markings.append(Marking(line(offset), YELLOW, 0.2))
            for offset, on in ((-LANE, dash[run]), (LANE, dash[run]), (-2 * LANE, None), (2 * LANE, None)):
                pts = line(offset)
                for part in _runs(np.ones(len(run), bool) if on is None else on):
                    if len(part) >= 2:
                        sm.markings.append(Marking(pts[part], WHITE, 0.2))


def _offset_line(road, s: np.ndarray):
    """offset -> (k,2) points of the line ``offset`` m right of the road's centreline at arclengths s."""

    def line(offset: float) -> np.ndarray:
        x, y, _ = road.pose(s, offset)
        return np.stack([x, y], 1)

    return line


def _simplified(xy: np.ndarray) -> np.ndarray:
    return np.asarray(LineString(xy).simplify(SIMPLIFY).coords)


def _crossings_and_stop_lines(sm: StreetMap, roads, junctions, drivable) -> None:
    """A zebra crossing across each arm of each junction, and a stop line across its incoming lanes."""
    for j, (p, r) in enumerate(junctions):
        others = [q for k, (q, rq) in enumerate(junctions) if k != j]
        for road in roads:
            d = np.hypot(road.xy[:, 0] - p[0], road.xy[:, 1] - p[1])
            if d.min() > 1.0:
                continue  # this road does not pass through the junction's centre
            s_p = float(road.s[int(np.argmin(d))])
            for sign in (1.0, -1.0):
                near = s_p + sign * (r - CROSSING_FROM_EDGE - CROSSING_DEPTH)
                far = s_p + sign * (r - CROSSING_FROM_EDGE)
                stop_near = far + sign * STOP_LINE_GAP
                stop_far = stop_near + sign * STOP_LINE_DEPTH
                if not (0.0 < min(near, stop_far) and max(near, stop_far) < road.length):
                    continue
                crossing = _band(road, near, far, -ROAD_HALF, ROAD_HALF)
                if crossing.difference(drivable).area > 1.0 or any(
                    crossing.distance(Point(q)) < 20.0 for q in others
                ):
                    continue
                sm.crossings.append(crossing)
                # Traffic drives on the right: on the arm beyond +s it approaches in -s (offsets < 0).
                a, b = (-2 * LANE, 0.0) if sign > 0 else (0.0, 2 * LANE)
                sm.stop_lines.append((_band(road, stop_near, stop_far, a, b), len(sm.crossings) - 1))
                # Zebra stripes along the road, 0.5 m wide every metre across it.
                for off in np.arange(-ROAD_HALF + 0.75, ROAD_HALF - 0.5, 1.0):
                    s = np.linspace(min(near, far) + 0.2, max(near, far) - 0.2, 9)
                    x, y, _ = road.pose(s, off)
                    sm.markings.append(Marking(np.stack([x, y], 1), WHITE, 0.5))


def _place_carpark(scene, rng, roads_area, lines):
    """(car park polygon, driveway polygon, bay heading, bay Markings, bay centres) beside the main road where
    the ego drives by, away from junctions and other roads; (None, None, 0, [], []) when no place fits."""
    main = scene.roads[0]
    travel = float(scene._s_grid[-1])
    others = [ln.buffer(SIDEWALK_HALF + 1.0) for ln in lines[1:]]
    sidewalks_elsewhere = unary_union(others) if others else None
    for attempt in range(40):
        side = 1.0 if rng.random() < 0.5 else -1.0
        if attempt < 25:  # first where the ego passes it, then anywhere along the road
            s0 = scene.ego_s0 + float(rng.uniform(-45.0, travel + 15.0))
        else:
            s0 = float(rng.uniform(5.0, main.length - CARPARK_LENGTH - 5.0))
        s1 = s0 + CARPARK_LENGTH
        if s0 < 5.0 or s1 > main.length - 5.0:
            continue
        inner, outer = side * SIDEWALK_HALF, side * (SIDEWALK_HALF + CARPARK_DEPTH)
        carpark = _band(main, s0, s1, inner, outer)
        junctions = scene.intersections
        if carpark.intersects(roads_area) or any(carpark.distance(Point(p)) < r for p, r in junctions):
            continue
        if sidewalks_elsewhere is not None and carpark.intersects(sidewalks_elsewhere):
            continue
        sm_mid = 0.5 * (s0 + s1)
        driveway = _band(main, sm_mid - DRIVEWAY_HALF, sm_mid + DRIVEWAY_HALF, side * (ROAD_HALF - 0.5),
                         side * (SIDEWALK_HALF + 0.5))
        _, _, h = main.pose(sm_mid)
        return (carpark, driveway, float(h + side * math.pi / 2)) + _bays(main, s0, s1, side, sm_mid)
    return None, None, 0.0, [], []


def _bays(main, s0, s1, side, s_driveway):
    """Bay lines (Markings) and bay centres (x, y, yaw facing into the bay) of a car park: two rows of
    perpendicular bays along the road, none at the driveway's entrance."""
    marks, slots = [], []
    rows = ((SIDEWALK_HALF, SIDEWALK_HALF + BAY_DEPTH), (SIDEWALK_HALF + BAY_DEPTH + AISLE, SIDEWALK_HALF
                                                        + CARPARK_DEPTH))
    edges = np.arange(s0 + 1.0, s1 - 1.0 + 1e-6, BAY_WIDTH)
    for k, (a, b) in enumerate(rows):
        for e0, e1 in zip(edges[:-1], edges[1:]):
            if k == 0 and abs(0.5 * (e0 + e1) - s_driveway) < DRIVEWAY_HALF + BAY_WIDTH / 2:
                continue  # the entrance
            for e in (e0, e1):
                x, y, _ = main.pose(np.array([e, e]), side * np.array([a + 0.2, b - 0.2]))
                marks.append(Marking(np.stack([x, y], 1), WHITE, 0.12))
            x, y, h = main.pose(0.5 * (e0 + e1), side * 0.5 * (a + b))
            facing = h + side * (math.pi / 2 if k == 0 else -math.pi / 2)
            slots.append((float(x), float(y), float(facing)))
        x, y, _ = main.pose(np.array([edges[0], edges[-1]]), side * (b - 0.2 if k == 0 else a + 0.2))
        marks.append(Marking(np.stack([x, y], 1), WHITE, 0.12))  # the line along the aisle
    return marks, slots


# -- painting ----------------------------------------------------------------------------------------
def paint_labels(sm: StreetMap, size: Tuple[int, int], res: float) -> np.ndarray:
    """(rows, cols) uint8 ground labels (GRASS ... CARPARK) at ``res`` m per pixel; pixel (i, j) covers
    x in [j res, (j+1) res), y in [i res, (i+1) res)."""
    label = np.zeros(size, np.uint8)
    areas = ((SIDEWALK, sm.walkways), (ROAD, sm.drivable), (CARPARK, [p for p, _ in sm.carparks]))
    for value, polys in areas:
        _fill_label(label, polys, value, res)
    for m in sm.markings:
        width = max(1, int(round(m.width / res)))
        cv2.polylines(label, [_px(m.xy, res)], False, int(m.label), width, cv2.LINE_8, 2)
    _fill_label(label, [p for p, _ in sm.stop_lines], WHITE, res)
    return label


def _fill_label(label: np.ndarray, polys: List[Polygon], value: int, res: float) -> None:
    if any(p.interiors for p in polys):  # holes show what lies below: go through a mask
        mask = np.zeros(label.shape, np.uint8)
        for poly in polys:
            _fill(mask, poly, res)
        label[mask > 0] = value
    else:
        for poly in polys:
            _fill(label, poly, res, value)


def _px(xy: np.ndarray, res: float) -> np.ndarray:
    """Metres -> cv2 pixel coordinates with 2 fractional bits (pixel centres at integers)."""
    return np.round((np.asarray(xy)[:, :2] / res - 0.5) * 4).astype(np.int32).reshape(-1, 1, 2)


def _fill(mask: np.ndarray, poly: Polygon, res: float, value: int = 1) -> None:
    cv2.fillPoly(mask, [_px(np.asarray(poly.exterior.coords), res)], value, cv2.LINE_8, 2)
    holes = [_px(np.asarray(h.coords), res) for h in poly.interiors]
    if holes:
        cv2.fillPoly(mask, holes, 0, cv2.LINE_8, 2)


# -- the map expansion ---------------------------------------------------------------------------------
class _Records:
    """Node / line / polygon tables and the layers referencing them, for one scene."""

    def __init__(self, token, origin):
        self.token, self.origin = token, np.asarray(origin, np.float64)
        self.count = 0
        self.tables: Dict[str, list] = {k: [] for k in EXPANSION_LIST_TABLES}

    def _tok(self, kind: str) -> str:
        self.count += 1
        return self.token(kind, self.count)

    def nodes(self, xy: np.ndarray) -> List[str]:
        toks = []
        for x, y in np.asarray(xy)[:, :2] + self.origin:
            toks.append(self._tok("node"))
            self.tables["node"].append({"token": toks[-1], "x": round(float(x), 4), "y": round(float(y), 4)})
        return toks

    def line(self, xy: np.ndarray) -> Tuple[str, List[str]]:
        tok, nodes = self._tok("line"), self.nodes(xy)
        self.tables["line"].append({"token": tok, "node_tokens": nodes})
        return tok, nodes

    def polygon(self, poly: Polygon) -> Tuple[str, List[str]]:
        tok = self._tok("polygon")
        ext = self.nodes(np.asarray(poly.exterior.coords)[:-1])
        holes = [{"node_tokens": self.nodes(np.asarray(h.coords)[:-1])} for h in poly.interiors]
        self.tables["polygon"].append({"token": tok, "exterior_node_tokens": ext, "holes": holes})
        return tok, ext

    def add(self, layer: str, **fields) -> str:
        tok = self._tok(layer)
        self.tables[layer].append({"token": tok, **fields})
        return tok


EXPANSION_LIST_TABLES = ("node", "line", "polygon", "drivable_area", "road_segment", "road_block", "lane",
                         "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider",
                         "lane_divider", "traffic_light", "lane_connector")


def expansion_records(sm: StreetMap, token, origin) -> Dict[str, list]:
    """The scene's rows of every list table of a v1.3 expansion file, nodes shifted by ``origin`` (the
    scene's place in its location); ``token(kind, n)`` makes unique tokens."""
    rec = _Records(token, origin)
    drivable = rec.add("drivable_area", polygon_tokens=[rec.polygon(p)[0] for p in sm.drivable])
    for poly, junction in sm.road_segments:
        rec.add("road_segment", polygon_token=rec.polygon(poly)[0], is_intersection=bool(junction),
                drivable_area_token=drivable)
    for poly, start, end in sm.lanes:
        # The lane_divider layer holds the dividers; the lanes do not repeat them segment by segment.
        rec.add("lane", polygon_token=rec.polygon(poly)[0], lane_type="CAR",
                from_edge_line_token=rec.line(start)[0], to_edge_line_token=rec.line(end)[0],
                left_lane_divider_segments=[], right_lane_divider_segments=[])
    crossings = [rec.add("ped_crossing", polygon_token=rec.polygon(p)[0], road_segment_token="")
                 for p in sm.crossings]
    for poly in sm.walkways:
        rec.add("walkway", polygon_token=rec.polygon(poly)[0])
    for poly, k in sm.stop_lines:
        rec.add("stop_line", polygon_token=rec.polygon(poly)[0], stop_line_type="PED_CROSSING",
                ped_crossing_tokens=[crossings[k]], traffic_light_tokens=[], road_block_token="")
    for poly, heading in sm.carparks:
        rec.add("carpark_area", polygon_token=rec.polygon(poly)[0], orientation=heading, road_block_token="")
    for xy in sm.road_dividers:
        rec.add("road_divider", line_token=rec.line(xy)[0], road_segment_token="")
    for xy, dashed in sm.lane_dividers:
        tok, nodes = rec.line(xy)
        kind = "DOUBLE_DASHED_WHITE" if dashed else "SINGLE_SOLID_WHITE"
        rec.add("lane_divider", line_token=tok,
                lane_divider_segments=[{"node_token": n, "segment_type": kind} for n in nodes])
    return rec.tables


def expansion_file(tables: Dict[str, list], canvas_edge: Tuple[float, float]) -> dict:
    """A whole v1.3 expansion file from the merged list tables of a location's scenes."""
    out = {"version": "1.3", "canvas_edge": [round(float(v), 1) for v in canvas_edge]}
    out.update({k: tables.get(k, []) for k in EXPANSION_LIST_TABLES})
    out["arcline_path_3"] = {}  # lane centre paths and lane connectivity are not generated
    out["connectivity"] = {}
    return out


def write_semantic_prior(path, polygons: List[Tuple[np.ndarray, List[np.ndarray]]], canvas_edge, res: float,
                         band: int = 512) -> None:
    """nuScenes' semantic prior of a location (drivable area and sidewalks = 255) as an 8-bit grey PNG at
    ``res`` m per pixel, row 0 at the largest y, written band by band so that a location's canvas (mostly
    empty, hundreds of megapixels) never sits in memory. ``polygons``: (exterior (k,2), [holes]) in global
    metres."""
    import struct
    import zlib

    width, height = (int(math.ceil(v / res)) for v in canvas_edge)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Pixel coordinates (column, row from the top), 2 fractional bits, and each polygon's row range.
    shapes = []
    for ext, holes in polygons:
        rings = [np.stack([r[:, 0] / res - 0.5, height - r[:, 1] / res - 0.5], 1) for r in [ext] + holes]
        shapes.append(([np.round(r * 4).astype(np.int32).reshape(-1, 1, 2) for r in rings],
                       rings[0][:, 1].min(), rings[0][:, 1].max()))
    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        for r0 in range(0, height, band):
            rows = min(band, height - r0)
            img = np.zeros((rows, width + 1), np.uint8)  # column 0: each row's PNG filter byte (0: none)
            view = img[:, 1:]
            for rings, top, bottom in shapes:
                if bottom < r0 - 1 or top > r0 + rows + 1:
                    continue
                shifted = [r - np.array([0, r0 * 4], np.int32) for r in rings]
                mask = np.zeros((rows, width), np.uint8)
                cv2.fillPoly(mask, shifted[:1], 255, cv2.LINE_8, 2)
                if len(shifted) > 1:
                    cv2.fillPoly(mask, shifted[1:], 0, cv2.LINE_8, 2)
                np.maximum(view, mask, out=view)
            data = comp.compress(img.tobytes())
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", comp.flush()) + chunk(b"IEND", b""))
