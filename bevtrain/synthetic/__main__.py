"""python -m bevtrain.synthetic --out DIR: write a synthetic nuScenes dataroot (see bevtrain.synthetic)."""

from __future__ import annotations

from typing import Iterable

from bevtrain.cli import ArgumentParser
from bevtrain.synthetic import __doc__ as package_doc
from bevtrain.synthetic.catalog import DEFAULT_RIG, RIGS
from bevtrain.synthetic.dataroot import generate


def main(argv: Iterable[str] | None = None) -> None:
    ap = ArgumentParser(
        prog="python -m bevtrain.synthetic", description=package_doc.split("\n\n")[0]
    )
    ap.add_argument("--out", required=True, help="dataroot to write (v1.0-mini/, samples/, sweeps/, maps/)")
    ap.add_argument("--keyframes", type=int, default=40, help="keyframes per scene (2 Hz)")
    ap.add_argument(
        "--scenes", type=int, default=None, help="first N of the ten v1.0-mini scenes (default all)"
    )
    ap.add_argument("--rig", default=DEFAULT_RIG, choices=list(RIGS),
                    help="cameras: nuscenes (six, 1600x900), four (FRONT_CAM, LEFT_CAM, REAR_CAM, RIGHT_CAM, "
                    "1280x720), one (CAM_FRONT, 1024x768), mixed (FRONT_WIDE 1920x1080, REAR_SMALL 640x480); "
                    "sizes scale with --width/1600, --height/900")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nworkers", "--workers", type=int, default=None, dest="workers", metavar="N",
                    help="processes (default: CPU count)")
    args = ap.parse_args(None if argv is None else list(argv))
    generate(
        args.out,
        keyframes=args.keyframes,
        scenes=args.scenes,
        width=args.width,
        height=args.height,
        seed=args.seed,
        workers=args.workers,
        rig=args.rig,
    )


if __name__ == "__main__":
    main()
