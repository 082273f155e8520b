"""Cost of the JPEG integrity check in the loader: ``augment.decode_jpeg`` (read the bytes, check the
FFD8/FFD9 markers, decode in memory) against the unchecked ``cv2.imread`` it replaced.

Two levels, old and new interleaved round by round (the machine is shared, so medians of paired
rounds are what count):
- decode: the same JPEGs at reduction factors 1, 2, 8 (res_scale 2 validation decodes at 2; the
  quickstart's res_scale 0.25 at 8);
- sample: ``NuScenesBEVDataset.__getitem__`` (six cameras + targets), validation mode.

Usage: python benchmarks/decode_check.py [--data_dir DIR] [--dset mini] [--images 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import cv2

from bevtrain.config import DataConfig
from bevtrain.data import augment
from bevtrain.data.dataset import NuScenesBEVDataset


def unchecked_decode(path: str, factor: int = 1):
    """The decode before the check (cv2.imread: a truncated file decodes with grey rows)."""
    img = cv2.imread(path, augment._REDUCED_FLAGS[factor])
    if img is None:
        raise augment.ImageReadError(f"cannot read image {path} (missing or corrupt)")
    return img


def _time(fn, items, *extra) -> float:
    t0 = time.perf_counter()
    for item in items:
        fn(item, *extra)
    return (time.perf_counter() - t0) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", default="/work/cache/testdata")
    ap.add_argument("--dset", default="mini")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    files = sorted(glob.glob(os.path.join(args.data_dir, "samples", "CAM_*", "*.jpg")))[: args.images]
    print(f"{len(files)} JPEGs from {args.data_dir}, {args.rounds} interleaved rounds, 1 thread")
    real = augment.decode_jpeg
    for factor in (1, 2, 8):
        old, new = [], []
        for _ in range(args.rounds):
            old.append(_time(unchecked_decode, files, factor))
            new.append(_time(real, files, factor))
        ratio = statistics.median(n / o for n, o in zip(new, old))
        print(f"decode 1/{factor}: unchecked {1e3 * statistics.median(old):.3f} ms, checked "
              f"{1e3 * statistics.median(new):.3f} ms per image; checked/unchecked {ratio:.3f}")
    for res_scale in (2, 0.25):
        data = DataConfig.make(data_dir=args.data_dir, dset=args.dset, res_scale=res_scale)
        ds = NuScenesBEVDataset(data, split="val", is_train=False)
        items = list(range(min(args.samples, len(ds))))
        old, new = [], []
        for _ in range(args.rounds):
            augment.decode_jpeg = unchecked_decode
            old.append(_time(ds.__getitem__, items))
            augment.decode_jpeg = real
            new.append(_time(ds.__getitem__, items))
        ratio = statistics.median(n / o for n, o in zip(new, old))
        print(f"sample res_scale {res_scale}: unchecked {1e3 * statistics.median(old):.1f} ms, checked "
              f"{1e3 * statistics.median(new):.1f} ms per sample; checked/unchecked {ratio:.3f}")


if __name__ == "__main__":
    main()
