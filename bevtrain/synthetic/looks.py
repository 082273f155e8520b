"""How synthetic objects look: per-category blocky parts with painted decals, per-instance colours
around class palettes, and flat shading from a fixed sun."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from .catalog import seeded_rng

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


def _jitter(rng, rgb, amount=14) -> Tuple[int, int, int]:
    c = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in c)


def body_color(category: str, instance_token: str) -> Tuple[int, int, int]:
    """Unshaded RGB of the main body of an instance.

    For vehicle.car, bus, trailer and construction vehicles the body covers every side face of the
    annotation box at PROBE_HEIGHT of the box height (tests probe images there).
    """
    rng = seeded_rng("body", category, instance_token)
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


RGB = Tuple[int, int, int]
HEAD_LIGHT, TAIL_LIGHT = (235, 235, 215), (190, 20, 20)


class _PartBuilder:
    """Collects the parts of one instance; coordinates are fractions of the box (x of its length,
    y of its width, z of its height), x, y in [-0.5, 0.5] and z in [0, 1]."""

    def __init__(self, wlh: Sequence[float]):
        self.w, self.l, self.h = wlh
        self.parts: List[Part] = []

    def add(self, x0, x1, y0, y1, z0, z1, side: RGB, top: RGB | None = None) -> Part:
        l, w, h = self.l, self.w, self.h
        part = Part(
            np.array([x0 * l, y0 * w, z0 * h]),
            np.array([x1 * l, y1 * w, z1 * h]),
            side,
            side if top is None else top,
        )
        self.parts.append(part)
        return part

    def paint(self, part: Part, faces, a0, a1, b0, b1, rgb: RGB) -> None:
        """Decal in box-relative units of the face's two in-plane axes."""
        for face in faces:
            axes = [k for k in range(3) if k != face // 2]
            scale = [(self.l, self.w, self.h)[k] for k in axes]
            part.decals.append((face, a0 * scale[0], a1 * scale[0], b0 * scale[1], b1 * scale[1], rgb))


def _car(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    shell = b.add(-0.5, 0.5, -0.5, 0.5, 0.0, 0.56, body)
    b.paint(shell, [0, 1], -0.5, 0.5, 0.0, 0.16, UNDERBODY)  # bumpers and the shadowed underside
    b.paint(shell, [2, 3], -0.5, 0.5, 0.0, 0.14, UNDERBODY)
    b.add(-0.30, 0.20, -0.44, 0.44, 0.56, 1.0, GLASS, body)
    for y0, y1 in ((0.26, 0.44), (-0.44, -0.26)):
        b.paint(shell, [0], y0, y1, 0.40, 0.50, HEAD_LIGHT)
        b.paint(shell, [1], y0, y1, 0.40, 0.50, TAIL_LIGHT)
    for x0, x1 in ((0.22, 0.38), (-0.38, -0.22)):
        b.paint(shell, [2, 3], x0, x1, 0.14, 0.30, (28, 28, 30))  # wheels


def _truck(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    cab = _jitter(rng, TRUCK_PALETTE[rng.integers(len(TRUCK_PALETTE))])
    b.add(-0.48, 0.48, -0.47, 0.47, 0.0, 0.22, UNDERBODY)
    front = b.add(0.28, 0.5, -0.5, 0.5, 0.12, 0.68, cab)
    b.add(0.30, 0.48, -0.46, 0.46, 0.68, 0.92, GLASS, cab)
    cargo = b.add(-0.5, 0.26, -0.5, 0.5, 0.20, 1.0, body)
    for y0, y1 in ((0.28, 0.45), (-0.45, -0.28)):
        b.paint(front, [0], y0, y1, 0.22, 0.30, HEAD_LIGHT)
        b.paint(cargo, [1], y0, y1, 0.24, 0.30, TAIL_LIGHT)


def _bus(b: _PartBuilder, body: RGB, rng, rider: bool) -> Part:
    shell = b.add(-0.5, 0.5, -0.5, 0.5, 0.0, 1.0, body, (225, 225, 222))
    b.paint(shell, [0, 1, 2, 3], -0.5, 0.5, 0.0, 0.08, UNDERBODY)
    b.paint(shell, [2, 3], -0.47, 0.5, 0.55, 0.86, GLASS)  # window band
    b.paint(shell, [0], -0.45, 0.45, 0.45, 0.9, GLASS)  # wind screen
    b.paint(shell, [1], -0.4, 0.4, 0.6, 0.86, GLASS)
    for y0, y1 in ((0.3, 0.45), (-0.45, -0.3)):
        b.paint(shell, [0], y0, y1, 0.15, 0.22, HEAD_LIGHT)
        b.paint(shell, [1], y0, y1, 0.15, 0.22, TAIL_LIGHT)
    return shell


def _bendy_bus(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    shell = _bus(b, body, rng, rider)
    b.paint(shell, [2, 3], 0.08, 0.14, 0.10, 0.95, (40, 40, 42))  # the articulation


def _trailer(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    shell = b.add(-0.5, 0.5, -0.5, 0.5, 0.0, 1.0, body)
    b.paint(shell, [0, 1, 2, 3], -0.5, 0.5, 0.0, 0.25, UNDERBODY)
    for y0, y1 in ((0.3, 0.45), (-0.45, -0.3)):
        b.paint(shell, [1], y0, y1, 0.27, 0.33, TAIL_LIGHT)


def _construction(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    b.add(-0.45, 0.45, -0.5, 0.5, 0.0, 0.22, (52, 50, 48))
    b.add(-0.5, 0.2, -0.5, 0.5, 0.2, 0.62, body)
    b.add(-0.2, 0.15, -0.42, 0.42, 0.62, 1.0, GLASS, body)
    b.add(0.2, 0.5, -0.1, 0.1, 0.35, 0.92, body)


def _cycle(b: _PartBuilder, body: RGB, rng, rider: bool, motor: bool) -> None:
    frame_half = 0.25 if motor else 0.12
    b.add(-0.5, 0.5, -frame_half, frame_half, 0.0, 0.55, body)
    if rider:
        shirt = _jitter(rng, SHIRT_PALETTE[rng.integers(len(SHIRT_PALETTE))])
        b.add(-0.22, 0.12, -0.42, 0.42, 0.55, 0.86, shirt)
        head = (30, 30, 30) if motor else SKIN_PALETTE[rng.integers(len(SKIN_PALETTE))]  # helmet or face
        b.add(-0.10, 0.06, -0.2, 0.2, 0.86, 1.0, head)


def _pedestrian(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    shirt = _jitter(rng, SHIRT_PALETTE[rng.integers(len(SHIRT_PALETTE))])
    skin = SKIN_PALETTE[rng.integers(len(SKIN_PALETTE))]
    b.add(-0.25, 0.25, -0.32, 0.32, 0.0, 0.47, body)
    b.add(-0.30, 0.30, -0.5, 0.5, 0.47, 0.83, shirt)
    b.add(-0.17, 0.17, -0.2, 0.2, 0.86, 1.0, skin)


def _cone(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    b.add(-0.5, 0.5, -0.5, 0.5, 0.0, 0.06, (200, 80, 18))
    b.add(-0.3, 0.3, -0.3, 0.3, 0.06, 0.45, body)
    b.add(-0.23, 0.23, -0.23, 0.23, 0.45, 0.65, (235, 235, 235))
    b.add(-0.15, 0.15, -0.15, 0.15, 0.65, 1.0, body)


def _barrier(b: _PartBuilder, body: RGB, rng, rider: bool) -> None:
    if body[0] > 200 and body[1] < 150:  # plastic orange/white striped
        for i in range(5):
            stripe = body if i % 2 == 0 else (235, 235, 232)
            b.add(-0.5 + i * 0.2, -0.3 + i * 0.2, -0.5, 0.5, 0.0, 1.0, stripe)
    else:  # concrete jersey barrier
        b.add(-0.5, 0.5, -0.5, 0.5, 0.0, 0.35, body)
        b.add(-0.5, 0.5, -0.25, 0.25, 0.35, 1.0, body)


_LOOKS: Dict[str, Callable[..., object]] = {
    "vehicle.car": _car,
    "vehicle.truck": _truck,
    "vehicle.bus.rigid": _bus,
    "vehicle.bus.bendy": _bendy_bus,
    "vehicle.trailer": _trailer,
    "vehicle.construction": _construction,
    "vehicle.motorcycle": lambda b, body, rng, rider: _cycle(b, body, rng, rider, motor=True),
    "vehicle.bicycle": lambda b, body, rng, rider: _cycle(b, body, rng, rider, motor=False),
    "human.pedestrian.adult": _pedestrian,
    "movable_object.trafficcone": _cone,
    "movable_object.barrier": _barrier,
}


def object_parts(category: str, instance_token: str, wlh: Sequence[float], rider: bool) -> List[Part]:
    """Blocky but characteristic geometry of one instance inside its annotation box."""
    if category not in _LOOKS:
        raise ValueError(f"synthetic generator has no look for category {category!r}")
    rng = seeded_rng("parts", category, instance_token)
    builder = _PartBuilder(wlh)
    _LOOKS[category](builder, body_color(category, instance_token), rng, rider)
    return builder.parts
