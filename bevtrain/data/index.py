"""Compact, cached per-sample records built once from a nuScenes dataroot.

This is the only module that imports nuscenes-devkit, and only inside ``build_records``: the
dataset and its loader workers read plain numpy/pickle records and never hold a ``NuScenes``
object (for trainval that object costs GBs per worker).

Record layout (one dict per keyframe sample; all matrices float64, metres, ``dst_T_src``)::

    token, scene_name, location (the log's map location), timestamp (us)
    global_T_ego_lidar  (4,4)   ego pose at the LIDAR_TOP keyframe (the sample's ego)
    cams[name] = dict(path, width, height, timestamp,
                      pix_T_cam (4,4), ego_T_cam (4,4), global_T_ego (4,4) at the image's timestamp)
                 for every camera channel of the dataroot (``camera_channels``; each its own size)
    sweeps[chan] = dict(paths [str], global_T_sensor (k,4,4), global_T_ego (k,4,4) (ego pose at the
                   sweep's timestamp), timestamps (k,))   newest first, k <= nsweeps, following
                   ``prev`` (chan = LIDAR_TOP and the five radars)
    boxes = dict(center (N,3) global, wlh (N,3), rotation (N,4) quaternion wxyz global,
                 category [str], instance [str], visibility (N,) int)

Checks at build time (once; the result is cached with the records): every camera intrinsic must be
finite with fx, fy > 0, every sensor extrinsic, ego pose and box finite with a unit quaternion. A
record that uses a bad one keeps NaN matrices in its place and lists the problem under
``info['problems']`` (sample position -> [dict(needed_for, channel, table, token, reason)];
``needed_for`` is 'always' for cameras, the LIDAR_TOP keyframe's ego pose and boxes, 'lidar' or
'radar' for sweeps), so the dataset can stop or skip it. A table that is not valid JSON is a
``DataTableError`` naming the file.

Cameras: the channels whose ``sensor`` row has modality 'camera', in a fixed order: nuScenes' six in
``CAMERA_NAMES`` order first, then any other channel by name (``camera_channels``); ``info['cameras']``
lists them. A sample without one of them lists that under its problems.

Paths are relative to the dataroot. Records are stored pickled back to back in one numpy byte
buffer (``PackedRecords``) so that forked workers do not touch (and copy) millions of Python
objects through reference counting.

Splits: ``dset='trainval'`` -> v1.0-trainval, splits train/val; ``dset='mini'`` -> v1.0-mini,
splits mini_train/mini_val (``split='train'/'val'`` map onto them). ``dset`` may also be a path to
a custom split file:

- YAML (``.yaml``/``.yml``): ``{version: v1.0-mini, train: [scene-0061, ...], val: [...]}``
  (any split names; ``version`` optional, default: v1.0-trainval if present, else v1.0-mini);
- text (any other suffix): one ``<split> <scene-name>`` pair per line, ``#`` starts a comment,
  and an optional line ``version <version-folder>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import math
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from bevtrain.classes import MAP_LINE_LAYERS, MAP_POLYGON_LAYERS
from bevtrain.progress import Progress

INDEX_FORMAT = 6  # 2: sweeps carry global_T_ego; 3: calibration / pose / box checks (info["problems"]);
#                  4: records carry their location; 5: any camera rig (info["cameras"]);
#                  6: boxes with a side <= 0 are problems
CAMERA_NAMES = [
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
]
LIDAR_NAME = "LIDAR_TOP"


def order_cameras(channels) -> List[str]:
    """A rig's camera channels in bevtrain's order: nuScenes' six in CAMERA_NAMES order (so that
    nuScenes keeps its camera indices), then the others sorted by name (stable whatever order the
    sensor table lists them in)."""
    channels = set(channels)
    return [c for c in CAMERA_NAMES if c in channels] + sorted(channels - set(CAMERA_NAMES))


def camera_channels(nusc) -> List[str]:
    """The dataroot's camera channels (sensor table, modality 'camera'), in ``order_cameras`` order."""
    return order_cameras(s["channel"] for s in nusc.sensor if s.get("modality") == "camera")
RADAR_NAMES = ["RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT"]
SWEEP_CHANNELS = [LIDAR_NAME] + RADAR_NAMES

_DSET_VERSIONS = {"trainval": "v1.0-trainval", "mini": "v1.0-mini"}
_SPLIT_ALIASES = {
    "v1.0-trainval": {"train": "train", "val": "val"},
    "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
}

# Incremented every time the devkit tables are loaded; tests use it to prove a cache hit.
DEVKIT_LOADS = 0
PROGRESS_MIN_SAMPLES = 2000


class DataLayoutError(FileNotFoundError):
    """The dataroot does not look like a nuScenes dataroot."""


class DataTableError(ValueError):
    """A nuScenes table file cannot be read (not valid JSON)."""


# -- splits ----------------------------------------------------------------------------------------
def _read_split_file(path: Path) -> Tuple[str | None, Dict[str, List[str]]]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"split file {path}: expected a mapping split -> [scene names]")
        version = data.pop("version", None)
        splits = {str(k): [str(s) for s in v] for k, v in data.items()}
        return version, splits
    version, splits = None, {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"split file {path}:{lineno}: expected '<split> <scene-name>', got {line!r}")
        if parts[0] == "version":
            version = parts[1]
        else:
            splits.setdefault(parts[0], []).append(parts[1])
    return version, splits


def official_split_scenes(split_name: str) -> List[str]:
    from nuscenes.utils.splits import create_splits_scenes  # a plain list; no tables loaded

    return list(create_splits_scenes()[split_name])


def resolve_split(dataroot, dset: str, split: str) -> Tuple[str, str, List[str] | None]:
    """(version folder, split name, scene names) for a ``dset``/``split`` pair.

    Scene names are None for official splits (looked up from the devkit only when building, so a
    cache hit imports nothing from the devkit).
    """
    from_file = dset not in _DSET_VERSIONS and (os.sep in str(dset) or Path(dset).suffix != "")
    if dset in _DSET_VERSIONS:
        version = _DSET_VERSIONS[dset]
        split_name = _SPLIT_ALIASES[version].get(split, split)
        valid = sorted(set(_SPLIT_ALIASES[version]) | set(_SPLIT_ALIASES[version].values()))
        if split_name not in _SPLIT_ALIASES[version].values():
            raise ValueError(f"unknown split {split!r} for dset={dset!r}; use one of {valid}")
        return version, split_name, None
    if from_file:
        path = Path(dset)
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} (dset={dset!r}) does not exist")
        version, splits = _read_split_file(path)
        if split not in splits:
            raise ValueError(f"split {split!r} not in split file {path}; it has {sorted(splits)}")
        if version is None:
            root = Path(dataroot)
            version = "v1.0-trainval" if (root / "v1.0-trainval").is_dir() else "v1.0-mini"
        return version, split, splits[split]
    raise ValueError(f"unknown dset {dset!r}: use 'trainval', 'mini' or a path to a split file (.yaml/.txt)")


def check_dataroot(dataroot, version: str) -> Path:
    """Resolved dataroot; a clear error when the version folder is missing."""
    root = Path(dataroot).expanduser()
    layout = (
        "Expected a nuScenes dataroot such as data/nuscenes/ holding v1.0-trainval/ (or v1.0-mini/) "
        "with samples/ and sweeps/ beside it, or the synthetic set made by "
        "`python -m bevtrain.synthetic --out DIR` (pass that DIR as data_dir)."
    )
    if not root.is_dir():
        raise DataLayoutError(f"data_dir {root} does not exist. {layout}")
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.iterdir())[:20]
        raise DataLayoutError(f"{root} has no {version}/ folder (found: {found}). {layout}")
    return root.resolve()


# -- packed records --------------------------------------------------------------------------------
class PackedRecords:
    """A read-only list of records, pickled into one byte buffer (cheap to fork and to pickle)."""

    def __init__(self, records: Sequence[dict] = (), *, offsets=None, data=None):
        if offsets is None:
            blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
            offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(b) for b in blobs])
            data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.offsets = offsets
        self.data = data

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return pickle.loads(self.data[self.offsets[i] : self.offsets[i + 1]].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)


# -- building --------------------------------------------------------------------------------------
def _pose_matrix(translation, rotation_wxyz) -> np.ndarray:
    from pyquaternion import Quaternion

    m = np.eye(4)
    m[:3, :3] = Quaternion(rotation_wxyz).rotation_matrix
    m[:3, 3] = translation
    return m


NAN_POSE = np.full((4, 4), np.nan)
QUATERNION_TOLERANCE = 1e-2  # nuScenes stores unit quaternions (|q| = 1 to ~1e-7)


def _as_floats(value, n: int) -> np.ndarray | None:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) else None


def pose_problem(translation, rotation_wxyz) -> str | None:
    """Why a (translation, wxyz quaternion) pair is not a usable rigid transform, or None."""
    t, q = _as_floats(translation, 3), _as_floats(rotation_wxyz, 4)
    if t is None or not np.isfinite(t).all():
        return f"translation {translation!r} is not 3 finite numbers"
    if q is None or not np.isfinite(q).all():
        return f"rotation {rotation_wxyz!r} is not 4 finite numbers"
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > QUATERNION_TOLERANCE:
        return f"rotation {rotation_wxyz!r} is not a unit quaternion (norm {norm:.4g})"
    return None


def intrinsic_problem(camera_intrinsic) -> str | None:
    """Why a 3x3 camera_intrinsic is not usable (fx, fy finite and > 0, cx, cy finite), or None."""
    try:
        k = np.asarray(camera_intrinsic, dtype=np.float64)
    except (TypeError, ValueError):
        k = None
    if k is None or k.shape != (3, 3):
        return f"camera_intrinsic {camera_intrinsic!r} is not a 3x3 matrix"
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    if not (math.isfinite(fx) and fx > 0 and math.isfinite(fy) and fy > 0):
        return f"camera_intrinsic has fx={fx}, fy={fy} (both must be finite and > 0)"
    if not np.isfinite(k).all():
        return f"camera_intrinsic has a non-finite entry (cx={cx}, cy={cy}): {k.tolist()}"
    return None


def box_problem(ann) -> str | None:
    """Why a sample_annotation's box is not usable, or None."""
    bad = pose_problem(ann["translation"], ann["rotation"])
    if bad:
        return bad
    size = _as_floats(ann["size"], 3)
    if size is None or not np.isfinite(size).all():
        return f"size {ann['size']!r} is not 3 finite numbers"
    if (size <= 0).any():  # drawn, such a box silently changes target cells
        return f"size {ann['size']!r} (w, l, h) has a side <= 0"
    return None


# The order in which nuscenes-devkit loads the tables.
TABLE_NAMES = ["category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
               "log", "scene", "sample", "sample_data", "sample_annotation", "map"]


def find_bad_tables(table_dir: Path) -> List[Tuple[Path, str]]:
    """(path, reason) of every table file in ``table_dir`` that is not valid JSON."""
    bad = []
    known = [table_dir / f"{n}.json" for n in TABLE_NAMES]
    others = sorted(p for p in table_dir.glob("*.json") if p not in known)
    for path in [p for p in known if p.is_file()] + others:
        try:
            with open(path) as f:
                json.load(f)
        except json.JSONDecodeError as e:
            size = path.stat().st_size
            bad.append((path, f"{e.msg} at line {e.lineno} column {e.colno} (char {e.pos} of {size})"))
        except (OSError, UnicodeDecodeError) as e:
            bad.append((path, str(e)))
    return bad


def load_devkit(dataroot: Path, version: str, verbose: bool = False):
    """``NuScenes(version, dataroot)``; a table that is not valid JSON is a DataTableError naming it."""
    from nuscenes.nuscenes import NuScenes

    try:
        return NuScenes(version=version, dataroot=str(dataroot), verbose=verbose)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        bad = find_bad_tables(Path(dataroot) / version) or [(Path(dataroot) / version, str(e))]
        listing = "; ".join(f"{path}: {why}" for path, why in bad)
        raise DataTableError(
            f"nuScenes table not valid JSON (cut short or corrupted?): {listing}. Extract the "
            f"{version} tables again (the metadata archive) into {dataroot}"
        ) from None


class _Tables:
    """The devkit's tables with each ego pose and calibration converted (and checked) once."""

    def __init__(self, nusc):
        self.nusc = nusc
        self._poses: Dict[str, Tuple[np.ndarray, str | None]] = {}
        self._calibs: Dict[str, dict] = {}

    def get(self, table: str, token: str) -> dict:
        return self.nusc.get(table, token)

    def ego_pose(self, token: str) -> Tuple[np.ndarray, str | None]:
        """(global_T_ego, problem or None); NaN matrix when there is a problem."""
        if token not in self._poses:
            rec = self.nusc.get("ego_pose", token)
            bad = pose_problem(rec["translation"], rec["rotation"])
            self._poses[token] = (NAN_POSE if bad else _pose_matrix(rec["translation"], rec["rotation"]), bad)
        return self._poses[token]

    def calib(self, token: str) -> dict:
        """{ego_T_sensor, problem[, pix_T_cam for cameras]}; NaN matrices where there is a problem."""
        if token not in self._calibs:
            rec = self.nusc.get("calibrated_sensor", token)
            bad = pose_problem(rec["translation"], rec["rotation"])
            entry = {"ego_T_sensor": NAN_POSE if bad else _pose_matrix(rec["translation"], rec["rotation"]),
                     "problem": bad}
            if rec.get("camera_intrinsic"):
                bad_k = intrinsic_problem(rec["camera_intrinsic"])
                pix = np.eye(4)
                pix[:3, :3] = np.nan if bad_k else np.asarray(rec["camera_intrinsic"], dtype=np.float64)
                entry["pix_T_cam"] = pix
                entry["problem"] = "; ".join(p for p in (bad, bad_k) if p) or None
            self._calibs[token] = entry
        return self._calibs[token]


class _Problems(list):
    """One sample's problems, in the order they are found (see the module docstring)."""

    def note(self, bad: str | None, needed_for: str, channel: str, table: str, token: str) -> None:
        if bad:
            self.append(dict(needed_for=needed_for, channel=channel, table=table, token=token, reason=bad))


def _camera_entry(tables: _Tables, sd_token: str, cam: str, problems: _Problems) -> dict:
    sd = tables.get("sample_data", sd_token)
    calib_token = sd["calibrated_sensor_token"]
    c = tables.calib(calib_token)
    problems.note(c["problem"], "always", cam, "calibrated_sensor", calib_token)
    if "pix_T_cam" not in c:
        problems.note("no camera_intrinsic", "always", cam, "calibrated_sensor", calib_token)
    global_T_ego, bad = tables.ego_pose(sd["ego_pose_token"])
    problems.note(bad, "always", cam, "ego_pose", sd["ego_pose_token"])
    return {
        "path": sd["filename"],
        "width": int(sd["width"]),
        "height": int(sd["height"]),
        "timestamp": int(sd["timestamp"]),
        "pix_T_cam": c.get("pix_T_cam", NAN_POSE),
        "ego_T_cam": c["ego_T_sensor"],
        "global_T_ego": global_T_ego,
    }


def _sweep_entry(tables: _Tables, sd_token: str, chan: str, nsweeps: int, problems: _Problems) -> dict:
    """The keyframe's sweep and up to nsweeps - 1 earlier ones, newest first, following ``prev``."""
    needed_for = "lidar" if chan == LIDAR_NAME else "radar"
    paths, mats, egos, stamps = [], [], [], []
    sd = tables.get("sample_data", sd_token)
    for _ in range(max(1, nsweeps)):
        c = tables.calib(sd["calibrated_sensor_token"])
        problems.note(c["problem"], needed_for, chan, "calibrated_sensor", sd["calibrated_sensor_token"])
        global_T_ego, bad = tables.ego_pose(sd["ego_pose_token"])
        problems.note(bad, needed_for, chan, "ego_pose", sd["ego_pose_token"])
        paths.append(sd["filename"])
        egos.append(global_T_ego)
        mats.append(global_T_ego @ c["ego_T_sensor"])
        stamps.append(int(sd["timestamp"]))
        if sd["prev"] == "":
            break
        sd = tables.get("sample_data", sd["prev"])
    return {
        "paths": paths,
        "global_T_sensor": np.stack(mats),
        "global_T_ego": np.stack(egos),
        "timestamps": np.asarray(stamps, dtype=np.int64),
    }


def _boxes_entry(tables: _Tables, ann_tokens: Sequence[str], problems: _Problems) -> dict:
    anns = [tables.get("sample_annotation", t) for t in ann_tokens]
    for a in anns:
        problems.note(box_problem(a), "always", "boxes", "sample_annotation", a["token"])
    return {
        "center": np.asarray([a["translation"] for a in anns], dtype=np.float64).reshape(-1, 3),
        "wlh": np.asarray([a["size"] for a in anns], dtype=np.float64).reshape(-1, 3),
        "rotation": np.asarray([a["rotation"] for a in anns], dtype=np.float64).reshape(-1, 4),
        "category": [a["category_name"] for a in anns],
        "instance": [a["instance_token"] for a in anns],
        "visibility": np.asarray([int(a["visibility_token"] or 0) for a in anns], dtype=np.int64),
    }


def _sample_record(tables: _Tables, sample: dict, scene_name: str, nsweeps: int,
                   cameras: Sequence[str]) -> Tuple[dict, _Problems]:
    """One keyframe's record (layout in the module docstring) and its problems."""
    data = sample["data"]
    scene = tables.get("scene", sample["scene_token"])
    problems = _Problems()
    lidar_sd = tables.get("sample_data", data[LIDAR_NAME])
    global_T_ego_lidar, bad = tables.ego_pose(lidar_sd["ego_pose_token"])
    problems.note(bad, "always", LIDAR_NAME, "ego_pose", lidar_sd["ego_pose_token"])
    rec = {
        "token": sample["token"],
        "scene_name": scene_name,
        "location": tables.get("log", scene["log_token"])["location"],
        "timestamp": int(sample["timestamp"]),
        "global_T_ego_lidar": global_T_ego_lidar,
        "cams": {cam: _camera_entry(tables, data[cam], cam, problems) for cam in cameras if cam in data},
        "sweeps": {chan: _sweep_entry(tables, data[chan], chan, nsweeps, problems)
                   for chan in SWEEP_CHANNELS if chan in data},
    }
    for cam in cameras:
        if cam not in data:
            problems.note(f"no {cam} image in this sample (the sensor table has that camera)", "always", cam,
                          "sample", sample["token"])
    rec["boxes"] = _boxes_entry(tables, sample["anns"], problems)
    return rec, problems


def _check_scenes_present(nusc, scenes: Sequence[str], dataroot: Path, version: str) -> None:
    wanted = set(scenes)
    have = {s["name"] for s in nusc.scene}
    if not wanted & have:
        raise ValueError(
            f"none of the {len(wanted)} scenes of this split (e.g. {sorted(wanted)[:3]}) are in "
            f"{dataroot}/{version} (it has {sorted(have)[:5]}...)"
        )


def build_records(
    dataroot: Path, version: str, scenes: Sequence[str], nsweeps: int, verbose=False, nusc=None
):
    """Load the devkit tables once (or use ``nusc``); return the split's records (sorted by scene, time),
    their problems (position in that order -> list of problem dicts, see the module docstring) and the
    camera channels (``camera_channels``)."""
    global DEVKIT_LOADS
    if nusc is None:
        nusc = load_devkit(dataroot, version, verbose)
        DEVKIT_LOADS += 1
    _check_scenes_present(nusc, scenes, dataroot, version)
    wanted = set(scenes)
    tables = _Tables(nusc)
    cameras = camera_channels(nusc)
    if not cameras:
        raise DataLayoutError(f"{dataroot}/{version}/sensor.json has no sensor with modality 'camera': "
                              f"bevtrain needs at least one camera")
    records, problems = [], []
    scene_of = {s["token"]: s["name"] for s in nusc.scene}
    chosen = [s for s in nusc.sample if scene_of[s["scene_token"]] in wanted]
    # A bar where the pass takes minutes (trainval: ~28k samples, 1-2 min), not for a mini set's second.
    bar = Progress(len(chosen), verbose and len(chosen) >= PROGRESS_MIN_SAMPLES, label="index records",
                   unit="samples")
    for sample in chosen:
        rec, issues = _sample_record(tables, sample, scene_of[sample["scene_token"]], nsweeps, cameras)
        records.append(rec)
        problems.append(list(issues))
        bar.advance()
    bar.close()
    order = sorted(range(len(records)), key=lambda i: (records[i]["scene_name"], records[i]["timestamp"]))
    return ([records[i] for i in order], {k: problems[i] for k, i in enumerate(order) if problems[i]},
            cameras)


# -- cache -----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get("BEVTRAIN_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/bevtrain/index").expanduser()


def cache_key(dataroot: Path, version: str, split: str, scenes: Sequence[str] | None, nsweeps: int) -> str:
    version_dir = dataroot / version
    stamp = version_dir.stat().st_mtime_ns
    # Table files are rewritten in place by some tools; include their mtimes too.
    tables = sorted((p.name, p.stat().st_mtime_ns) for p in version_dir.glob("*.json"))
    scene_list = sorted(scenes or [])
    payload = repr((INDEX_FORMAT, str(dataroot), stamp, tables, version, split, scene_list, nsweeps))
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def _split_cache(root: Path, dset: str, split: str, nsweeps: int, cdir: Path):
    """(version, split name, scenes or None, cache path) of one split."""
    version, split_name, scenes = resolve_split(root, dset, split)
    key = cache_key(root, version, split_name, scenes, nsweeps)
    return version, split_name, scenes, cdir / f"{version}_{split_name}_{key}.pkl"


def _read_cache(path: Path):
    """(PackedRecords, blob) from a cache file of this format, or None (missing, unreadable, older)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
        if blob.get("format") == INDEX_FORMAT:
            return PackedRecords(offsets=blob["offsets"], data=blob["data"]), blob
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError):
        pass  # unreadable cache: rebuilt and overwritten
    return None


def _write_cache(path: Path, records: Sequence[dict], problems: dict, cameras: Sequence[str],
                 nsweeps: int) -> int:
    packed = PackedRecords(records)
    blob = {"format": INDEX_FORMAT, "nsweeps": nsweeps, "offsets": packed.offsets, "data": packed.data,
            "problems": problems, "cameras": list(cameras)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_index_")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return packed.nbytes


@contextlib.contextmanager
def _build_lock(cdir: Path, root: Path, version: str, verbose: bool):
    """One builder per dataroot and cache folder on this machine (a lock on a file in the cache folder;
    released by the kernel if its holder dies); the others wait here, then read what it wrote."""
    cdir.mkdir(parents=True, exist_ok=True)
    lock_path = cdir / f".build_{version}_{hashlib.sha1(str(root).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if verbose:
                print(f"[bevtrain] waiting for {holder} to finish building the {version} index of {root} "
                      f"(cache {cdir}); it is read from there next", flush=True)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            if verbose:
                print(f"[bevtrain] waited {time.perf_counter() - t0:.1f}s for the index build", flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_splits(root: Path, version: str, todo: Sequence[tuple], nsweeps: int, verbose: bool) -> dict:
    """Build each (split name, scenes, cache path) of ``todo`` from one devkit load and write its cache.
    Python's collector is paused meanwhile: the tables are millions of objects and every full collection
    walks them all, for nothing (they hold no garbage cycles until the devkit object is dropped)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        if verbose:
            print(f"[bevtrain] index: loading the {version} tables of {root}", flush=True)
        nusc = load_devkit(root, version, verbose=False)
        if verbose:
            print(f"[bevtrain] index: tables loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        out = {}
        for split_name, scenes, path in todo:
            t1 = time.perf_counter()
            if scenes is None:
                scenes = official_split_scenes(split_name)
            records, problems, cameras = build_records(root, version, scenes, nsweeps, verbose, nusc=nusc)
            nbytes = _write_cache(path, records, problems, cameras, nsweeps)
            out[split_name] = (len(records), nbytes, time.perf_counter() - t1)
            if verbose:
                print(f"[bevtrain] index: {version}/{split_name}: {len(records)} samples in "
                      f"{time.perf_counter() - t1:.1f}s ({nbytes / 1e6:.1f} MB) -> {path}", flush=True)
        return {"splits": out, "devkit_loads": 1}
    finally:
        if was_enabled:
            gc.enable()


def _in_child(fn, *args):
    """``fn(*args)`` in a forked child process; its result or its exception comes back here.

    The devkit's tables for trainval take ~9 GB and reference themselves, so in this process they
    would stay resident until a full collection (and every loader worker forked meanwhile would hold
    them too). In a child they are gone when it exits: this process never grows."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_fd)
        code = 0
        try:
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            code = 1
            try:
                payload = pickle.dumps(("error", e))
            except Exception:
                payload = pickle.dumps(("error", RuntimeError(f"{type(e).__name__}: {e}")))
        try:
            with os.fdopen(write_fd, "wb") as w:
                w.write(payload)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        payload = r.read()
    _, status = os.waitpid(pid, 0)
    if payload:
        kind, value = pickle.loads(payload)
        if kind == "error":
            raise value
        return value
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
    hint = " (signal 9 is usually the out-of-memory killer: the trainval tables need ~10 GB)" if (
        os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9) else ""
    raise RuntimeError(f"the index build (process {pid}) died with {how}{hint}; nothing was cached: "
                       "run again")


def prepare_indexes(dataroot, dset: str, splits: Sequence[str], nsweeps: int = 3, cache_dir=None,
                    verbose: bool = True) -> List[bool]:
    """Make sure every split's cache exists, building the missing ones together (one table load, in a
    child process, under the build lock). Returns, per split, whether its cache was there already."""
    root_guess = Path(dataroot).expanduser()
    version = resolve_split(root_guess, dset, splits[0])[0]
    root = check_dataroot(root_guess, version)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    wanted = [_split_cache(root, dset, split, nsweeps, cdir) for split in splits]
    # The file name holds the cache key (format, tables, split, sweeps) and files appear by rename, so
    # one that exists is complete; load_index removes one that cannot be read.
    present = [path.is_file() for *_, path in wanted]
    if all(present):
        return present
    global DEVKIT_LOADS
    with _build_lock(cdir, root, version, verbose):
        todo = [(name, scenes, path) for v, name, scenes, path in wanted if not path.is_file()]
        if todo:
            if verbose:
                names = ", ".join(f"{version}/{name}" for name, _, _ in todo)
                print(f"[bevtrain] building the {names} index from {root} (once; cached in {cdir})",
                      flush=True)
            done = _in_child(_build_splits, root, version, todo, nsweeps, verbose)
            DEVKIT_LOADS += done["devkit_loads"]
    return present


def load_index(
    dataroot,
    dset: str = "mini",
    split: str = "train",
    nsweeps: int = 3,
    cache_dir=None,
    verbose: bool = True,
) -> Tuple[PackedRecords, dict]:
    """Packed records of a split, from the on-disk cache, built first when missing (prepare_indexes).
    Returns (records, info)."""
    root_guess = Path(dataroot).expanduser()
    version, split_name, scenes = resolve_split(root_guess, dset, split)
    root = check_dataroot(root_guess, version)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _split_cache(root, dset, split, nsweeps, cdir)[3]
    info = {"version": version, "split": split_name, "cache_path": str(path), "dataroot": str(root)}
    t0 = time.perf_counter()
    hit = _read_cache(path)
    built = False
    if hit is None:
        path.unlink(missing_ok=True)  # unreadable (e.g. written by another Python): rebuilt
        built = not prepare_indexes(root, dset, [split], nsweeps, cdir, verbose)[0]
        hit = _read_cache(path)
        if hit is None:
            raise RuntimeError(f"the index cache {path} was not written (disk full or not writable?)")
    packed, blob = hit
    info.update(cache_hit=not built, seconds=time.perf_counter() - t0, nsweeps=blob["nsweeps"],
                problems=blob["problems"], cameras=blob["cameras"])
    return packed, info


# -- categories ------------------------------------------------------------------------------------
def category_names(dataroot, version: str) -> List[str]:
    """The category names of a dataroot's ``category`` table (a small file, read without the devkit)."""
    path = Path(dataroot) / version / "category.json"
    try:
        with open(path) as f:
            return sorted(str(c["name"]) for c in json.load(f))
    except json.JSONDecodeError as e:
        raise DataTableError(f"nuScenes table not valid JSON: {path}: {e.msg} at line {e.lineno}") from None


# -- map expansion ---------------------------------------------------------------------------------
# The nuScenes map expansion: one JSON per location under <dataroot>/maps/expansion/, read through the
# devkit's NuScenesMap once per location and kept as compact vector geometry (global x, y in metres)
# beside the index, so that loader workers rasterise map targets without the devkit.
MAP_EXPANSION_VERSION = "1.3"
MAP_EXPANSION_DOWNLOAD = "nuScenes-map-expansion-v1.3"
MAP_CACHE_FORMAT = 1
# The layers kept: every layer an output may draw from (bevtrain.classes).
MAP_LAYERS = MAP_POLYGON_LAYERS + MAP_LINE_LAYERS


class MapExpansionError(ValueError):
    """A map expansion file needed for map-layer outputs is missing, cut short or not a v1.3 file."""


def expansion_path(dataroot, location: str) -> Path:
    return Path(dataroot) / "maps" / "expansion" / f"{location}.json"


def _expansion_help(dataroot) -> str:
    return (f"Map layers need the nuScenes map expansion v{MAP_EXPANSION_VERSION}: download "
            f"'{MAP_EXPANSION_DOWNLOAD}' (nuscenes.org/nuscenes#download, 'Map expansion') and extract its "
            f"expansion/*.json into {Path(dataroot) / 'maps' / 'expansion'}/")


def expansion_problem(dataroot, location: str) -> str | None:
    """Why the expansion file of ``location`` cannot be used (without the devkit: existence, JSON, version
    and the layer tables), or None. Reads the whole file."""
    path = expansion_path(dataroot, location)
    if not path.is_file():
        return f"{path} does not exist (location '{location}')"
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return (f"{path} is not valid JSON (cut short or corrupted?): {e.msg} at line {e.lineno} column "
                f"{e.colno} of {path.stat().st_size} bytes")
    except (OSError, UnicodeDecodeError) as e:
        return f"{path} cannot be read: {e}"
    if not isinstance(data, dict):
        return f"{path} is not a map expansion file (a JSON object with the map's tables)"
    version = str(data.get("version", "1.0"))
    if version < MAP_EXPANSION_VERSION:
        return f"{path} is map expansion version {version}; version {MAP_EXPANSION_VERSION} is needed"
    missing = [k for k in ("node", "line", "polygon", "canvas_edge") + MAP_LAYERS if k not in data]
    if missing:
        return f"{path} has no {', '.join(missing)} table(s): not a complete v{MAP_EXPANSION_VERSION} file"
    return None


def _ring_xy(ring) -> np.ndarray:
    xy = np.asarray(ring.coords, dtype=np.float64)[:, :2]
    return xy[:-1] if len(xy) > 1 and np.array_equal(xy[0], xy[-1]) else xy  # shapely closes rings


def _pack(parts: List[List[np.ndarray]]) -> dict:
    """Shapes (each a list of point arrays: a polygon's exterior then holes, or one line) as flat arrays:
    xy float64 (V,2); ring_start (R+1,) into xy; shape_start (S+1,) into the rings; bbox (S,4) float64
    x0, y0, x1, y1."""
    rings = [r for shape in parts for r in shape]
    ring_start = np.zeros(len(rings) + 1, np.int64)
    ring_start[1:] = np.cumsum([len(r) for r in rings])
    shape_start = np.zeros(len(parts) + 1, np.int64)
    shape_start[1:] = np.cumsum([len(shape) for shape in parts])
    xy = np.concatenate(rings) if rings else np.zeros((0, 2))
    bbox = np.array([[*shape[0].min(axis=0), *shape[0].max(axis=0)] for shape in parts]).reshape(-1, 4)
    return {"xy": xy, "ring_start": ring_start, "shape_start": shape_start, "bbox": bbox}


def build_map_geometry(dataroot, location: str) -> dict:
    """Every layer of MAP_LAYERS of one location as the devkit's ``get_map_mask`` sees it (its polygons
    in layer order, drivable_area's several per record, invalid polygons of the other layers left out as
    the devkit leaves them out; lines without nodes left out), packed by ``_pack``, in global metres."""
    from nuscenes.map_expansion.map_api import NuScenesMap, locations

    path = expansion_path(dataroot, location)
    if location not in locations:
        raise MapExpansionError(f"location '{location}' (log table of {dataroot}) is not one of the devkit's "
                                f"map locations {locations}: NuScenesMap cannot read {path}")
    bad = expansion_problem(dataroot, location)
    if bad:
        raise MapExpansionError(f"{bad}. {_expansion_help(dataroot)}")
    nmap = NuScenesMap(dataroot=str(dataroot), map_name=location)
    layers = {}
    for layer in MAP_POLYGON_LAYERS:
        shapes = []
        for rec in getattr(nmap, layer):
            if layer == "drivable_area":
                polygons = [nmap.extract_polygon(t) for t in rec["polygon_tokens"]]
            else:
                polygons = [p for p in [nmap.extract_polygon(rec["polygon_token"])] if p.is_valid]
            for poly in polygons:
                if not poly.is_empty:
                    shapes.append([_ring_xy(poly.exterior)] + [_ring_xy(h) for h in poly.interiors])
        layers[layer] = _pack(shapes)
    for layer in MAP_LINE_LAYERS:
        shapes = []
        for rec in getattr(nmap, layer):
            line = nmap.extract_line(rec["line_token"])
            if not line.is_empty:
                shapes.append([np.asarray(line.coords, dtype=np.float64)[:, :2]])
        layers[layer] = _pack(shapes)
    return {"location": location, "version": nmap.version, "layers": layers}


def _map_cache_key(path: Path) -> str:
    st = path.stat()
    payload = repr((MAP_CACHE_FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns))
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def load_map_geometry(dataroot, locations: Sequence[str], cache_dir=None, verbose: bool = True
                      ) -> Dict[str, dict]:
    """{location: build_map_geometry(...)} from the on-disk cache (one file per location, rebuilt when its
    expansion file changes). A MapExpansionError lists every location whose file is missing or unusable,
    before anything is built."""
    root = Path(dataroot).expanduser()
    locations = sorted(set(locations))
    missing = [loc for loc in locations if not expansion_path(root, loc).is_file()]
    if missing:
        files = ", ".join(str(expansion_path(root, loc)) for loc in missing)
        raise MapExpansionError(f"map-layer outputs need the map expansion of location(s) {missing} that "
                                f"this split uses, but {files} do(es) not exist. {_expansion_help(root)}")
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = {}
    for loc in locations:
        path = cdir / f"map_{loc}_{_map_cache_key(expansion_path(root, loc))}.pkl"
        try:
            with open(path, "rb") as f:
                blob = pickle.load(f)
            if blob.get("format") == MAP_CACHE_FORMAT:
                out[loc] = blob["geometry"]
                continue
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError):
            pass  # no or unreadable cache: build it
        t0 = time.perf_counter()
        if verbose:
            print(f"[bevtrain] reading the map expansion of {loc} (once; cached in {cdir})")
        geometry = build_map_geometry(root, loc)
        cdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cdir, prefix=".tmp_map_")
        try:
            with os.fdopen(fd, "wb") as f:
                blob = {"format": MAP_CACHE_FORMAT, "geometry": geometry}
                pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if verbose:
            mb, seconds = path.stat().st_size / 1e6, time.perf_counter() - t0
            print(f"[bevtrain] map {loc}: {mb:.2f} MB in {seconds:.1f}s")
        out[loc] = geometry
    return out
