"""Evaluate a trained run on nuScenes val (IoU, PNG/GIF/TensorBoard pictures): ``--help`` lists the flags.

    python eval_nuscenes.py --init_dir=checkpoints/<run>
    torchrun --nproc_per_node=4 eval_nuscenes.py --init_dir=checkpoints/<run>
"""

from bevtrain.cli import fire_main
from bevtrain.evaluate import cli

if __name__ == "__main__":
    fire_main(cli)
