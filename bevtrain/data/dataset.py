"""NuScenes BEV dataset and loader: the per-sample batch contract of README.md.

Frames: the reference frame is the reference camera's frame (x right, y down, z forward). Which
pose of that camera depends on ``target_raster`` (targets.TARGET_RASTERS):

- ``simplebev``: the camera mounted on the ego at the LIDAR_TOP keyframe's ego pose (its extrinsics
  applied to that pose), the frame Simple-BEV's targets live in, so the targets are Simple-BEV's
  own maps; ``cams_T_ref[0]`` then differs from the identity by the ego motion between the lidar
  keyframe and the reference image (centimetres to decimetres);
- ``exact``: the reference camera at its own timestamp (``cams_T_ref[0]`` is the identity).

Either way every transform is composed through the global frame with each sensor's own ego pose,
so cameras, boxes and sweeps captured at slightly different times stay consistent with the targets.
The one exception is ``compat='simplebev'``: there ``cams_T_ref`` is Simple-BEV's static rig,
``inv(ego_T_camX) @ ego_T_cam0`` (then the BEV mirror), every camera on the reference camera's ego
pose through its extrinsics alone, the inputs its released weights were trained on.

Cameras (any rig): ``camera_names`` is the ``cameras`` setting, or when empty every camera channel of
the dataroot (``index.camera_channels``: nuScenes' six in ``CAMERA_NAMES`` order, then others by
name); each camera is read at its own image size, and its resize / crop and intrinsics follow from
that size (augment). ``ncams`` cameras per sample (0 = all of them). The reference camera is always
slot 0 (Simple-BEV's convention), the others follow in ``camera_names`` order (validation) or in
random order (training). ``cam_ids`` gives each slot's index into ``camera_names``; ``cam_names``
(a JSON list) names them.

Randomness: every random choice of a sample comes from a generator seeded with
(seed, epoch, index), so augmentation is reproducible whatever the worker count or the order in
which workers pick samples; the loader's sampler passes the epoch along with each index.

rand_flip (training): per camera, a horizontal image flip with the matching intrinsics (geometry
exact, no target change); per sample, a BEV mirror M = diag(sx, 1, sz, 1), sx, sz in {+1, -1}:
the reference frame becomes M @ ref, so cams_T_ref <- cams_T_ref @ M, ref_T_ego <- M @ ref_T_ego,
points and box corners are mirrored and the target maps are flipped along X / Z (offsets negated
along the flipped axis). A mirror axis is only used when the grid is symmetric about 0 on it.
Flipping the maps (rather than rasterising the mirrored boxes) is what Simple-BEV's in-model flips
amount to: its decoder sees flipped features and is scored on the unflipped rule's maps.

Bad samples (a JPEG that is missing, truncated or of the wrong size, an unreadable point file, or
a calibration / pose / box that the index found non-finite): with ``bad_samples='stop'`` (default)
the dataset raises an error naming the file and the sample, at construction for index problems and
when the sample is loaded for file problems, so no training step ever sees one. With 'skip' the
sample at position i is replaced by the next good one (i + 1, i + 2, ... wrapping around), loaded
with the augmentation drawn for position i: batches keep their size and the result is still a pure
function of (seed, epoch, index), so resume and determinism hold. Each sample carries ``skipped``
(a JSON list of the bad samples it replaced, '' when none) for ``BadSampleLog``, which writes them
to the run folder and stops when more than ``max_bad_fraction`` of a split is bad.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bevtrain import geometry
from bevtrain.classes import map_indices, object_indices, resolve_classes
from bevtrain.config import DataConfig
from bevtrain.data import augment, points, targets
from bevtrain.data.index import (
    CAMERA_NAMES,
    LIDAR_NAME,
    RADAR_NAMES,
    category_names,
    load_index,
    load_map_geometry,
)

__all__ = ["NuScenesBEVDataset", "make_loader", "CAMERA_NAMES", "EpochSampler", "BadSampleLog"]

MAX_BOXES = 64
RADAR_POINTS_PER_SWEEP = 700  # Simple-BEV: "radar has <700 points"
RADAR_FEATURES = ("simplebev", "rich")  # radar_features: Simple-BEV's input exactly, or ours
LIDAR_POINTS_PER_SWEEP = 35000  # a nuScenes lidar sweep has at most 34,720 returns


BAD_SAMPLE_MODES = ("stop", "skip")


class SampleReadError(OSError):
    pass


class BadSampleError(ValueError):
    """Samples with unusable calibration, poses or boxes (bad_samples='stop'), or too many bad samples."""


class RigError(ValueError):
    """The cameras the settings ask for (cameras, ncams, refcam_id) do not fit the dataroot's rig."""


class TooManyBadSamplesError(RuntimeError):
    """More than max_bad_fraction of a split turned out bad while training with bad_samples='skip'."""


def describe_problem(rec_token: str, scene: str, problem: dict, dataroot, version: str) -> str:
    """'sample <token> (<scene>), <channel>: <table> <token> in <file>: <reason>'."""
    table = Path(dataroot) / version / f"{problem['table']}.json"
    return (f"sample {rec_token} ({scene}), {problem['channel']}: {problem['table']} {problem['token']} "
            f"in {table}: {problem['reason']}")


def _bad_entry(index: int, rec: dict, reason: str) -> dict:
    return {"index": index, "token": rec["token"], "scene": rec["scene_name"], "reason": reason}


def bad_fraction_limit(max_bad_fraction: float, n: int) -> int:
    """Most bad samples a split of ``n`` may have: floor(max_bad_fraction * n)."""
    return int(max_bad_fraction * n + 1e-9)


@contextlib.contextmanager
def _naming_sample(rec, what: str):
    """Re-raise a file error as a SampleReadError naming the sample, its scene and ``what``."""
    try:
        yield
    except OSError as e:
        raise SampleReadError(f"sample {rec['token']} ({rec['scene_name']}), {what}: {e}") from e


@dataclass
class SampleAug:
    """One sample's random choices: cameras (reference first), BEV mirror, per-camera image aug."""

    cam_ids: list
    flip_x: bool
    flip_z: bool
    image_augs: list  # augment.ImageAug per camera, in cam_ids order


def check_data_settings(data: DataConfig) -> None:
    """ValueError (NotImplementedError for seqlen) naming the setting a dataset cannot use."""
    if data.target_raster not in targets.TARGET_RASTERS:
        raise ValueError(
            f"target_raster={data.target_raster!r}: use one of {list(targets.TARGET_RASTERS)}"
        )
    if data.seqlen != 1:
        raise NotImplementedError(
            f"seqlen={data.seqlen}: only single frames (seqlen=1) are supported by the batch contract"
        )
    if data.ncams < 0:
        raise ValueError(f"ncams={data.ncams} must be >= 0 (0 = every camera of the rig)")
    if data.use_metaradar and not data.use_radar:
        raise ValueError("use_metaradar needs use_radar=True")
    if data.radar_features not in RADAR_FEATURES:
        raise ValueError(f"radar_features={data.radar_features!r}; valid: {', '.join(RADAR_FEATURES)}")
    if data.nsweeps < 1:
        raise ValueError(f"nsweeps={data.nsweeps} must be >= 1")
    if data.compat not in ("none", "simplebev"):
        raise ValueError(f"compat={data.compat!r}; valid: none, simplebev")
    if data.bad_samples not in BAD_SAMPLE_MODES:
        raise ValueError(f"bad_samples={data.bad_samples!r} must be one of {list(BAD_SAMPLE_MODES)}")
    resolve_classes(data.classes, data.class_groups)  # ClassSpecError (a ValueError) naming the class


class ClassMatchError(ValueError):
    """An object output whose categories match no category of the dataroot."""


# 0/1 masks travel as uint8, a quarter of float32's bytes through the loader workers' queue and to the
# device (with ten channels the float32 copies cost more than drawing nine map layers); build.to_device
# makes them float32 where the losses and metrics read them.
MASK_KEYS = ("seg_bev", "valid_bev")


def _mask_tensor(a: np.ndarray) -> torch.Tensor:
    """A (possibly flipped) 0/1 array as a contiguous uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))


class NuScenesBEVDataset(Dataset):
    """Samples of one split (the batch contract of README.md), built from the data section of a config:
    ``NuScenesBEVDataset(DataConfig.make(data_dir=root, dset="mini"), split="val", is_train=False)``.

    ``fast_decode``: decode JPEGs at a reduced scale when the output size allows (augment).
    """

    def __init__(
        self, data: DataConfig, split: str = "train", is_train: bool = True, fast_decode: bool = True
    ):
        check_data_settings(data)
        self.data = data
        self.split = split
        self.is_train = is_train
        self.fast_decode = fast_decode
        self.records, self.index_info = load_index(
            data.data_dir, data.dset, split, nsweeps=data.nsweeps, cache_dir=data.cache_dir or None
        )
        if len(self.records) == 0:
            raise ValueError(f"split {split!r} of dset {data.dset!r} in {data.data_dir} has no samples")
        self.dataroot = self.index_info["dataroot"]
        self.camera_names = self._rig_cameras(data)
        self._read_settings(data)
        self._check_object_classes()
        # {location: the map-expansion layers the map outputs draw, as one pack (targets.merge_map_layers)} of
        # the locations this split uses (map outputs only)
        self.map_layers: Dict[str, dict] = {}
        if self.map_channels:
            locations = {rec["location"] for rec in self.records}
            geometry = load_map_geometry(self.dataroot, locations, cache_dir=data.cache_dir or None)
            needed = list(dict.fromkeys(s for c in self.map_channels for s in self.outputs[c].sources))
            self.map_layers = {loc: targets.merge_map_layers(g["layers"], needed)
                               for loc, g in geometry.items()}
        self.epoch = 0
        # position -> {"index", "token", "scene", "reason"} of samples known to be bad (in a loader
        # worker this grows with what the worker finds; the outcome never depends on it)
        self.bad: Dict[int, dict] = self._check_index_problems()

    def _read_settings(self, data: DataConfig) -> None:
        """The section's settings as attributes, and what follows from them (image size, grid)."""
        self.final_dim = augment.final_dim_for(data.res_scale)
        self.rand_crop_and_resize = data.rand_crop_and_resize
        self.rand_flip = data.rand_flip
        self.ncams = data.ncams or len(self.camera_names)
        self.nsweeps = data.nsweeps
        self.do_shuffle_cams = data.do_shuffle_cams
        self.refcam_id = data.refcam_id
        self.use_radar = data.use_radar
        self.use_radar_filters = data.use_radar_filters
        self.use_lidar = data.use_lidar
        self.use_metaradar = data.use_metaradar
        self.radar_features = data.radar_features
        self.get_tids = data.get_tids
        # The output channels (bevtrain.classes): object groups drawn from boxes, map layers from the map.
        self.outputs = resolve_classes(data.classes, data.class_groups)
        self.object_channels = object_indices(self.outputs)
        self.map_channels = map_indices(self.outputs)
        # map outputs in consecutive channels (the usual order) are drawn straight into seg
        maps = list(self.map_channels)
        consecutive = bool(maps) and maps == list(range(maps[0], maps[0] + len(maps)))
        self.map_block = slice(maps[0], maps[-1] + 1) if consecutive else None
        self.seed = int(data.seed)
        # compat='simplebev': intrinsics in Simple-BEV's convention, and its PIL NEAREST val resize.
        self.compat = data.compat
        self.target_raster = data.target_raster
        self.bad_samples = data.bad_samples
        self.max_bad_fraction = float(data.max_bad_fraction)
        self.vox = geometry.Vox_util(data.Z, data.Y, data.X, scene_centroid=data.scene_centroid,
                                     bounds=data.bounds)
        # The BEV mirror is an array flip only if the grid is symmetric about 0 on that axis.
        self._can_flip_x = abs(self.vox.xmin + self.vox.xmax) < 1e-6
        self._can_flip_z = abs(self.vox.zmin + self.vox.zmax) < 1e-6

    def __len__(self) -> int:
        return len(self.records)

    def _rig_cameras(self, data: DataConfig) -> List[str]:
        """The camera channels this dataset reads (module docstring, 'Cameras'); a RigError naming the
        setting when cameras, ncams or refcam_id do not fit the dataroot's rig."""
        rig = list(self.index_info["cameras"])
        where = f"{self.dataroot} ({len(rig)} camera(s): {', '.join(rig)})"
        names = list(data.cameras) or rig
        unknown = [c for c in names if c not in rig]
        if unknown or len(set(names)) != len(names):
            what = f"names {unknown}, not cameras of" if unknown else "names a camera twice; the cameras of"
            raise RigError(f"cameras={list(data.cameras)} {what} {where}; name each at most once, or pass "
                           f"--cameras=[] for all of them")
        if not 0 <= data.ncams <= len(names):
            raise RigError(f"ncams={data.ncams} must be in 1..{len(names)} (0 = all) for {where}: pass "
                           f"--ncams={len(names)} or fewer (or --ncams=0)")
        if not 0 <= data.refcam_id < len(names):
            raise RigError(f"refcam_id={data.refcam_id} must index the {len(names)} camera(s) "
                           f"{', '.join(names)} of {self.dataroot}: pass --refcam_id=0..{len(names) - 1}")
        return names

    def _check_object_classes(self) -> None:
        """Every object output must match some category of the dataroot's category table."""
        if not self.object_channels:
            return
        known = category_names(self.dataroot, self.index_info["version"])
        for c in (self.outputs[i] for i in self.object_channels):
            if not any(c.matches_category(k) for k in known):
                raise ClassMatchError(
                    f"class '{c.name}' (categories {list(c.sources)}) matches no category of {self.dataroot}/"
                    f"{self.index_info['version']}/category.json; the categories are: {', '.join(known)}. "
                    f"Name a category or a dotted prefix of one (e.g. 'vehicle' for every vehicle.*)"
                )

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for samples requested by a plain int index (the loader passes its own)."""
        self.epoch = int(epoch)

    # -- randomness --------------------------------------------------------------------------------
    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index, 0xBE7])

    def _choose_cams(self, rng) -> list:
        """Camera indices, reference camera first."""
        n = len(self.camera_names)
        if not self.is_train:
            # Fixed: the reference camera, then the others in camera_names order, first ncams.
            cams = [self.refcam_id] + [c for c in range(n) if c != self.refcam_id]
            return cams[: self.ncams]
        if self.ncams < n:
            cams = list(rng.choice(n, self.ncams, replace=False))
            if not self.do_shuffle_cams and self.refcam_id not in cams:
                cams[0] = self.refcam_id
        else:
            cams = list(range(n))
        if self.do_shuffle_cams:
            ref = cams[int(rng.integers(len(cams)))]
        else:
            ref = self.refcam_id if self.refcam_id in cams else cams[0]
        rest = [c for c in cams if c != ref]
        if self.ncams == n:
            rest.sort()
        return [int(ref)] + [int(c) for c in rest]

    def draw_augmentation(self, index: int, epoch: int) -> SampleAug:
        """The sample's random choices (cameras, BEV mirror, per-camera resize/crop/flip), a pure
        function of (seed, epoch, index) in training and fixed at validation."""
        rng = self._rng(index, epoch) if self.is_train else None
        cam_ids = self._choose_cams(rng)
        flip_x = flip_z = False
        if self.is_train and self.rand_flip:
            flip_x = bool(rng.random() < 0.5) and self._can_flip_x
            flip_z = bool(rng.random() < 0.5) and self._can_flip_z
        train, image_augs = self.is_train, []
        for _ in cam_ids:
            img_flip = bool(train and self.rand_flip and rng.random() < 0.5)
            aug = augment.sample_image_aug(rng, self.final_dim, train, self.rand_crop_and_resize, img_flip)
            image_augs.append(aug)
        return SampleAug(cam_ids, flip_x, flip_z, image_augs)

    def _check_index_problems(self) -> Dict[int, dict]:
        """Samples whose calibration / poses / boxes (as this configuration uses them) are unusable:
        an error with 'stop', else the bad-sample table for 'skip'."""
        uses = {"always": True, "lidar": self.use_lidar, "radar": self.use_radar}
        needed = {what for what, used in uses.items() if used}
        bad = {}
        for i, problems in sorted(self.index_info.get("problems", {}).items()):
            problems = [p for p in problems if p["needed_for"] in needed]
            if problems:
                rec = self.records[i]
                why = [describe_problem(rec["token"], rec["scene_name"], p, self.dataroot,
                                        self.index_info["version"]) for p in problems]
                bad[i] = _bad_entry(i, rec, "; ".join(why))
        if not bad:
            return bad
        n, first = len(self.records), [b["reason"] for b in list(bad.values())[:3]]
        where = f"split {self.split!r} of {self.dataroot}"
        if self.bad_samples == "stop":
            raise BadSampleError(
                f"{len(bad)} of {n} samples of {where} have unusable calibration, poses or boxes (NaN or "
                f"out of range), e.g. " + " | ".join(first) + ". Fix the tables (list every problem with "
                f"`python -m bevtrain.data.verify --data_dir={self.dataroot}`), or train with "
                f"--bad_samples=skip to leave such samples out"
            )
        limit = bad_fraction_limit(self.max_bad_fraction, n)
        if len(bad) > limit:
            raise BadSampleError(
                f"{len(bad)} of {n} samples of {where} have unusable calibration, poses or boxes, more than "
                f"max_bad_fraction={self.max_bad_fraction} allows ({limit}); e.g. " + " | ".join(first)
            )
        return bad

    # -- one sample --------------------------------------------------------------------------------
    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, epoch = item
        else:
            index, epoch = item, self.epoch
        index, epoch = int(index), int(epoch)
        if self.bad_samples == "stop":
            try:
                out = self._load(index, index, epoch)
            except SampleReadError as e:
                raise SampleReadError(
                    f"{e}. To list every bad file: python -m bevtrain.data.verify "
                    f"--data_dir={self.dataroot}; to train without such samples: --bad_samples=skip"
                ) from e
            out["skipped"] = ""
            return out
        skipped: List[dict] = []
        n = len(self.records)
        for k in range(n):  # the next good sample, deterministically
            j = (index + k) % n
            if j not in self.bad:
                try:
                    out = self._load(j, index, epoch)
                except SampleReadError as e:
                    self.bad[j] = _bad_entry(j, self.records[j], str(e))
                else:
                    out["skipped"] = json.dumps(skipped) if skipped else ""
                    return out
            skipped.append(self.bad[j])
        raise BadSampleError(f"every sample of split {self.split!r} of {self.dataroot} is bad, e.g. "
                             f"{skipped[0]['reason']}")

    def _load(self, index: int, draw_index: int, epoch: int) -> dict:
        """Sample ``index`` with the random choices drawn for position ``draw_index``."""
        rec = self.records[index]
        draw = self.draw_augmentation(draw_index, epoch)
        cam_ids, flip_x, flip_z = draw.cam_ids, draw.flip_x, draw.flip_z
        mirror = np.diag([-1.0 if flip_x else 1.0, 1.0, -1.0 if flip_z else 1.0, 1.0])

        cams = [rec["cams"][self.camera_names[c]] for c in cam_ids]
        global_T_cams = np.stack([c["global_T_ego"] @ c["ego_T_cam"] for c in cams])  # (S,4,4)
        # one matrix at a time: a batched inverse rounds differently (1e-14) from the single one
        cams_T_global = [geometry.rigid_inverse(torch.from_numpy(m)).numpy() for m in global_T_cams]
        if self.target_raster == "simplebev":
            # Simple-BEV's target frame: the reference camera's extrinsics on the lidar keyframe's ego.
            global_T_ref0 = rec["global_T_ego_lidar"] @ cams[0]["ego_T_cam"]
            ref_T_global = geometry.rigid_inverse(torch.from_numpy(global_T_ref0)).numpy()
        else:
            global_T_ref0 = global_T_cams[0]
            ref_T_global = cams_T_global[0]
        global_T_ref = global_T_ref0 @ mirror  # M is its own inverse
        if self.compat == "simplebev":
            # Simple-BEV's static rig (its get_camM_T_camXs): every camera placed on one ego pose by its
            # extrinsics alone, so the ego motion between the captures is not in cams_T_ref; its weights
            # were trained on that rig.
            ego_T_ref = cams[0]["ego_T_cam"] @ mirror
            cams_T_ref = np.stack(
                [geometry.rigid_inverse(torch.from_numpy(c["ego_T_cam"])).numpy() @ ego_T_ref for c in cams]
            )  # (S,4,4)
        else:
            cams_T_ref = np.stack([cam_T_global @ global_T_ref for cam_T_global in cams_T_global])  # (S,4,4)

        images = np.empty((len(cam_ids), 3) + tuple(self.final_dim), np.uint8)  # (S,3,H,W)
        pix_T_cams = []
        for s, (cam_id, cam, aug) in enumerate(zip(cam_ids, cams, draw.image_augs)):
            path = os.path.join(self.dataroot, cam["path"])
            with _naming_sample(rec, self.camera_names[cam_id]):
                src_wh = (cam["width"], cam["height"])
                if self.compat == "simplebev" and aug.resize_wh == (aug.final_hw[1], aug.final_hw[0]) \
                        and aug.crop_xy == (0, 0) and not aug.flip:
                    # Simple-BEV's "perfect resize" (validation, or no rand_crop_and_resize)
                    _, pix_T_cam = augment.load_simplebev_val_image(
                        path, cam["pix_T_cam"], src_wh, aug.final_hw, out=images[s]
                    )
                else:
                    convention = "simplebev" if self.compat == "simplebev" else "exact"
                    _, pix_T_cam = augment.load_augmented_image(
                        path, cam["pix_T_cam"], src_wh, aug, self.fast_decode, out=images[s],
                        convention=convention,
                    )
            pix_T_cams.append(pix_T_cam)

        ref_T_ego = mirror @ ref_T_global @ rec["global_T_ego_lidar"]
        out = {
            "images": torch.from_numpy(images),  # (S,3,H,W) uint8
            "pix_T_cams": torch.from_numpy(np.stack(pix_T_cams).astype(np.float32)),  # (S,4,4)
            "cams_T_ref": torch.from_numpy(cams_T_ref.astype(np.float32)),  # (S,4,4)
            "ref_T_ego": torch.from_numpy(ref_T_ego.astype(np.float32)),  # (4,4)
            "cam_ids": torch.tensor(cam_ids, dtype=torch.int64),  # (S,)
            # a string collates as a list of B strings (a list of names would be transposed)
            "cam_names": json.dumps([self.camera_names[c] for c in cam_ids]),
        }
        out.update(self._targets(rec, ref_T_global, flip_x, flip_z, mirror, cams[0]["ego_T_cam"]))
        if self.use_radar:
            if self.radar_features == "simplebev":
                out.update(self._radar_simplebev(rec, cams[0]["ego_T_cam"], mirror))
            else:
                out.update(self._radar(rec, ref_T_global, flip_x, flip_z, ref_time=cams[0]["timestamp"]))
        if self.use_lidar:
            out.update(self._lidar(rec, ref_T_global, flip_x, flip_z))
        out["sample_token"] = rec["token"]
        out["scene_name"] = rec["scene_name"]
        out["index"] = torch.tensor(index, dtype=torch.int64)
        return out

    def _targets(self, rec, ref_T_global, flip_x, flip_z, mirror, ego_T_refcam) -> dict:
        """seg / valid (C,Z,X), one channel per output; center (1,Z,X) and offset (2,Z,X) of the boxes of
        all object outputs together (class-agnostic instances); those boxes for drawing (README 'Targets')."""
        boxes = rec["boxes"]
        objects = [self.outputs[c] for c in self.object_channels]
        member = np.zeros((len(objects), len(boxes["category"])), bool)  # (K,N) box n in object output k
        for k, c in enumerate(objects):
            member[k] = targets.class_mask(boxes["category"], c.sources)
        keep = member.any(axis=0)
        center = boxes["center"][keep]
        corners_g = targets.box_corners(center, boxes["wlh"][keep], boxes["rotation"][keep])
        rot, t = ref_T_global[:3, :3], ref_T_global[:3, 3]
        corners = corners_g @ rot.T + t  # (N,8,3) ref frame (before the mirror)
        centers = center @ rot.T + t
        vis = boxes["visibility"][keep]
        raster = (self.target_raster, boxes)
        frames = (ref_T_global, rec["global_T_ego_lidar"], ego_T_refcam, self.vox)
        seg, valid, ctr, off = targets.rasterise(*raster, keep, *frames)
        if len(self.outputs) > 1 or not objects:
            # One channel per output; a single object output is the union drawn above.
            per_object = [(seg[0], valid[0])] if len(objects) == 1 else [
                targets.rasterise(*raster, member[k], *frames)[:2] for k in range(len(objects))
            ]
            shape = (len(self.outputs), self.vox.Z, self.vox.X)
            seg, valid = np.zeros(shape, np.uint8), np.ones(shape, np.uint8)  # (C,Z,X)
            for c, (seg_c, valid_c) in zip(self.object_channels, per_object):
                seg[c], valid[c] = seg_c, valid_c
            if self.map_channels:
                self._map_masks(rec, ref_T_global, seg)
        bev = {  # (C,Z,X) seg and valid, (1,Z,X) center, (2,Z,X) offset
            "seg_bev": _mask_tensor(seg),
            "valid_bev": _mask_tensor(valid),
            "center_bev": torch.from_numpy(np.ascontiguousarray(ctr, dtype=np.float32)),
            "offset_bev": torch.from_numpy(np.ascontiguousarray(off, dtype=np.float32)),
        }
        flip_dims = [d for d, flip in ((-1, flip_x), (-2, flip_z)) if flip]  # X is the last axis, Z before it
        if flip_dims:  # torch's flip: a copy through numpy's negative strides is ten times slower
            bev = {k: torch.flip(v, flip_dims) for k, v in bev.items()}
            signs = torch.tensor([-1.0 if flip_x else 1.0, -1.0 if flip_z else 1.0])
            bev["offset_bev"] *= signs.view(2, 1, 1)
        corners = corners @ mirror[:3, :3]  # diagonal, so this is M applied to each point
        # Keep the nearest MAX_BOXES boxes for drawing (the maps above use all of them).
        order = np.argsort(np.linalg.norm(centers[:, [0, 2]], axis=1), kind="stable")[:MAX_BOXES]
        n = len(order)
        box_corners = np.zeros((MAX_BOXES, 8, 3), np.float32)
        box_corners[:n] = corners[order]
        box_vis = np.zeros(MAX_BOXES, np.int64)
        box_vis[:n] = vis[order]
        box_class = np.full(MAX_BOXES, -1, np.int64)
        if n:  # the first object output (channel) each box belongs to
            first = member[:, keep].argmax(axis=0)
            box_class[:n] = np.asarray(self.object_channels, np.int64)[first[order]]
        out = {
            **bev,
            "box_corners": torch.from_numpy(box_corners),  # (N,8,3)
            "box_count": torch.tensor(n, dtype=torch.int64),
            "box_visibility": torch.from_numpy(box_vis),  # (N,)
            "box_class": torch.from_numpy(box_class),  # (N,) channel of each box, -1 for padding
        }
        if self.get_tids:
            inst = [tok for tok, k in zip(boxes["instance"], keep) if k]
            tids = np.full(MAX_BOXES, -1, np.int64)
            tids[:n] = [int(inst[i][:15], 16) for i in order]  # 60-bit id from the instance token
            out["box_tids"] = torch.from_numpy(tids)
        return out

    def _map_masks(self, rec, ref_T_global, seg: np.ndarray) -> None:
        """The K map outputs in the reference frame (before any mirror) into their channels of seg (C,Z,X)
        uint8: the union of each output's layers, each layer drawn once (targets.map_output_masks)."""
        sources = [self.outputs[c].sources for c in self.map_channels]
        in_place = seg[self.map_block] if self.map_block else None
        layers = self.map_layers[rec["location"]]
        masks = targets.map_output_masks(layers, sources, ref_T_global, self.vox, in_place)
        if in_place is None:
            seg[list(self.map_channels)] = masks

    def _radar(self, rec, ref_T_global, flip_x, flip_z, ref_time) -> dict:
        chans = [(c, rec["sweeps"][c]) for c in RADAR_NAMES if c in rec["sweeps"]]
        with _naming_sample(rec, "radar"):
            pts = points.accumulate_radar(
                self.dataroot,
                chans,
                ref_T_global,
                self.nsweeps,
                ref_time,
                self.use_radar_filters,
                self.use_metaradar,
            )
        pts = points.mirror_points(pts, flip_x, flip_z, self.use_metaradar)
        padded, n = points.pad_points(pts, RADAR_POINTS_PER_SWEEP * self.nsweeps)
        return {"radar": torch.from_numpy(padded), "radar_count": torch.tensor(n, dtype=torch.int64)}

    def _radar_simplebev(self, rec, ego_T_refcam, mirror) -> dict:
        """Simple-BEV's radar points (points.accumulate_radar_simplebev) in the reference frame: the
        ego frame at RADAR_FRONT's keyframe mapped by the reference camera's extrinsics only, as
        Simple-BEV did; the mirror moves xyz only (Simple-BEV flips the grid, not the values)."""
        missing = [c for c in points.SIMPLEBEV_RADAR_ORDER if c not in rec["sweeps"]]
        if missing:
            raise SampleReadError(
                f"sample {rec['token']} ({rec['scene_name']}) has no {', '.join(missing)} data; "
                "radar_features=simplebev needs all five radars (radar_features=rich uses what is there)"
            )
        with _naming_sample(rec, "radar"):
            pts = points.accumulate_radar_simplebev(
                self.dataroot, rec["sweeps"], self.nsweeps, self.use_radar_filters, self.use_metaradar
            )
        ref_T_ego = mirror @ geometry.rigid_inverse(torch.from_numpy(ego_T_refcam)).numpy()
        pts[:, :3] = pts[:, :3] @ ref_T_ego[:3, :3].T + ref_T_ego[:3, 3]
        size = RADAR_POINTS_PER_SWEEP * self.nsweeps
        if len(pts) < size:
            # Simple-BEV pads its list to `size` with zero rows in the ego frame, and they voxelise at
            # the ego origin (occupancy 1 there, features 0): one such row has the same effect.
            origin = np.zeros((1, pts.shape[1]), np.float32)
            origin[0, :3] = ref_T_ego[:3, 3]
            pts = np.concatenate([pts, origin])
        padded, n = points.pad_points(pts, size)
        return {"radar": torch.from_numpy(padded), "radar_count": torch.tensor(n, dtype=torch.int64)}

    def _lidar(self, rec, ref_T_global, flip_x, flip_z) -> dict:
        if LIDAR_NAME not in rec["sweeps"]:
            raise SampleReadError(f"sample {rec['token']} has no {LIDAR_NAME} data but use_lidar=True")
        with _naming_sample(rec, LIDAR_NAME):
            sweeps = rec["sweeps"][LIDAR_NAME]
            pts = points.accumulate_lidar(self.dataroot, sweeps, ref_T_global, self.nsweeps)
        pts = points.mirror_points(pts, flip_x, flip_z)
        padded, n = points.pad_points(pts, LIDAR_POINTS_PER_SWEEP * self.nsweeps)
        return {"lidar": torch.from_numpy(padded), "lidar_count": torch.tensor(n, dtype=torch.int64)}


# -- the bad-sample report ------------------------------------------------------------------------------
class BadSampleLog:
    """The run's record of bad samples (datasets with bad_samples='skip'): one JSON line per bad sample
    and split, written when first met, ``{"split", "index", "token", "scene", "reason", "step"}``.

    A resumed run reads the file back, so counts continue. More than
    ``floor(max_bad_fraction * len(split))`` distinct bad samples in a split raises
    TooManyBadSamplesError: a few bad files are skipped, a broken data set is not trained on.
    Under DDP each rank keeps its own file (``bad_samples.rank<r>.jsonl`` beside rank 0's) and count.
    """

    def __init__(self, path, split_sizes: Dict[str, int], max_bad_fraction: float):
        self.path = Path(path)
        self.sizes = dict(split_sizes)
        self.max_bad_fraction = float(max_bad_fraction)
        self.seen: Dict[str, set] = {split: set() for split in self.sizes}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.seen.setdefault(entry["split"], set()).add(entry["token"])

    @classmethod
    def for_run(cls, run_dir, rank: int = 0, **datasets) -> BadSampleLog:
        """The log of a run folder for ``split=dataset`` pairs (None datasets are left out), holding
        the samples the index already found bad; inert when no dataset skips."""
        datasets = {k: ds for k, ds in datasets.items() if ds is not None and ds.bad_samples == "skip"}
        name = "bad_samples.jsonl" if rank == 0 else f"bad_samples.rank{rank}.jsonl"
        fraction = min([ds.max_bad_fraction for ds in datasets.values()], default=0.0)
        log = cls(Path(run_dir) / name, {k: len(ds) for k, ds in datasets.items()}, fraction)
        for split, ds in datasets.items():
            log.add(split, list(ds.bad.values()), step=0)
        return log

    def count(self, split: str) -> int:
        return len(self.seen.get(split, ()))

    def add_batch(self, split: str, batch, step: int) -> None:
        """Record the bad samples a batch's samples replaced (its ``skipped`` strings)."""
        for text in batch.get("skipped") or ():
            if text:
                self.add(split, json.loads(text), step)

    def add(self, split: str, entries: List[dict], step: int) -> None:
        new = [e for e in entries if e["token"] not in self.seen.setdefault(split, set())]
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for e in new:
                if e["token"] in self.seen[split]:
                    continue
                self.seen[split].add(e["token"])
                f.write(json.dumps({"split": split, **e, "step": int(step)}) + "\n")
        n = self.sizes.get(split, 0)
        limit = bad_fraction_limit(self.max_bad_fraction, n)
        if self.count(split) > limit:
            raise TooManyBadSamplesError(
                f"{self.count(split)} of the {n} samples of the {split} split are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction} allows ({limit}): the data looks broken rather "
                f"than a few bad files. They are listed in {self.path}; check the data set with "
                f"`python -m bevtrain.data.verify`, or raise --max_bad_fraction"
            )


# -- loading -----------------------------------------------------------------------------------------
class EpochSampler(Sampler):
    """Yields (index, epoch) pairs for this rank.

    train (shuffle): a permutation seeded by (seed, epoch), cut to a multiple of world_size and split
    by stride, so ranks see disjoint samples of equal count. val: indices rank, rank + world_size, ...
    with no padding, so across ranks every sample is seen exactly once (ranks may differ by one).
    ``set_epoch(e, skip=k)`` selects the epoch and skips the first k samples of this rank's order
    (resume mid-epoch). Without set_epoch, each new iteration advances the epoch by one.
    """

    def __init__(
        self, n: int, shuffle: bool, is_train: bool, rank: int = 0, world_size: int = 1, seed: int = 0
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.n, self.shuffle, self.is_train = n, shuffle, is_train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.skip = 0
        self._explicit = True  # the first iteration uses epoch 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip, self._explicit = int(epoch), int(skip), True

    def _order(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.is_train:
            usable = (self.n // self.world_size) * self.world_size
            order = order[:usable]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        if not self._explicit:
            self.epoch += 1
            self.skip = 0
        self._explicit = False
        order = self._order()[self.skip :]
        epoch = self.epoch
        return iter([(int(i), epoch) for i in order])

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.skip)


# Ctrl-C and scheduler pre-emption signal the whole process group. The main process owns shutdown
# (it stops at a safe point and saves); a worker killed by such a signal would instead make the
# DataLoader raise in the main process at any moment, even in the middle of writing a checkpoint.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def worker_signals_held():
    """Start loader workers inside this: the signals stay blocked from fork() until _worker_init
    ignores them, so none can reach a worker before it does. Signals the main process gets
    meanwhile are delivered to it on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Workers ignore SIGTERM, but multiprocessing's exit handler stops leftover workers with SIGTERM and
# then waits for them: a process leaving while a loader iterator is still referenced (a traceback, a
# reference cycle not yet collected) would wait forever. So the iterators of loaders made here are
# remembered and, at exit, stop their workers as a deleted iterator would. atexit runs handlers last
# registered first, and multiprocessing may register its own only when the first worker starts, so
# ours is registered after that (when an iterator with workers first exists).
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HANDLER_REGISTERED = False


class _Loader(DataLoader):
    """A DataLoader whose worker-backed iterators are remembered for _stop_all_workers."""

    def __iter__(self):
        global _EXIT_HANDLER_REGISTERED
        iterator = super().__iter__()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(iterator)
            if not _EXIT_HANDLER_REGISTERED:
                atexit.register(_stop_all_workers)
                _EXIT_HANDLER_REGISTERED = True
        return iterator


def _stop_all_workers() -> None:
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()


def kill_loader_workers() -> None:
    """SIGKILL the workers of every live loader: a process about to ``os._exit`` (a second stop
    signal) leaves none behind; nothing they hold needs saving."""
    for iterator in list(_LIVE_ITERATORS):
        for worker in getattr(iterator, "_workers", []):
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)


def stop_workers(loader) -> None:
    """Stop a loader's worker processes now (a persistent loader keeps them between epochs)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        _LIVE_ITERATORS.discard(iterator)
        loader._iterator = None


def _worker_init(worker_id: int) -> None:
    signal.set_wakeup_fd(-1)  # the parent's signal watcher (bevtrain.stopping) is not the worker's
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # discards any already pending
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
    # cv2's thread count is set in the parent (make_loader): touching it here would tear down a
    # thread pool copied by fork() from the parent, which deadlocks in pthread_cond_destroy.
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    # torch seeds each worker from the loader's base seed + worker id; derive numpy's from it.
    np.random.seed(info.seed % (2**32))


def make_loader(
    ds: NuScenesBEVDataset,
    batch_size: int,
    nworkers: int,
    shuffle: bool,
    is_train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataLoader:
    """DataLoader over ``ds``: train drops the last partial batch, val keeps every sample once.

    The sampler is ``loader.sampler`` (an ``EpochSampler``); call ``loader.sampler.set_epoch(e)``
    at the start of each epoch (it also auto-advances). Augmentation randomness depends only on
    (ds.seed, epoch, sample index); the loader's own generator is seeded from (seed, rank).
    """
    sampler = EpochSampler(len(ds), shuffle, is_train, rank, world_size, seed)
    if nworkers > 0:
        import cv2

        # Workers are the parallelism, so cv2's own pool only oversubscribes; more importantly a
        # live pool in the parent is copied half-owned into every forked worker, where any later
        # pool operation can hang. With one thread cv2 keeps no pool, so fork is safe.
        cv2.setNumThreads(1)
    gen = torch.Generator()
    gen.manual_seed(int(seed) * 1000 + rank)
    return _Loader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=nworkers,
        drop_last=is_train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=nworkers > 0,
        worker_init_fn=_worker_init if nworkers > 0 else None,
        generator=gen,
        prefetch_factor=2 if nworkers > 0 else None,
    )
