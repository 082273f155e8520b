"""How far compat=simplebev's static rig is from bevtrain's per-capture camera placement (issue 20).

    python benchmarks/rig_placement.py --data_dir DIR [--dset mini] [--split val] [--res_scale 1]

Over every sample of the split (validation mode): the largest absolute difference between the two
``cams_T_ref`` (any entry), the largest translation difference in metres and rotation in degrees,
per target raster (the reference frame's ego pose differs between them).
"""

from __future__ import annotations

import argparse

import numpy as np

from bevtrain.config import DataConfig
from bevtrain.data.dataset import NuScenesBEVDataset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--dset", default="mini")
    ap.add_argument("--split", default="val")
    ap.add_argument("--res_scale", type=float, default=0.5)
    args = ap.parse_args()
    for raster in ("simplebev", "exact"):
        base = DataConfig.make(
            data_dir=args.data_dir, dset=args.dset, res_scale=args.res_scale, target_raster=raster
        )
        ours = NuScenesBEVDataset(base, split=args.split, is_train=False)
        static = NuScenesBEVDataset(base.replace(compat="simplebev"), split=args.split, is_train=False)
        entry = metres = degrees = 0.0
        for i in range(len(ours)):
            a = ours[i]["cams_T_ref"].double().numpy()  # (S,4,4)
            b = static[i]["cams_T_ref"].double().numpy()
            entry = max(entry, float(np.abs(a - b).max()))
            metres = max(metres, float(np.linalg.norm(a[:, :3, 3] - b[:, :3, 3], axis=1).max()))
            rel = np.einsum("sij,skj->sik", a[:, :3, :3], b[:, :3, :3])  # a_R @ b_R^T
            cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)
            degrees = max(degrees, float(np.degrees(np.arccos(cos)).max()))
        print(
            f"{args.data_dir} {args.split} ({len(ours)} samples), target_raster={raster}: largest cams_T_ref "
            f"difference {entry:.4f} (any entry), translation {metres:.4f} m, rotation {degrees:.3f} deg"
        )


if __name__ == "__main__":
    main()
