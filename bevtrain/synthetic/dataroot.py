"""The whole synthetic dataroot: parameters, scenes rendered in worker processes, the 13 tables, each
location's map (the v1.3 map expansion and the semantic-prior mask), the completion marker, and
`ensure_synthetic`'s generate-once-and-swap-in."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Sequence, Union

import cv2
import numpy as np

from bevtrain.progress import Progress

from . import streetmap, writer
from .catalog import (
    ATTRIBUTES,
    CATEGORIES,
    DEFAULT_RIG,
    LIDAR,
    MINI_SCENES,
    RADARS,
    RIGS,
    VISIBILITY,
    camera_sizes,
    stable_hash,
)

VERSION = "v1.0-mini"
MARKER = ".bevtrain_synthetic.json"  # written last: its presence means the set is complete
PARTIAL = ".bevtrain_synthetic.partial"  # present while a generation runs (or after it crashed)
FORMAT_VERSION = 1


def generator_hash() -> str:
    """Hash of this package's source: a set made by other generator code is regenerated."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def resolve_scenes(scenes: Union[None, int, Sequence[str]]) -> List[str]:
    if scenes is None:
        return list(MINI_SCENES)
    if isinstance(scenes, (int, np.integer)) and not isinstance(scenes, bool):
        if not 1 <= int(scenes) <= len(MINI_SCENES):
            raise ValueError(f"scenes={scenes}: pick between 1 and {len(MINI_SCENES)} scenes")
        return list(MINI_SCENES[: int(scenes)])
    names = [str(s) for s in scenes]
    unknown = [s for s in names if s not in MINI_SCENES]
    if unknown or not names:
        raise ValueError(f"scenes={names}: unknown names {unknown}; choose from {list(MINI_SCENES)}")
    return names


def _params(keyframes, scenes, width, height, seed, rig=DEFAULT_RIG) -> dict:
    if rig not in RIGS:
        raise ValueError(f"rig={rig!r}: use one of {', '.join(RIGS)}")
    if int(keyframes) < 2:
        raise ValueError(f"keyframes={keyframes}: need at least 2 keyframes per scene")
    small = [f"{ch} {w}x{h}" for ch, (w, h) in camera_sizes(rig, int(width), int(height)).items()
             if min(w, h) < 32]
    if int(width) < 32 or int(height) < 32 or small:
        raise ValueError(f"width={width}, height={height}: images must be at least 32x32 "
                         f"({', '.join(small)})")
    params = dict(
        keyframes=int(keyframes),
        scenes=resolve_scenes(scenes),
        width=int(width),
        height=int(height),
        seed=int(seed),
        format=FORMAT_VERSION,
    )
    if rig != DEFAULT_RIG:  # the default's parameters (its marker) as before --rig existed
        params["rig"] = rig
    return params


# ---------------------------------------------------------------------------------------------
# The whole dataroot
# ---------------------------------------------------------------------------------------------
def _static_tables(rig: str) -> Dict[str, list]:
    cameras = list(RIGS[rig])
    channels = cameras + [LIDAR] + list(RADARS)
    modality = {**{c: "camera" for c in cameras}, LIDAR: "lidar", **{r: "radar" for r in RADARS}}
    return dict(
        category=[
            dict(token=tok, name=n, description=f"nuScenes category {n}") for n, tok in CATEGORIES.items()
        ],
        attribute=[dict(token=tok, name=n, description=d) for n, (tok, d) in ATTRIBUTES.items()],
        visibility=[dict(token=t, level=lvl, description=d) for t, lvl, d in VISIBILITY],
        sensor=[dict(token=stable_hash("sensor", c), channel=c, modality=modality[c]) for c in channels],
    )


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate(
    out_dir,
    *,
    keyframes: int = 40,
    scenes=None,
    width: int = 1600,
    height: int = 900,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    rig: str = DEFAULT_RIG,
) -> Path:
    """Write a synthetic v1.0-mini dataroot into `out_dir` (tables, samples/, sweeps/, maps/).

    ``rig``: the cameras (catalog.RIGS: 'nuscenes' six, 'four' 1280x720, 'one' 1024x768 front camera,
    'mixed' 1920x1080 + 640x480), each scaled by (width / 1600, height / 900). The marker file is written
    last, so its presence means the set is complete.
    """
    params = _params(keyframes, scenes, width, height, seed, rig)
    out = Path(out_dir)
    _prepare_out_dir(out)
    start = time.time()
    sizes = {k: params[k] for k in ("seed", "keyframes", "width", "height")}
    jobs = [dict(out=str(out), scene=s, rig=rig, **sizes) for s in params["scenes"]]
    n_workers = min(len(jobs), workers if workers else (os.cpu_count() or 1))
    bar = Progress(len(jobs) * params["keyframes"], progress, label="synthetic nuScenes", unit="keyframes")
    results = _render_scenes(jobs, n_workers, bar)
    bar.close()
    maps = _map_records(results, params["seed"])
    tables = _write_tables(out, results, [row for _, row in maps], rig)
    _write_maps(out, results, maps)
    stats = _write_marker(out, params, tables, results, time.time() - start)
    (out / PARTIAL).unlink(missing_ok=True)
    if progress:
        shares = " ".join(f"v{k}:{100 * v:.0f}%" for k, v in stats["visibility_share"].items())
        sys.stderr.write(
            f"synthetic nuScenes: {out} in {stats['seconds']:.1f}s, {stats['bytes'] / 2**20:.0f} MiB, "
            f"{stats['samples']} samples, {stats['annotations']} annotations, visibility {shares}\n"
        )
    return out


# Set in each worker process: where it reports finished keyframes.
_progress_queue = None


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue
    cv2.setNumThreads(1)


def _render_in_worker(job: dict) -> dict:
    return writer.render_scene(job, lambda: _progress_queue.put(1))


def _render_scenes(jobs: List[dict], n_workers: int, bar: Progress) -> List[dict]:
    """Every scene's rows, in job order; scenes run in `n_workers` processes when more than one."""
    if n_workers <= 1:
        return [writer.render_scene(job, bar.advance) for job in jobs]
    ctx = mp.get_context("spawn")  # safe even when the parent holds threads (torch, pytest)
    queue = ctx.Queue()
    with ctx.Pool(n_workers, initializer=_init_worker, initargs=(queue,)) as pool:
        pending = pool.map_async(_render_in_worker, jobs, chunksize=1)
        while not pending.ready():
            pending.wait(0.2)
            while not queue.empty():
                bar.advance(queue.get())
        results = pending.get()
        while not queue.empty():
            bar.advance(queue.get())
    return results


def _map_records(results: List[dict], seed: int) -> List[tuple]:
    """(location, map table row) per location: one semantic prior shared by its logs, as in nuScenes."""
    rows = []
    for location in sorted({res["location"] for res in results}):
        token = stable_hash("map", seed, location)
        logs = [res["log_token"] for res in results if res["location"] == location]
        rows.append((location, dict(token=token, log_tokens=logs, category="semantic_prior",
                                    filename=f"maps/{token}.png")))
    return rows


def _write_tables(out: Path, results: List[dict], maps: List[dict], rig: str) -> Dict[str, list]:
    """The 13 JSON tables: the static ones, every scene's rows in scene order, the map rows."""
    tables = _static_tables(rig)
    for key in writer.SCENE_TABLES:
        tables[key] = [r for res in results for r in res["tables"][key]]
    tables["map"] = maps
    table_dir = out / VERSION
    table_dir.mkdir(exist_ok=True)
    for key, rows in tables.items():
        with open(table_dir / f"{key}.json", "w") as f:
            json.dump(rows, f, indent=0)
    return tables


def _write_maps(out: Path, results: List[dict], maps: List[tuple]) -> None:
    """Per location: maps/expansion/<location>.json (its scenes' street maps, v1.3) and the semantic prior
    PNG its map record names (drivable area and sidewalks, 0.1 m per pixel, as nuScenes' masks)."""
    (out / "maps" / "expansion").mkdir(parents=True, exist_ok=True)
    for location, row in maps:
        parts = [res for res in results if res["location"] == location]
        tables: Dict[str, list] = {}
        for res in parts:
            for key, rows in res["map_records"].items():
                tables.setdefault(key, []).extend(rows)
        edge = np.max([res["map_corner"] for res in parts], axis=0)
        with open(out / "maps" / "expansion" / f"{location}.json", "w") as f:
            json.dump(streetmap.expansion_file(tables, edge), f, separators=(",", ":"))
        prior = [poly for res in parts for poly in res["prior"]]
        streetmap.write_semantic_prior(out / row["filename"], prior, edge, res=0.1)


def _write_marker(
    out: Path, params: dict, tables: Dict[str, list], results: List[dict], seconds: float
) -> dict:
    """Write the marker (parameters, generator hash, statistics) that says the set is complete."""
    vis = np.sum([res["visibility"] for res in results], axis=0)
    stats = dict(
        seconds=round(seconds, 1),
        samples=len(tables["sample"]),
        annotations=len(tables["sample_annotation"]),
        instances=len(tables["instance"]),
        visibility_share={str(i + 1): round(float(v) / max(1, vis.sum()), 3) for i, v in enumerate(vis)},
    )
    stats["bytes"] = _dir_size(out)
    with open(out / MARKER, "w") as f:
        json.dump(dict(params=params, generator=generator_hash(), stats=stats), f, indent=1)
    return stats


OUTPUTS = ("samples", "sweeps", "maps", VERSION)


def _prepare_out_dir(out: Path) -> None:
    """Clear what an earlier generation wrote here; never touch a dataroot we did not make."""
    out.mkdir(parents=True, exist_ok=True)
    ours = (out / MARKER).exists() or (out / PARTIAL).exists()
    foreign = [p.name for p in out.iterdir() if p.name in OUTPUTS or p.name.startswith("v1.0-")]
    if foreign and not ours:
        raise FileExistsError(
            f"{out} already holds {sorted(foreign)} not made by bevtrain's generator (no {MARKER}); "
            "choose an empty or new --out directory"
        )
    (out / PARTIAL).write_text("generation in progress or interrupted\n")
    (out / MARKER).unlink(missing_ok=True)
    for name in OUTPUTS:
        shutil.rmtree(out / name, ignore_errors=True)


def _marker_matches(out: Path, params: dict) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("params") == params and marker.get("generator") == generator_hash()


@contextmanager
def _locked(out: Path):
    """Serialise generators of the same directory across processes (tests run in parallel)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: best effort
        yield
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_synthetic(
    out_dir,
    *,
    keyframes: int = 40,
    scenes=None,
    width: int = 1600,
    height: int = 900,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    rig: str = DEFAULT_RIG,
) -> Path:
    """Return `out_dir`, generating the set first unless a complete one with the same parameters and the
    same generator code is already there. Generation goes to a temporary sibling that replaces
    `out_dir` only when finished, so an interrupted run never leaves a half set behind."""
    params = _params(keyframes, scenes, width, height, seed, rig)
    out = Path(out_dir).resolve()
    if _marker_matches(out, params):
        return out
    with _locked(out):
        if _marker_matches(out, params):
            return out
        if out.exists() and any(out.iterdir()) and not ((out / MARKER).exists() or (out / PARTIAL).exists()):
            raise FileExistsError(
                f"{out} holds files that are not a synthetic nuScenes set; "
                "pass an empty or new directory to ensure_synthetic"
            )
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        generate(
            tmp,
            keyframes=keyframes,
            scenes=scenes,
            width=width,
            height=height,
            seed=seed,
            workers=workers,
            progress=progress,
            rig=rig,
        )
        if out.exists():
            trash = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
            out.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(out)
    return out
