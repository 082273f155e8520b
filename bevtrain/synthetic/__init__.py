"""Synthetic nuScenes: a dataroot that the unmodified nuscenes-devkit reads like v1.0-mini.

    python -m bevtrain.synthetic --out data/synthetic [--keyframes 40] [--scenes 10] [--rig four]

Ten scenes with the official v1.0-mini names (so the devkit's mini_train / mini_val splits work),
six cameras (or another rig: `--rig four` / `one`, catalog.RIGS), LIDAR_TOP and five radars with
sweeps, ray-cast from one world per scene: roads with lane markings, traffic, parked vehicles,
pedestrians, cones and barriers. Annotations (boxes, tracks, lidar/radar point counts, visibility from
the rendered occlusion) match the sensor data.

Modules: `catalog` (names, tokens, rigs, sizes), `looks` (object parts and colours), `world`
(roads, actors, motion), `render` (ray casting, cameras), `sensors` (lidar, radar), `writer` (one
scene's files and table rows), `dataroot` (the whole set, `generate`, `ensure_synthetic`).
"""

from .catalog import MINI_SCENES
from .dataroot import MARKER, ensure_synthetic, generate
from .looks import PROBE_CATEGORIES, PROBE_HEIGHT, SUN_DIRECTION, body_color, shade

__all__ = [
    "generate",
    "ensure_synthetic",
    "MINI_SCENES",
    "body_color",
    "shade",
    "SUN_DIRECTION",
    "PROBE_HEIGHT",
    "PROBE_CATEGORIES",
    "MARKER",
]
