"""Train BEV vehicle segmentation on nuScenes (Simple-BEV flags).

    python train_nuscenes.py --batch_size=1 --grad_acc=5 --lr=3e-4
    python train_nuscenes.py --config=configs/quickstart.yaml
    torchrun --nproc_per_node=4 train_nuscenes.py --config=configs/rgb.yaml
    python train_nuscenes.py --resume=True            # continue the newest run

Without data at data/nuscenes the synthetic set (data/synthetic) is generated and used.
"""

import sys

import fire

from bevtrain.config import ConfigError, flags_help


def main(**flags):
    from bevtrain.checkpoint import CheckpointError
    from bevtrain.model.encoders import WeightsUnavailableError
    from bevtrain.train import main as train_main

    try:
        train_main(**flags)
    except (ConfigError, CheckpointError, WeightsUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


main.__doc__ = __doc__ + "\n" + flags_help()

if __name__ == "__main__":
    # fire hands --help to a **flags function as a flag; answer it here instead.
    if any(arg in ("-h", "--help", "help") for arg in sys.argv[1:2]) or "--help" in sys.argv[1:]:
        print(main.__doc__)
        sys.exit(0)
    fire.Fire(main)
