"""Synthetic nuScenes: a dataroot that the unmodified nuscenes-devkit reads like v1.0-mini.

    python -m bevtrain.data.synthetic --out data/synthetic [--keyframes 40] [--scenes 10]

Ten scenes with the official v1.0-mini names (so the devkit's mini_train / mini_val splits work),
six cameras, LIDAR_TOP and five radars with sweeps, ray-cast from one world per scene: roads with
lane markings, traffic, parked vehicles, pedestrians, cones and barriers. Annotations (boxes,
tracks, lidar/radar point counts, visibility from the rendered occlusion) match the sensor data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Union

import cv2
import numpy as np

from . import render
from .world import (
    ANNOTATION_RADIUS,
    ATTRIBUTES,
    CAMERAS,
    CATEGORIES,
    KEYFRAME_PERIOD_US,
    LIDAR,
    LIDAR_SWEEPS_PER_INTERVAL,
    MINI_SCENES,
    PROBE_CATEGORIES,
    PROBE_HEIGHT,
    RADAR_SWEEPS_PER_INTERVAL,
    RADARS,
    SCENE_LOCATIONS,
    SUN_DIRECTION,
    VISIBILITY,
    Scene,
    attribute_names,
    body_color,
    quaternion_wxyz,
    scene_rigs,
    shade,
    stable_hash,
    visibility_token,
    yaw_matrix,
)

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
    "main",
]

VERSION = "v1.0-mini"
MARKER = ".bevtrain_synthetic.json"  # written last: its presence means the set is complete
PARTIAL = ".bevtrain_synthetic.partial"  # present while a generation runs (or after it crashed)
JPEG_QUALITY = 90
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


def _params(keyframes, scenes, width, height, seed) -> dict:
    if int(keyframes) < 2:
        raise ValueError(f"keyframes={keyframes}: need at least 2 keyframes per scene")
    if int(width) < 32 or int(height) < 32:
        raise ValueError(f"width={width}, height={height}: images must be at least 32x32")
    return dict(
        keyframes=int(keyframes),
        scenes=resolve_scenes(scenes),
        width=int(width),
        height=int(height),
        seed=int(seed),
        format=FORMAT_VERSION,
    )


# ---------------------------------------------------------------------------------------------
# One scene, rendered in one worker
# ---------------------------------------------------------------------------------------------
_progress_queue = None


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue
    cv2.setNumThreads(1)


def _token(*parts) -> str:
    return stable_hash(*parts)


_CAMERA_CACHE: Dict[tuple, render.Camera] = {}


def _camera(channel: str, width: int, height: int, rig: dict) -> render.Camera:
    """Cameras are the same in every scene: build their ray tables once per process."""
    key = (channel, width, height)
    if key not in _CAMERA_CACHE:
        _CAMERA_CACHE[key] = render.Camera(rig["R"], rig["t"], rig["K"], width, height)
    return _CAMERA_CACHE[key]


def _ego_record(token, timestamp, ego) -> dict:
    return dict(
        token=token,
        timestamp=timestamp,
        rotation=quaternion_wxyz(yaw_matrix(ego.yaw)),
        translation=[ego.x, ego.y, 0.0],
    )


def _render_scene(job: dict) -> dict:
    out = Path(job["out"])
    name, seed, keyframes = job["scene"], job["seed"], job["keyframes"]
    width, height = job["width"], job["height"]
    scene = Scene(name, seed, keyframes)
    rigs = scene_rigs(width, height)
    cameras = {ch: _camera(ch, width, height, rigs[ch]) for ch in CAMERAS}
    scene_idx = MINI_SCENES.index(name)
    trng = np.random.default_rng(int(_token("time", seed, name)[:12], 16))
    t0_us = 1531883530_000000 + scene_idx * 86_400_000_000 + int(trng.integers(0, 3_600_000_000))
    day = 10 + scene_idx
    boston = SCENE_LOCATIONS[name].startswith("boston")
    vehicle, tz = ("n008", "-0400") if boston else ("n015", "+0800")
    logfile = f"{vehicle}-2018-07-{day:02d}-11-{scene_idx * 5:02d}-36{tz}"
    scene_token = _token("scene", seed, name)
    log_token = _token("log", seed, name)
    map_token = _token("map", seed, name)
    calib = {ch: _token("calibrated_sensor", seed, name, ch) for ch in rigs}
    tables: Dict[str, list] = {
        k: []
        for k in (
            "scene",
            "log",
            "map",
            "calibrated_sensor",
            "ego_pose",
            "sample",
            "sample_data",
            "instance",
            "sample_annotation",
        )
    }
    tables["log"].append(
        dict(
            token=log_token,
            logfile=logfile,
            vehicle=logfile[:4],
            date_captured=f"2018-07-{day:02d}",
            location=SCENE_LOCATIONS[name],
        )
    )
    (out / "maps").mkdir(parents=True, exist_ok=True)
    map_file = f"maps/{map_token}.png"
    cv2.imwrite(str(out / map_file), scene.map_mask())
    tables["map"].append(
        dict(token=map_token, log_tokens=[log_token], category="semantic_prior", filename=map_file)
    )
    for ch, rig in rigs.items():
        tables["calibrated_sensor"].append(
            dict(
                token=calib[ch],
                sensor_token=_token("sensor", ch),
                translation=[float(v) for v in rig["t"]],
                rotation=quaternion_wxyz(rig["R"]),
                camera_intrinsic=[] if rig["K"] is None else [[float(v) for v in row] for row in rig["K"]],
            )
        )
    for ch in rigs:
        (out / "samples" / ch).mkdir(parents=True, exist_ok=True)
        (out / "sweeps" / ch).mkdir(parents=True, exist_ok=True)

    sample_tokens = [_token("sample", seed, name, k) for k in range(keyframes)]
    per_channel: Dict[str, list] = {ch: [] for ch in rigs}  # sample_data records in time order
    tracks: Dict[int, list] = {}
    vis_hist = np.zeros(4, np.int64)
    rng_sensor = np.random.default_rng(int(_token("sensors", seed, name)[:12], 16))

    def add_sd(ch, ts_us, k_sample, is_key, ego, filename, fileformat, w=0, h=0):
        sd_token = _token("sample_data", seed, name, ch, ts_us)
        ep_token = _token("ego_pose", seed, name, ch, ts_us)
        tables["ego_pose"].append(_ego_record(ep_token, ts_us, ego))
        per_channel[ch].append(
            dict(
                token=sd_token,
                sample_token=sample_tokens[k_sample],
                ego_pose_token=ep_token,
                calibrated_sensor_token=calib[ch],
                timestamp=ts_us,
                fileformat=fileformat,
                is_key_frame=is_key,
                height=h,
                width=w,
                filename=filename,
                prev="",
                next="",
            )
        )

    def write_lidar(ego, objects, ts_us, k, is_key):
        pts = render.lidar_scan(scene, ego, objects, rigs[LIDAR], rng_sensor)
        folder = "samples" if is_key else "sweeps"
        fn = f"{folder}/{LIDAR}/{logfile}__{LIDAR}__{ts_us}.pcd.bin"
        pts.tofile(out / fn)
        add_sd(LIDAR, ts_us, k, is_key, ego, fn, "pcd")
        return pts

    def write_radar(ch, ego, objects, ts_us, k, is_key):
        pts = render.radar_scan(ego, objects, rigs[ch], rng_sensor)
        folder = "samples" if is_key else "sweeps"
        fn = f"{folder}/{ch}/{logfile}__{ch}__{ts_us}.pcd"
        render.write_radar_pcd(out / fn, pts)
        add_sd(ch, ts_us, k, is_key, ego, fn, "pcd")
        return pts

    for k in range(keyframes):
        t_k = k * KEYFRAME_PERIOD_US * 1e-6
        ts_k = t0_us + k * KEYFRAME_PERIOD_US
        # Sweeps between the previous keyframe and this one belong to this (the next) sample.
        sweeps = [
            (j / (LIDAR_SWEEPS_PER_INTERVAL + 1), "lidar") for j in range(LIDAR_SWEEPS_PER_INTERVAL, 0, -1)
        ]
        sweeps += [
            (j / (RADAR_SWEEPS_PER_INTERVAL + 1), "radar") for j in range(RADAR_SWEEPS_PER_INTERVAL, 0, -1)
        ]
        for frac, kind in sorted(sweeps, key=lambda x: -x[0]):
            dt_us = int(round(frac * KEYFRAME_PERIOD_US))
            ts = ts_k - dt_us
            t = t_k - dt_us * 1e-6
            ego = scene.ego_state(t)
            objects = render.place_objects(scene, t, ego, radius=render.LIDAR_RANGE + 30.0)
            if kind == "lidar":
                write_lidar(ego, objects, ts, k, False)
            else:
                for ch in RADARS:
                    write_radar(ch, ego, objects, ts + RADARS.index(ch), k, False)

        ego = scene.ego_state(t_k)
        objects = render.place_objects(scene, t_k, ego)
        unocc = np.zeros(len(objects), np.int64)
        vis = np.zeros(len(objects), np.int64)
        for ch in CAMERAS:
            img, u, v = cameras[ch].render(scene, ego, objects)
            unocc += u
            vis += v
            fn = f"samples/{ch}/{logfile}__{ch}__{ts_k}.jpg"
            ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {fn}")
            (out / fn).write_bytes(buf.tobytes())
            add_sd(ch, ts_k, k, True, ego, fn, "jpg", width, height)
        lidar_pts = write_lidar(ego, objects, ts_k, k, True)
        lidar_ego = lidar_pts[:, :3].astype(np.float64) @ rigs[LIDAR]["R"].T + rigs[LIDAR]["t"]
        radar_ego = []
        for ch in RADARS:
            rp = write_radar(ch, ego, objects, ts_k, k, True)
            xyz = np.stack([rp["x"], rp["y"], rp["z"]], 1).astype(np.float64)
            radar_ego.append(xyz @ rigs[ch]["R"].T + rigs[ch]["t"])
        n_lidar = render.points_in_box_counts(lidar_ego, objects, 0.05)
        n_radar = render.points_in_box_counts(np.concatenate(radar_ego), objects, 0.3)

        tables["sample"].append(
            dict(
                token=sample_tokens[k],
                timestamp=ts_k,
                prev=sample_tokens[k - 1] if k > 0 else "",
                next=sample_tokens[k + 1] if k + 1 < keyframes else "",
                scene_token=scene_token,
            )
        )
        for i, ob in enumerate(objects):
            st = ob.state
            if math.hypot(st.x - ego.x, st.y - ego.y) > ANNOTATION_RADIUS:
                continue
            w, l, h = ob.actor.wlh
            vtok = visibility_token(vis[i] / unocc[i]) if unocc[i] > 0 else "1"
            vis_hist[int(vtok) - 1] += 1
            ann = dict(
                token=_token("sample_annotation", seed, name, ob.actor.aid, k),
                sample_token=sample_tokens[k],
                instance_token=ob.actor.instance_token,
                visibility_token=vtok,
                attribute_tokens=[ATTRIBUTES[a][0] for a in attribute_names(ob.actor, st)],
                translation=[st.x, st.y, h / 2],
                size=[w, l, h],
                rotation=quaternion_wxyz(yaw_matrix(st.yaw)),
                prev="",
                next="",
                num_lidar_pts=int(n_lidar[i]),
                num_radar_pts=int(n_radar[i]),
            )
            tracks.setdefault(ob.actor.aid, []).append(ann)
        if _progress_queue is not None:
            _progress_queue.put(1)

    for records in per_channel.values():
        records.sort(key=lambda r: r["timestamp"])
        for a, b in zip(records[:-1], records[1:]):
            a["next"], b["prev"] = b["token"], a["token"]
        tables["sample_data"].extend(records)
    for aid in sorted(tracks):
        anns = tracks[aid]
        for a, b in zip(anns[:-1], anns[1:]):
            a["next"], b["prev"] = b["token"], a["token"]
        actor = scene.actors[aid]
        tables["instance"].append(
            dict(
                token=actor.instance_token,
                category_token=CATEGORIES[actor.category],
                nbr_annotations=len(anns),
                first_annotation_token=anns[0]["token"],
                last_annotation_token=anns[-1]["token"],
            )
        )
        tables["sample_annotation"].extend(anns)
    tables["scene"].append(
        dict(
            token=scene_token,
            log_token=log_token,
            nbr_samples=keyframes,
            first_sample_token=sample_tokens[0],
            last_sample_token=sample_tokens[-1],
            name=name,
            description=scene.describe(),
        )
    )
    return dict(scene=name, tables=tables, visibility=vis_hist.tolist())


# ---------------------------------------------------------------------------------------------
# The whole dataroot
# ---------------------------------------------------------------------------------------------
def _static_tables() -> Dict[str, list]:
    channels = list(CAMERAS) + [LIDAR] + list(RADARS)
    modality = {**{c: "camera" for c in CAMERAS}, LIDAR: "lidar", **{r: "radar" for r in RADARS}}
    return dict(
        category=[
            dict(token=tok, name=n, description=f"nuScenes category {n}") for n, tok in CATEGORIES.items()
        ],
        attribute=[dict(token=tok, name=n, description=d) for n, (tok, d) in ATTRIBUTES.items()],
        visibility=[dict(token=t, level=lvl, description=d) for t, lvl, d in VISIBILITY],
        sensor=[dict(token=_token("sensor", c), channel=c, modality=modality[c]) for c in channels],
    )


class _Progress:
    """A one-line progress bar on stderr (no tqdm dependency).

    On a terminal the line redraws in place; in a log file (not a tty) a full line is written every
    10 % instead, so logs stay readable.
    """

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.time()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = self.done / max(1, self.total)
        decile = int(10 * frac)
        if not self.tty and decile == self.last_decile:
            return
        self.last_decile = decile
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        elapsed = time.time() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        start, end = ("\r", "") if self.tty else ("", "\n")
        sys.stderr.write(
            f"{start}synthetic nuScenes [{bar}] {self.done}/{self.total} keyframes "
            f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left{end}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


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
) -> Path:
    """Write a synthetic v1.0-mini dataroot into `out_dir` (tables, samples/, sweeps/, maps/).

    The marker file is written last, so its presence means the set is complete.
    """
    params = _params(keyframes, scenes, width, height, seed)
    out = Path(out_dir)
    _prepare_out_dir(out)
    start = time.time()
    jobs = [
        dict(
            out=str(out),
            scene=s,
            seed=params["seed"],
            keyframes=params["keyframes"],
            width=params["width"],
            height=params["height"],
        )
        for s in params["scenes"]
    ]
    n_workers = min(len(jobs), workers if workers else (os.cpu_count() or 1))
    bar = _Progress(len(jobs) * params["keyframes"], progress)
    results = []
    if n_workers <= 1:
        for job in jobs:
            results.append(_render_scene(job))
            bar.update(params["keyframes"])
    else:
        ctx = mp.get_context("spawn")  # safe even when the parent holds threads (torch, pytest)
        queue = ctx.Queue()
        with ctx.Pool(n_workers, initializer=_init_worker, initargs=(queue,)) as pool:
            pending = pool.map_async(_render_scene, jobs, chunksize=1)
            while not pending.ready():
                pending.wait(0.2)
                while not queue.empty():
                    bar.update(queue.get())
            results = pending.get()
            while not queue.empty():
                bar.update(queue.get())
    bar.close()

    tables = _static_tables()
    for key in (
        "scene",
        "log",
        "map",
        "calibrated_sensor",
        "ego_pose",
        "sample",
        "sample_data",
        "instance",
        "sample_annotation",
    ):
        tables[key] = [r for res in results for r in res["tables"][key]]
    table_dir = out / VERSION
    table_dir.mkdir(exist_ok=True)
    for key, rows in tables.items():
        with open(table_dir / f"{key}.json", "w") as f:
            json.dump(rows, f, indent=0)
    vis = np.sum([res["visibility"] for res in results], axis=0)
    stats = dict(
        seconds=round(time.time() - start, 1),
        samples=len(tables["sample"]),
        annotations=len(tables["sample_annotation"]),
        instances=len(tables["instance"]),
        visibility_share={str(i + 1): round(float(v) / max(1, vis.sum()), 3) for i, v in enumerate(vis)},
    )
    stats["bytes"] = _dir_size(out)
    with open(out / MARKER, "w") as f:
        json.dump(dict(params=params, generator=generator_hash(), stats=stats), f, indent=1)
    (out / PARTIAL).unlink(missing_ok=True)
    if progress:
        shares = " ".join(f"v{k}:{100 * v:.0f}%" for k, v in stats["visibility_share"].items())
        sys.stderr.write(
            f"synthetic nuScenes: {out} in {stats['seconds']:.1f}s, {stats['bytes'] / 2**20:.0f} MiB, "
            f"{stats['samples']} samples, {stats['annotations']} annotations, visibility {shares}\n"
        )
    return out


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
) -> Path:
    """Return `out_dir`, generating the set first unless a complete one with the same parameters and the
    same generator code is already there. Generation goes to a temporary sibling that replaces
    `out_dir` only when finished, so an interrupted run never leaves a half set behind."""
    params = _params(keyframes, scenes, width, height, seed)
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
        )
        if out.exists():
            trash = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
            out.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(out)
    return out


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bevtrain.data.synthetic", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--out", required=True, help="dataroot to write (v1.0-mini/, samples/, sweeps/, maps/)")
    ap.add_argument("--keyframes", type=int, default=40, help="keyframes per scene (2 Hz)")
    ap.add_argument(
        "--scenes", type=int, default=None, help="first N of the ten v1.0-mini scenes (default all)"
    )
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    args = ap.parse_args(None if argv is None else list(argv))
    generate(
        args.out,
        keyframes=args.keyframes,
        scenes=args.scenes,
        width=args.width,
        height=args.height,
        seed=args.seed,
        workers=args.workers,
    )
