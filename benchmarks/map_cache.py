"""Map-layer ground truth: the size of the per-location map cache and the cost of rasterising it.

    python benchmarks/map_cache.py --data_dir DIR [--dset mini] [--split train]

- cache: builds (or reads) each location's cache (``index.load_map_geometry``) and prints its bytes on
  disk and in memory (the packed arrays), per location and per scene of that location, then two
  extrapolations to nuScenes trainval (850 scenes, 4 locations): by scene (every scene on streets of its
  own, as in the synthetic set: an upper bound, nuScenes' scenes drive the same streets again) and by
  area (the synthetic cache's bytes per m^2 of drivable area times the four locations' drivable area);
- cost: per sample of the split, in this process, the time to rasterise every map layer (each once)
  and the [vehicle] targets, from the same frames the dataset uses; medians over the samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bevtrain.classes import MAP_LINE_LAYERS, MAP_POLYGON_LAYERS
from bevtrain.config import DataConfig
from bevtrain.data import index
from bevtrain.data.dataset import NuScenesBEVDataset


def _packed_bytes(geometry: dict) -> int:
    return sum(a.nbytes for layer in geometry["layers"].values() for a in layer.values())


def _drivable_m2(geometry: dict) -> float:
    """Area of the drivable_area polygons (exteriors minus holes, shoelace), m^2."""
    layer = geometry["layers"]["drivable_area"]
    xy, rs, ss = layer["xy"], layer["ring_start"], layer["shape_start"]
    total = 0.0
    for s in range(len(ss) - 1):
        for k, r in enumerate(range(ss[s], ss[s + 1])):
            p = xy[rs[r]: rs[r + 1]]
            a = 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1)))
            total += a if k == 0 else -a
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--dset", default="mini")
    ap.add_argument("--split", default="train")
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--nuscenes_drivable_km2", type=float, default=None,
                    help="drivable area of nuScenes' four locations (km^2), for the by-area estimate")
    args = ap.parse_args()
    # single-threaded, as in a loader worker (idle pool threads would otherwise spin against the timing)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    layers = list(MAP_POLYGON_LAYERS) + ["divider"]
    data = DataConfig.make(data_dir=args.data_dir, dset=args.dset, cache_dir=args.cache_dir or "",
                           classes=["vehicle"] + layers)
    t0 = time.perf_counter()
    ds = NuScenesBEVDataset(data, split=args.split, is_train=False)
    print(f"dataset with {len(ds.outputs)} outputs: {time.perf_counter() - t0:.2f} s (index and map caches)")

    cdir = Path(args.cache_dir).expanduser() if args.cache_dir else index.default_cache_dir()
    disk_total, mem_total, scenes_total, area_total = 0, 0, 0, 0.0
    locations = sorted({rec["location"] for rec in ds.records})
    geometries = index.load_map_geometry(ds.dataroot, locations, cache_dir=args.cache_dir, verbose=False)
    for loc, geometry in sorted(geometries.items()):
        path = cdir / f"map_{loc}_{index._map_cache_key(index.expansion_path(ds.dataroot, loc))}.pkl"
        disk = path.stat().st_size
        mem = _packed_bytes(geometry)
        # every scene of the location is in its map, whichever split is loaded
        n_scenes = len(_all_scenes(ds.dataroot, args.dset, loc))
        area = _drivable_m2(geometry)
        disk_total, mem_total, scenes_total, area_total = (disk_total + disk, mem_total + mem,
                                                           scenes_total + n_scenes, area_total + area)
        expansion = index.expansion_path(ds.dataroot, loc).stat().st_size
        print(f"{loc:26s} {n_scenes} scene(s): cache {disk / 1e3:8.1f} kB on disk, "
              f"{mem / 1e3:8.1f} kB packed arrays ({disk / n_scenes / 1e3:.1f} kB per scene); "
              f"expansion JSON {expansion / 1e6:.2f} MB; drivable area {area / 1e6:.4f} km^2")
    per_scene = disk_total / scenes_total
    per_m2 = disk_total / area_total
    print(f"all {len(geometries)} location(s) of the split: {disk_total / 1e6:.2f} MB on disk, "
          f"{scenes_total} scenes, {per_scene / 1e3:.1f} kB per scene, {per_m2:.1f} bytes per m^2 drivable")
    print(f"extrapolated to trainval (850 scenes), by scene: {per_scene * 850 / 1e6:.1f} MB (upper bound)")
    if args.nuscenes_drivable_km2:
        print(f"extrapolated by area ({args.nuscenes_drivable_km2:g} km^2 drivable over 4 locations): "
              f"{per_m2 * args.nuscenes_drivable_km2 * 1e6 / 1e6:.1f} MB")

    # Per-sample cost, in this process: the dataset's own map step (every layer once, the outputs' unions)
    # timed inside whole samples, against whole [vehicle] samples.
    vehicle = NuScenesBEVDataset(data.replace(classes=["vehicle"]), split=args.split, is_train=False)
    t_map, t_all, t_veh = [], [], []
    timed = ds._map_masks

    def map_step(rec, ref_T_global, seg):
        t = time.perf_counter()
        timed(rec, ref_T_global, seg)
        t_map.append(time.perf_counter() - t)

    ds._map_masks = map_step
    for i in range(len(ds)):
        pair = ((vehicle, t_veh), (ds, t_all))
        for d, times in pair if i % 2 else pair[::-1]:  # each goes first every other sample (warm files)
            t = time.perf_counter()
            d[i]
            times.append(time.perf_counter() - t)
    n_layers = len(MAP_POLYGON_LAYERS) + len(MAP_LINE_LAYERS)
    print(f"per sample ({len(t_map)} samples of {args.split}, validation mode, one process; medians): "
          f"the {n_layers} map layers {np.median(t_map) * 1e3:.2f} ms "
          f"(p90 {np.percentile(t_map, 90) * 1e3:.2f}); "
          f"whole sample [vehicle] {np.median(t_veh) * 1e3:.1f} ms, [vehicle + {len(layers)} map outputs] "
          f"{np.median(t_all) * 1e3:.1f} ms")


def _all_scenes(dataroot, dset: str, location: str) -> set:
    """Names of every scene of ``location`` in the dataroot's tables (scene -> log -> location)."""
    version = {"mini": "v1.0-mini", "trainval": "v1.0-trainval"}.get(dset, dset)
    root = Path(dataroot) / version
    logs = {r["token"]: r["location"] for r in json.loads((root / "log.json").read_text())}
    scenes = json.loads((root / "scene.json").read_text())
    return {s["name"] for s in scenes if logs[s["log_token"]] == location}


if __name__ == "__main__":
    main()
