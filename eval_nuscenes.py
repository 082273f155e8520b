"""Evaluate a trained bevtrain run on nuScenes val: IoU (both protocols), PNG/GIF/TensorBoard pictures.

    python eval_nuscenes.py --init_dir=checkpoints/<run> [--load_step=N] [--data_dir=...] [--dset=...]
        [--batch_size=...] [--nworkers=...] [--amp=auto|bf16|fp16|none] [--device=auto|cpu|cuda:N]
        [--viz_every=10] [--max_viz=50] [--viz_only] [--viz_dir=...] [--metrics_path=...]
    torchrun --nproc_per_node=4 eval_nuscenes.py --init_dir=...

See bevtrain/evaluate.py for what is written where.
"""

import functools

import fire

from bevtrain.evaluate import evaluate, main


@functools.wraps(evaluate)
def cli(*args, **flags):
    main(*args, **flags)  # the summary goes to metrics.json; returning it would make fire print it all


if __name__ == "__main__":
    fire.Fire(cli)
