"""Loader throughput: ours vs a baseline doing Simple-BEV's per-sample steps vs the JPEG decode floor.

All run on the same data, with the same worker count and batch size 1, in one process run:

- ``ours``: ``NuScenesBEVDataset`` in training mode (crop/resize/flip, shuffled reference camera);
  RGB only unless --radar/--lidar (then those modalities are read, as configured).
- ``ours train + every map layer``: the same with ``classes`` = vehicle and every map-expansion layer
  (the seven polygon layers and both dividers, each its own channel; when the dataroot has
  ``maps/expansion/``): the cost of the map targets against the default ``[vehicle]``.
- ``baseline``: the per-sample work of Simple-BEV's training loader (``nuscenesdataset.VizData``),
  step for step and no more: per camera a PIL full-resolution decode, nearest-neighbour resize, crop
  and ``ToTensor`` (float); lidar (3 sweeps) and radar (5 radars x 3 sweeps) read with the devkit's
  point-cloud classes whether used or not, concatenated sweep by sweep, padded to 30000 / 700 points
  per sweep; the LSS ``binimg`` and the box list through devkit ``Box`` objects; ``get_seg_bev``
  (``cv2.fillPoly`` per box); ``get_center_and_offset_bev`` (its ``xyz2circles_bev`` on the Z x X
  plane for every box at once, per-box masks, size/yaw/height maps); the float images, padded
  points and maps go to the main process as in Simple-BEV. It uses our index for file paths and
  poses, so the devkit tables (cheap dict look-ups in Simple-BEV) are not timed.
- ``floor``: only decoding the six JPEGs (returned to the main process, as any loader must), at the
  reduced-decode factor the validation output allows;
- ``floor at train decode sizes``: the same, at the factor each training draw of ``ours`` needs
  (its random resize above 1x needs a full-resolution decode where validation gets a reduced one).

Usage: python benchmarks/loader.py [--data_dir DIR] --res_scales 2,1 --nworkers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bevtrain.classes import MAP_LINE_LAYERS, MAP_POLYGON_LAYERS
from bevtrain.config import DataConfig
from bevtrain.data import augment, index
from bevtrain.data.dataset import CAMERA_NAMES, NuScenesBEVDataset


class FloorDataset(Dataset):
    """Decode the six JPEGs and hand them to the main process as one uint8 tensor, nothing else.

    ``train_factors``: decode at the reduction factor each camera of ``ours`` (training mode) needs
    for its random resize (the same draws, so the same mix of reduced and full decodes); otherwise at
    the factor the validation size allows.
    """

    def __init__(self, ds: NuScenesBEVDataset, train_factors: bool = False):
        self.ds, self.records, self.root, self.final_dim = ds, ds.records, ds.dataroot, ds.final_dim
        self.train_factors = train_factors

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        if self.train_factors:  # the dataset's own draws for this sample (epoch 0, as measured)
            draw = self.ds.draw_augmentation(i, 0)
            jobs = [(CAMERA_NAMES[c], aug.resize_wh) for c, aug in zip(draw.cam_ids, draw.image_augs)]
        else:
            jobs = [(name, self.final_dim[::-1]) for name in CAMERA_NAMES]
        images = []
        for name, resize_wh in jobs:
            cam = rec["cams"][name]
            f = augment.decode_factor((cam["width"], cam["height"]), resize_wh, self.ds.fast_decode)
            images.append(torch.from_numpy(augment.decode_jpeg(os.path.join(self.root, cam["path"]), f)))
        return images


class SimpleBEVStyleDataset(Dataset):
    """Per-sample work of Simple-BEV's loader (see the module docstring)."""

    def __init__(self, ds: NuScenesBEVDataset, nsweeps: int = 3):
        self.records, self.root, self.final_dim = ds.records, ds.dataroot, ds.final_dim
        self.nsweeps = nsweeps
        self.Z, self.Y, self.X = ds.vox.Z, ds.vox.Y, ds.vox.X
        self.vox = ds.vox

    def __len__(self):
        return len(self.records)

    def _images(self, rec, rng):
        from PIL import Image

        fH, fW = self.final_dim
        crop_offset = int(fH * (1 - 0.8))
        imgs = []
        for cam in CAMERA_NAMES:
            img = Image.open(os.path.join(self.root, rec["cams"][cam]["path"]))
            r = rng.uniform(0.8, 1.2)
            nw, nh = int(fW * r), int(fH * r)
            cw = int((nw - fW) / 2) + int(rng.uniform(-crop_offset, crop_offset))
            ch = int((nh - fH) / 2) + int(rng.uniform(-crop_offset, crop_offset))
            img = img.resize((nw, nh), Image.NEAREST).crop((cw, ch, cw + fW, ch + fH))
            # torchvision's ToTensor: HWC uint8 -> CHW float in [0, 1]
            imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255))
        return torch.stack(imgs)

    def _sweeps(self, rec, chan, cls, rows):
        """get_lidar_data / get_radar_data: sweeps into the ego frame, time row appended."""
        sw = rec["sweeps"][chan]
        ego_T_global = np.linalg.inv(sw["global_T_ego"][0])
        points = np.zeros((rows, 0))
        for path, g, stamp in list(zip(sw["paths"], sw["global_T_sensor"], sw["timestamps"]))[: self.nsweeps]:
            pc = cls.from_file(os.path.join(self.root, path))
            pc.remove_close(2.2)
            pc.transform(ego_T_global @ g)
            times = (1e-6 * sw["timestamps"][0] - 1e-6 * stamp) * np.ones((1, pc.nbr_points()))
            points = np.concatenate((points, np.concatenate((pc.points, times), 0)), 1)
        return points

    def _points(self, rec):
        from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud

        lidar = self._sweeps(rec, "LIDAR_TOP", LidarPointCloud, 5)
        RadarPointCloud.disable_filters()
        radar = np.concatenate([self._sweeps(rec, c, RadarPointCloud, 19) for c in index.RADAR_NAMES], 1)
        V = 30000 * self.nsweeps
        lidar = np.pad(lidar[:3].T[:V], [(0, max(0, V - lidar.shape[1])), (0, 0)])
        radar = np.pad(radar.T, [(0, max(0, 700 * self.nsweeps - radar.shape[1])), (0, 0)])
        return torch.from_numpy(lidar).float(), torch.from_numpy(radar).float()

    def _boxes(self, rec):
        """get_binimg + get_lrtlist: vehicle boxes through devkit Box objects into the ego frame."""
        from nuscenes.utils.data_classes import Box
        from pyquaternion import Quaternion

        ego = rec["global_T_ego_lidar"]
        trans, rot = -ego[:3, 3], Quaternion(matrix=ego[:3, :3]).inverse
        boxes = rec["boxes"]
        binimg = np.zeros((200, 200))
        lrts, vis = [], []
        for i, cat in enumerate(boxes["category"]):
            if "vehicle" not in cat:
                continue
            box = Box(boxes["center"][i], boxes["wlh"][i], Quaternion(boxes["rotation"][i]))
            box.translate(trans)
            box.rotate(rot)
            pts = np.round((box.bottom_corners()[:2].T + 50.0) / 0.5).astype(np.int32)
            pts[:, [1, 0]] = pts[:, [0, 1]]
            cv2.fillPoly(binimg, [pts], i + 1.0)
            ego_T_box = np.eye(4)
            ego_T_box[:3, :3], ego_T_box[:3, 3] = box.rotation_matrix, box.center
            lrts.append((box.wlh[[1, 0, 2]], ego_T_box))
            vis.append(float(boxes["visibility"][i] != 1))
        return binimg, lrts, vis

    def _targets(self, rec, lrts, vis):
        """get_seg_bev and get_center_and_offset_bev in the reference camera's frame."""
        N = len(lrts)
        c = rec["cams"]["CAM_FRONT"]
        cam_T_ego = np.linalg.inv(c["ego_T_cam"])
        seg = np.zeros((self.Z, self.X))
        val = np.ones((self.Z, self.X))
        signs = np.array([[sx, sy, sz] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)]) / 2
        centers, lens, rts = [], [], []
        for n, (lwh, ego_T_box) in enumerate(lrts):
            cam_T_box = cam_T_ego @ ego_T_box
            corners = (signs * lwh[[1, 0, 2]]) @ cam_T_box[:3, :3].T + cam_T_box[:3, 3]  # (8, 3)
            mem = self.vox.Ref2Mem(torch.from_numpy(corners[None]).float())[0]
            inds = torch.topk(torch.from_numpy(corners[:, 1]), 4, largest=False)[1]
            pts = mem[inds][:, [0, 2]].numpy().astype(np.int32)
            pts = np.stack([pts[0], pts[1], pts[3], pts[2]])
            cv2.fillPoly(seg, [pts], n + 1.0)
            if vis[n] == 0:
                cv2.fillPoly(val, [pts], 0.0)
            centers.append(cam_T_box[:3, 3])
            lens.append(lwh)
            rts.append(cam_T_box)
        seg_t = torch.from_numpy(seg).float()
        if N == 0:
            return seg_t, torch.zeros(1, self.Z, self.X), torch.zeros(2, self.Z, self.X)
        # xyz2circles_bev: a Gaussian and offsets on the Z x X plane for every box at once
        cmem = self.vox.Ref2Mem(torch.tensor(np.array(centers), dtype=torch.float32)[None])[0]
        xz = torch.stack([cmem[:, 0], cmem[:, 2]], 1).round().reshape(N, 2, 1, 1)
        gz, gx = torch.meshgrid(torch.arange(self.Z).float(), torch.arange(self.X).float(), indexing="ij")
        off = torch.stack([gx, gz])[None] - xz  # (N, 2, Z, X)
        center = torch.exp(-(off**2).sum(1) / (2 * 3.0**2))
        center[center < 0.001] = 0.0
        masks = torch.stack([(seg_t == n + 1).float() for n in range(N)])[:, None]  # (N, 1, Z, X)
        size_bev = torch.zeros(3, self.Z, self.X)
        ry_bev = torch.zeros(1, self.Z, self.X)
        ycoord_bev = torch.zeros(1, self.Z, self.X)
        for n in range(N):
            inst = seg_t == n + 1
            size_bev[:, inst] = torch.tensor(lens[n], dtype=torch.float32)[:, None]
        for n in range(N):
            inst = seg_t == n + 1
            ry_bev[:, inst] = float(np.arctan2(rts[n][0, 0], rts[n][2, 0]))
        for n in range(N):
            inst = seg_t == n + 1
            ycoord_bev[:, inst] = float(rts[n][1, 3])
        offset = (off * masks).sum(0)
        return seg_t[None], center.max(0, keepdim=True)[0], offset * 2  # Simple-BEV: min + max over Y

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        rec = self.records[i]
        imgs = self._images(rec, rng)
        lidar, radar = self._points(rec)
        binimg, lrts, vis = self._boxes(rec)
        seg, center, offset = self._targets(rec, lrts, vis)
        # handed to the main process like Simple-BEV's batch (float images, padded points, maps)
        return imgs, lidar, radar, torch.from_numpy(binimg).float(), seg, center, offset


MAPS_ROW = "ours train + every map layer"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(ds, nworkers: int, nsamples: int, warmup: int = 2):
    """samples/s over ``nsamples`` samples (after ``warmup``), and the max worker RSS in MB."""
    loader = DataLoader(
        ds,
        batch_size=1,
        shuffle=False,
        num_workers=nworkers,
        collate_fn=lambda b: b,
        persistent_workers=False,
        sampler=[i % len(ds) for i in range(nsamples + warmup)],
        prefetch_factor=2 if nworkers else None,
        worker_init_fn=(lambda _w: torch.set_num_threads(1)) if nworkers else None,
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    rss = 0.0
    for k in range(nsamples):
        next(it)
        if nworkers and k == nsamples // 2:
            rss = max(_rss_mb(w.pid) for w in it._workers)
    dt = time.perf_counter() - t0
    del it
    return nsamples / dt, rss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/synthetic", help="default: the synthetic set, made if missing")
    p.add_argument("--dset", default="mini")
    p.add_argument("--split", default="train")
    p.add_argument("--res_scales", default="1,2")
    p.add_argument("--nworkers", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=40, help="timed samples per row and turn")
    p.add_argument("--repeats", type=int, default=3, help="turns per row; the median is reported")
    p.add_argument("--radar", action="store_true", help="ours also reads radar (3 sweeps, metaradar)")
    p.add_argument("--lidar", action="store_true", help="ours also reads lidar (3 sweeps)")
    p.add_argument("--cache_dir", default=None)
    args = p.parse_args()
    # Every variant runs single-threaded per worker; set in the parent so no forked worker inherits
    # a live cv2 thread pool (tearing one down in a child deadlocks).
    cv2.setNumThreads(1)
    if args.data_dir == "data/synthetic":
        from bevtrain.synthetic import ensure_synthetic

        ensure_synthetic(args.data_dir)

    has_maps = os.path.isdir(os.path.join(args.data_dir, "maps", "expansion"))
    if not has_maps:
        print(f"no {args.data_dir}/maps/expansion/: no map-layer row")
    t0 = time.perf_counter()
    _, info = index.load_index(args.data_dir, args.dset, args.split, nsweeps=3, cache_dir=args.cache_dir)
    print(f"index: {'cache hit' if info['cache_hit'] else 'built'} in {time.perf_counter() - t0:.2f}s")
    for rs in [float(s) for s in args.res_scales.split(",")]:
        val_data = DataConfig.make(data_dir=args.data_dir, dset=args.dset, res_scale=rs,
                                   cache_dir=args.cache_dir or "", nsweeps=3)
        train_data = val_data.replace(use_radar=args.radar, use_metaradar=args.radar, use_lidar=args.lidar)
        ours = NuScenesBEVDataset(train_data, split=args.split, is_train=True)
        ours_val = NuScenesBEVDataset(val_data, split=args.split, is_train=False)
        rows = [
            ("floor (decode 6 JPEGs)", FloorDataset(ours)),
            ("floor at train decode sizes", FloorDataset(ours, train_factors=True)),
            ("ours train", ours),
            ("ours val", ours_val),
            ("baseline (Simple-BEV's steps)", SimpleBEVStyleDataset(ours)),
        ]
        if has_maps:
            every_layer = ["vehicle", *MAP_POLYGON_LAYERS, *MAP_LINE_LAYERS]
            maps = NuScenesBEVDataset(train_data.replace(classes=every_layer), args.split, is_train=True)
            rows.append((MAPS_ROW, maps))
        # Rows take turns, --repeats times, and each reports its median: on a shared machine a
        # single pass drifts by ~10 %, and turns spread the drift over all rows alike.
        runs = {name: [] for name, _ in rows}
        rss = {name: 0.0 for name, _ in rows}
        for _ in range(args.repeats):
            for name, ds in rows:
                sps, peak = measure(ds, args.nworkers, args.nsamples)
                runs[name].append(sps)
                rss[name] = max(rss[name], peak)
        results = {name: float(np.median(v)) for name, v in runs.items()}
        for name, _ in rows:
            print(
                f"res_scale {rs:g} {ours.final_dim}  {name:30s} {results[name]:7.2f} samples/s (median of "
                + ", ".join(f"{v:.1f}" for v in runs[name])
                + ")"
                + (f"   worker RSS {rss[name]:6.0f} MB" if args.nworkers else "")
            )
        base, floor, floor_train = results[rows[4][0]], results[rows[0][0]], results[rows[1][0]]
        print(
            f"res_scale {rs:g}: ours train / baseline = {results['ours train'] / base:.2f}x, "
            f"floor / ours train = {floor / results['ours train']:.2f}x, "
            f"floor at train decode sizes / ours train = {floor_train / results['ours train']:.2f}x, "
            f"floor / ours val = {floor / results['ours val']:.2f}x"
            + (f", time per sample {MAPS_ROW} / ours train = {results['ours train'] / results[MAPS_ROW]:.3f}x"
               if has_maps else "")
        )


if __name__ == "__main__":
    main()
