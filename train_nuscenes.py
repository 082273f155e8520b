"""Train BEV vehicle segmentation on nuScenes with Simple-BEV's flags: ``--help`` lists them.

    python train_nuscenes.py --config=configs/quickstart.yaml
    python train_nuscenes.py --batch_size=1 --grad_acc=5 --lr=3e-4
"""

from bevtrain.cli import fire_main
from bevtrain.train import cli

if __name__ == "__main__":
    fire_main(cli)
