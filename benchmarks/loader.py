"""Loader throughput: our NuScenesBEVDataset vs a Simple-BEV-style baseline vs the JPEG decode floor.

All run on the same data, with the same worker count and batch size 1, in one process run:

- ``ours``: ``NuScenesBEVDataset`` in training mode (crop/resize/flip, shuffled reference camera);
  RGB only unless --radar/--lidar (then those modalities are read, as configured).
- ``baseline``: what Simple-BEV's loader does per sample: PIL full-resolution decode + resize +
  crop of six cameras, float tensors; lidar (3 sweeps) and radar (5 radars x 3 sweeps) read with the
  devkit's point-cloud classes whether used or not; targets built with per-object full-grid tensors
  (its ``xyz2circles`` over Z x Y x X and per-object masks). It uses our index for file paths and
  poses so the devkit tables are not part of the timing.
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

from bevtrain.data import augment, index
from bevtrain.data.dataset import CAMERA_NAMES, NuScenesBEVDataset
from bevtrain.data.targets import BOTTOM, box_corners, class_mask


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
        imgs = []
        for cam in CAMERA_NAMES:
            img = Image.open(os.path.join(self.root, rec["cams"][cam]["path"]))
            r = rng.uniform(0.8, 1.2)
            nw, nh = int(fW * r), int(fH * r)
            off = int(fH * 0.2)
            cw = int((nw - fW) / 2) + int(rng.uniform(-off, off))
            ch = int((nh - fH) / 2) + int(rng.uniform(-off, off))
            img = img.resize((nw, nh)).crop((cw, ch, cw + fW, ch + fH))
            imgs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(imgs)

    def _points(self, rec):
        from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud

        RadarPointCloud.disable_filters()
        out = []
        for chan, cls in [("LIDAR_TOP", LidarPointCloud)] + [(r, RadarPointCloud) for r in index.RADAR_NAMES]:
            sw = rec["sweeps"][chan]
            for path, g in list(zip(sw["paths"], sw["global_T_sensor"]))[: self.nsweeps]:
                pc = cls.from_file(os.path.join(self.root, path))
                pc.remove_close(2.2)
                pc.transform(g)
                out.append(pc.points[:3])
        return out

    def _targets(self, rec):
        boxes = rec["boxes"]
        keep = class_mask(boxes["category"], ("vehicle",))
        c = rec["cams"]["CAM_FRONT"]
        ref_T_global = np.linalg.inv(c["global_T_ego"] @ c["ego_T_cam"])
        corners = box_corners(boxes["center"][keep], boxes["wlh"][keep], boxes["rotation"][keep])
        corners = corners @ ref_T_global[:3, :3].T + ref_T_global[:3, 3]
        centers = torch.from_numpy(corners.mean(1)).float()
        N = len(corners)
        seg = np.zeros((self.Z, self.X))
        for n in range(N):
            mem = self.vox.Ref2Mem(torch.from_numpy(corners[n][None]).float())[0]
            pts = mem[BOTTOM][:, [0, 2]].numpy().astype(np.int32)
            cv2.fillPoly(seg, [pts], n + 1.0)
        # Simple-BEV's xyz2circles: a Gaussian and offsets over the full 3D grid for every object.
        grid = self.vox.voxel_centers_ref().reshape(self.Z, self.Y, self.X, 3)
        grid = self.vox.Ref2Mem(grid.reshape(1, -1, 3)).reshape(self.Z, self.Y, self.X, 3)
        cmem = self.vox.Ref2Mem(centers[None])[0] if N else torch.zeros(0, 3)
        center = torch.zeros(1, self.Z, self.Y, self.X)
        offset = torch.zeros(3, self.Z, self.Y, self.X)
        seg_t = torch.from_numpy(seg)
        for n in range(N):
            d = grid - cmem[n]
            g = torch.exp(-(d**2).sum(-1) / (2 * 3.0**2))
            center = torch.maximum(center, g[None])
            mask = (seg_t == n + 1).float()[:, None, :]
            offset += (-d).permute(3, 0, 1, 2) * mask
        offset = offset.min(dim=2)[0] + offset.max(dim=2)[0]
        return torch.from_numpy(seg)[None].float(), center.max(dim=2)[0], offset[[0, 2]]

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        rec = self.records[i]
        imgs = self._images(rec, rng)
        pts = self._points(rec)
        seg, center, offset = self._targets(rec)
        return imgs.shape[0] + len(pts) + int(seg.sum() > -1)


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
        from bevtrain.data.synthetic import ensure_synthetic

        ensure_synthetic(args.data_dir)

    t0 = time.perf_counter()
    _, info = index.load_index(args.data_dir, args.dset, args.split, nsweeps=3, cache_dir=args.cache_dir)
    print(f"index: {'cache hit' if info['cache_hit'] else 'built'} in {time.perf_counter() - t0:.2f}s")
    for rs in [float(s) for s in args.res_scales.split(",")]:
        common = dict(dset=args.dset, split=args.split, res_scale=rs, cache_dir=args.cache_dir, nsweeps=3)
        ours = NuScenesBEVDataset(
            args.data_dir, is_train=True, use_radar=args.radar, use_metaradar=args.radar,
            use_lidar=args.lidar, **common,
        )  # fmt: skip
        ours_val = NuScenesBEVDataset(args.data_dir, is_train=False, **common)
        rows = [
            ("floor (decode 6 JPEGs)", FloorDataset(ours)),
            ("floor at train decode sizes", FloorDataset(ours, train_factors=True)),
            ("ours train", ours),
            ("ours val", ours_val),
            ("baseline (Simple-BEV style)", SimpleBEVStyleDataset(ours)),
        ]
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
        )


if __name__ == "__main__":
    main()
