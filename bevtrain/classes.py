"""The named outputs a model is trained on: one registry read by the dataset (which boxes or map layers
make each target channel), the model (one segmentation logit per output), the losses, the evaluation
(per-class IoU and protocols) and the pictures (colours, legend).

``--classes`` lists output names in channel order; the default ``[vehicle]`` is Simple-BEV's single
vehicle channel. A name is

- a built-in object group (``vehicle``, ``pedestrian``, ``traffic_cone`` ...): the boxes whose nuScenes
  category equals one of its ``sources`` or starts with it followed by a dot
  (``vehicle`` -> ``vehicle.car``, ``vehicle.bus.rigid`` ...);
- a built-in map layer (``drivable_area``, ``ped_crossing`` ... ``divider``): the union of the nuScenes
  map-expansion layers in its ``sources`` (``divider`` = ``road_divider`` and ``lane_divider``);
- a group the user defines (``class_groups`` in a YAML preset: ``{name: {categories: [...]}}`` or
  ``{name: {layers: [...]}}``, optionally ``color: [r, g, b]``);
- a nuScenes category name or dotted prefix (``vehicle.car``, ``human``): an object group of its own,
  which is what ``--classes`` meant before it named outputs.

This module imports nothing from bevtrain: every part may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Sequence, Tuple

from bevtrain.suggest import closest_name

OBJECT = "object"
MAP = "map"
KINDS = (OBJECT, MAP)


class ClassSpecError(ValueError):
    """An unknown output name, a malformed user group, or a list that cannot be trained."""


@dataclass(frozen=True)
class OutputClass:
    """One output channel.

    ``sources``: for OBJECT the nuScenes category names / dotted prefixes whose boxes it covers; for MAP
    the map-expansion layers whose union it covers. ``line``: MAP layers made of lines (dividers), drawn
    with a width rather than filled. ``color``: RGB in pictures and legends.
    """

    name: str
    kind: str
    sources: Tuple[str, ...]
    color: Tuple[int, int, int]
    line: bool = False

    @property
    def is_object(self) -> bool:
        return self.kind == OBJECT

    @property
    def is_map(self) -> bool:
        return self.kind == MAP

    def matches_category(self, category: str) -> bool:
        """A box of ``category`` belongs to this (object) output."""
        return any(category == s or category.startswith(s + ".") for s in self.sources)


def _obj(name: str, sources: Sequence[str], color) -> OutputClass:
    return OutputClass(name, OBJECT, tuple(sources), tuple(color))


def _map(name: str, sources: Sequence[str], color, line: bool = False) -> OutputClass:
    return OutputClass(name, MAP, tuple(sources), tuple(color), line)


# Polygon layers and line layers of the nuScenes map expansion v1.3 that outputs may draw from.
MAP_POLYGON_LAYERS = ("drivable_area", "road_segment", "lane", "ped_crossing", "walkway", "stop_line",
                      "carpark_area")
MAP_LINE_LAYERS = ("road_divider", "lane_divider")

BUILTIN: Dict[str, OutputClass] = {c.name: c for c in (
    # objects (nuScenes category prefixes)
    _obj("vehicle", ["vehicle"], (0, 120, 255)),
    _obj("car", ["vehicle.car"], (0, 90, 255)),
    _obj("truck", ["vehicle.truck"], (70, 130, 180)),
    _obj("bus", ["vehicle.bus"], (0, 170, 200)),
    _obj("trailer", ["vehicle.trailer"], (90, 90, 200)),
    _obj("construction_vehicle", ["vehicle.construction"], (200, 160, 0)),
    _obj("emergency_vehicle", ["vehicle.emergency"], (255, 60, 60)),
    _obj("motorcycle", ["vehicle.motorcycle"], (200, 60, 200)),
    _obj("bicycle", ["vehicle.bicycle"], (160, 60, 255)),
    _obj("pedestrian", ["human.pedestrian"], (255, 40, 40)),
    _obj("traffic_cone", ["movable_object.trafficcone"], (255, 140, 0)),
    _obj("barrier", ["movable_object.barrier"], (255, 220, 0)),
    _obj("pushable_pullable", ["movable_object.pushable_pullable"], (180, 120, 60)),
    _obj("debris", ["movable_object.debris"], (130, 100, 70)),
    _obj("bicycle_rack", ["static_object.bicycle_rack"], (120, 120, 120)),
    _obj("animal", ["animal"], (0, 200, 120)),
    # map layers (nuScenes map expansion v1.3)
    _map("drivable_area", ["drivable_area"], (110, 110, 120)),
    _map("road_segment", ["road_segment"], (90, 90, 110)),
    _map("lane", ["lane"], (130, 130, 160)),
    _map("ped_crossing", ["ped_crossing"], (230, 230, 230)),
    _map("walkway", ["walkway"], (70, 160, 70)),
    _map("stop_line", ["stop_line"], (220, 40, 40)),
    _map("carpark_area", ["carpark_area"], (150, 110, 200)),
    _map("divider", ["road_divider", "lane_divider"], (250, 200, 40), line=True),
    _map("road_divider", ["road_divider"], (250, 170, 30), line=True),
    _map("lane_divider", ["lane_divider"], (250, 230, 90), line=True),
)}

DEFAULT_CLASSES = ("vehicle",)


def _user_group(name: str, spec: Any) -> OutputClass:
    where = f"class_groups: '{name}'"
    if not isinstance(spec, Mapping):
        raise ClassSpecError(f"{where} must be a mapping with 'categories' or 'layers', got {spec!r}")
    unknown = set(spec) - {"categories", "layers", "color"}
    if unknown:
        raise ClassSpecError(f"{where} has unknown keys {sorted(unknown)}: use categories or layers, color")
    if ("categories" in spec) == ("layers" in spec):
        raise ClassSpecError(f"{where} needs exactly one of 'categories' (objects) or 'layers' (map)")
    key = "categories" if "categories" in spec else "layers"
    sources = spec[key]
    if isinstance(sources, str):
        sources = [sources]
    if not sources or not all(isinstance(s, str) and s for s in sources):
        raise ClassSpecError(f"{where}: '{key}' must be a non-empty list of names, got {spec[key]!r}")
    color = spec.get("color", (255, 255, 255))
    if not (isinstance(color, (list, tuple)) and len(color) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in color)):
        raise ClassSpecError(f"{where}: 'color' must be [r, g, b] with integers 0-255, got {color!r}")
    if key == "categories":
        return _obj(name, [s.rstrip(".") for s in sources], color)
    known = MAP_POLYGON_LAYERS + MAP_LINE_LAYERS
    bad = [s for s in sources if s not in known]
    if bad:
        raise ClassSpecError(f"{where}: unknown map layer(s) {bad}{_closest(bad[0], known)}; "
                             f"layers: {', '.join(known)}")
    lines = {s in MAP_LINE_LAYERS for s in sources}
    if len(lines) > 1:
        raise ClassSpecError(f"{where} mixes line layers {list(MAP_LINE_LAYERS)} with polygon layers")
    return _map(name, sources, color, line=lines.pop())


def _closest(name: str, known: Sequence[str]) -> str:
    close = closest_name(name, known)
    return f" (did you mean '{close}'?)" if close else ""


def _looks_like_category(name: str) -> bool:
    top = name.split(".", 1)[0]
    return "." in name or top in ("vehicle", "human", "movable_object", "static_object", "animal")


def resolve_classes(names: Sequence[str], groups: Mapping[str, Any] | None = None) -> Tuple[OutputClass, ...]:
    """The outputs named by ``names`` (channel order), user ``groups`` taking precedence over built-ins.

    ClassSpecError for an empty list, a repeated name, or a name that is neither a group, a built-in
    nor a nuScenes category (prefix); the message names the closest known name.
    """
    if isinstance(names, str):
        names = [names]
    names = [str(n) for n in names]
    if not names:
        raise ClassSpecError("classes is empty: name at least one output, e.g. [vehicle]")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClassSpecError(f"classes names {repeated} more than once; each output is one channel")
    user = {str(k): _user_group(str(k), v) for k, v in (groups or {}).items()}
    out = []
    for name in names:
        if name in user:
            out.append(user[name])
        elif name in BUILTIN:
            out.append(BUILTIN[name])
        elif _looks_like_category(name):
            out.append(_obj(name, [name.rstrip(".")], (255, 255, 255)))
        else:
            known = list(user) + list(BUILTIN)
            raise ClassSpecError(
                f"unknown class '{name}'{_closest(name, known)}; built-in objects: "
                f"{', '.join(c.name for c in BUILTIN.values() if c.is_object)}; map layers: "
                f"{', '.join(c.name for c in BUILTIN.values() if c.is_map)}; or define it under class_groups"
            )
    return tuple(out)


def object_indices(classes: Sequence[OutputClass]) -> Tuple[int, ...]:
    """Channel indices of the object outputs."""
    return tuple(i for i, c in enumerate(classes) if c.is_object)


def map_indices(classes: Sequence[OutputClass]) -> Tuple[int, ...]:
    """Channel indices of the map-layer outputs."""
    return tuple(i for i, c in enumerate(classes) if c.is_map)
