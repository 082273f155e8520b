"""Compact, cached per-sample records built once from a nuScenes dataroot.

This is the only module that imports nuscenes-devkit, and only inside ``build_records``: the
dataset and its loader workers read plain numpy/pickle records and never hold a ``NuScenes``
object (for trainval that object costs GBs per worker).

Record layout (one dict per keyframe sample; all matrices float64, metres, ``dst_T_src``)::

    token, scene_name, timestamp (us)
    global_T_ego_lidar  (4,4)   ego pose at the LIDAR_TOP keyframe (the sample's ego)
    cams[name] = dict(path, width, height, timestamp,
                      pix_T_cam (4,4), ego_T_cam (4,4), global_T_ego (4,4) at the image's timestamp)
    sweeps[chan] = dict(paths [str], global_T_sensor (k,4,4), global_T_ego (k,4,4) (ego pose at the
                   sweep's timestamp), timestamps (k,))   newest first, k <= nsweeps, following
                   ``prev`` (chan = LIDAR_TOP and the five radars)
    boxes = dict(center (N,3) global, wlh (N,3), rotation (N,4) quaternion wxyz global,
                 category [str], instance [str], visibility (N,) int)

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

import hashlib
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

INDEX_FORMAT = 2  # 2: sweeps carry global_T_ego
CAMERA_NAMES = [
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
]
LIDAR_NAME = "LIDAR_TOP"
RADAR_NAMES = ["RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT"]
SWEEP_CHANNELS = [LIDAR_NAME] + RADAR_NAMES

_DSET_VERSIONS = {"trainval": "v1.0-trainval", "mini": "v1.0-mini"}
_SPLIT_ALIASES = {
    "v1.0-trainval": {"train": "train", "val": "val"},
    "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
}

# Incremented every time the devkit tables are loaded; tests use it to prove a cache hit.
DEVKIT_LOADS = 0


class DataLayoutError(FileNotFoundError):
    """The dataroot does not look like a nuScenes dataroot."""


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
        "`python -m bevtrain.data.synthetic --out DIR` (pass that DIR as data_dir)."
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


def build_records(dataroot: Path, version: str, scenes: Sequence[str], nsweeps: int, verbose=False) -> list:
    """Load the devkit tables once and return the split's records (sorted by scene, time)."""
    global DEVKIT_LOADS
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=verbose)
    DEVKIT_LOADS += 1

    wanted = set(scenes)
    have = {s["name"] for s in nusc.scene}
    if not wanted & have:
        raise ValueError(
            f"none of the {len(wanted)} scenes of this split (e.g. {sorted(wanted)[:3]}) are in "
            f"{dataroot}/{version} (it has {sorted(have)[:5]}...)"
        )

    pose_cache: Dict[str, np.ndarray] = {}
    calib_cache: Dict[str, dict] = {}

    def ego_pose(token):
        if token not in pose_cache:
            rec = nusc.get("ego_pose", token)
            pose_cache[token] = _pose_matrix(rec["translation"], rec["rotation"])
        return pose_cache[token]

    def calib(token):
        if token not in calib_cache:
            rec = nusc.get("calibrated_sensor", token)
            entry = {"ego_T_sensor": _pose_matrix(rec["translation"], rec["rotation"])}
            if rec.get("camera_intrinsic"):
                pix = np.eye(4)
                pix[:3, :3] = np.asarray(rec["camera_intrinsic"], dtype=np.float64)
                entry["pix_T_cam"] = pix
            calib_cache[token] = entry
        return calib_cache[token]

    records = []
    for sample in nusc.sample:
        scene_name = nusc.get("scene", sample["scene_token"])["name"]
        if scene_name not in wanted:
            continue
        data = sample["data"]
        lidar_sd = nusc.get("sample_data", data[LIDAR_NAME])
        rec = {
            "token": sample["token"],
            "scene_name": scene_name,
            "timestamp": int(sample["timestamp"]),
            "global_T_ego_lidar": ego_pose(lidar_sd["ego_pose_token"]),
            "cams": {},
            "sweeps": {},
        }
        for cam in CAMERA_NAMES:
            sd = nusc.get("sample_data", data[cam])
            c = calib(sd["calibrated_sensor_token"])
            rec["cams"][cam] = {
                "path": sd["filename"],
                "width": int(sd["width"]),
                "height": int(sd["height"]),
                "timestamp": int(sd["timestamp"]),
                "pix_T_cam": c["pix_T_cam"],
                "ego_T_cam": c["ego_T_sensor"],
                "global_T_ego": ego_pose(sd["ego_pose_token"]),
            }
        for chan in SWEEP_CHANNELS:
            if chan not in data:
                continue
            paths, mats, egos, stamps = [], [], [], []
            sd = nusc.get("sample_data", data[chan])
            for _ in range(max(1, nsweeps)):
                c = calib(sd["calibrated_sensor_token"])
                paths.append(sd["filename"])
                egos.append(ego_pose(sd["ego_pose_token"]))
                mats.append(egos[-1] @ c["ego_T_sensor"])
                stamps.append(int(sd["timestamp"]))
                if sd["prev"] == "":
                    break
                sd = nusc.get("sample_data", sd["prev"])
            rec["sweeps"][chan] = {
                "paths": paths,
                "global_T_sensor": np.stack(mats),
                "global_T_ego": np.stack(egos),
                "timestamps": np.asarray(stamps, dtype=np.int64),
            }
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        rec["boxes"] = {
            "center": np.asarray([a["translation"] for a in anns], dtype=np.float64).reshape(-1, 3),
            "wlh": np.asarray([a["size"] for a in anns], dtype=np.float64).reshape(-1, 3),
            "rotation": np.asarray([a["rotation"] for a in anns], dtype=np.float64).reshape(-1, 4),
            "category": [a["category_name"] for a in anns],
            "instance": [a["instance_token"] for a in anns],
            "visibility": np.asarray([int(a["visibility_token"] or 0) for a in anns], dtype=np.int64),
        }
        records.append(rec)
    records.sort(key=lambda r: (r["scene_name"], r["timestamp"]))
    return records


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


def load_index(
    dataroot,
    dset: str = "mini",
    split: str = "train",
    nsweeps: int = 3,
    cache_dir=None,
    verbose: bool = True,
) -> Tuple[PackedRecords, dict]:
    """Packed records of a split, from the on-disk cache when possible. Returns (records, info)."""
    root_guess = Path(dataroot).expanduser()
    version, split_name, scenes = resolve_split(root_guess, dset, split)
    root = check_dataroot(root_guess, version)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(root, version, split_name, scenes, nsweeps)
    path = cdir / f"{version}_{split_name}_{key}.pkl"
    info = {"version": version, "split": split_name, "cache_path": str(path), "dataroot": str(root)}
    t0 = time.perf_counter()
    if path.is_file():
        try:
            with open(path, "rb") as f:
                blob = pickle.load(f)
            if blob.get("format") == INDEX_FORMAT:
                info.update(cache_hit=True, seconds=time.perf_counter() - t0, nsweeps=blob["nsweeps"])
                return PackedRecords(offsets=blob["offsets"], data=blob["data"]), info
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError):
            pass  # unreadable cache: rebuild and overwrite it
    if verbose:
        print(f"[bevtrain] building the {version}/{split_name} index from {root} (once; cached in {cdir})")
    if scenes is None:
        scenes = official_split_scenes(split_name)
    records = build_records(root, version, scenes, nsweeps)
    packed = PackedRecords(records)
    cdir.mkdir(parents=True, exist_ok=True)
    blob = {"format": INDEX_FORMAT, "nsweeps": nsweeps, "offsets": packed.offsets, "data": packed.data}
    fd, tmp = tempfile.mkstemp(dir=cdir, prefix=".tmp_index_")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    info.update(cache_hit=False, seconds=time.perf_counter() - t0, nsweeps=nsweeps)
    if verbose:
        mb = packed.nbytes / 1e6
        print(f"[bevtrain] index: {len(packed)} samples in {info['seconds']:.1f}s ({mb:.1f} MB)")
    return packed, info
