"""Runs started together (array jobs, sweeps) never share a run folder."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from bevtrain.checkpoint import list_checkpoints, load_checkpoint
from bevtrain.run_files import claim_run_name

REPO = Path(__file__).resolve().parents[1]


def _claim(cfg, barrier, out):
    barrier.wait()  # every process asks for the name at the same instant
    out.put(claim_run_name(cfg, "12:00:00")[0])


def test_processes_claiming_a_name_at_once_each_get_their_own(tmp_path):
    cfg = {"batch_size": 1, "grad_acc": 5, "lr": 3e-4, "use_scheduler": True, "exp_name": "race",
           "ckpt_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs")}
    ctx = mp.get_context("fork")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(cfg, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    names = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(names)) == n, names
    base = "1x5_3e-4s_race_12:00:00"
    assert sorted(names) == sorted([base] + [f"{base}_{k}" for k in range(2, n + 1)])
    for name in names:
        assert (tmp_path / "ckpt" / name).is_dir() and (tmp_path / "logs" / name).is_dir()


def test_two_runs_started_together_keep_their_own_folders_logs_and_checkpoints(tmp_path, synthetic_root):
    common = [f"--data_dir={synthetic_root}", "--dset=mini", "--encoder_type=res18", "--encoder_weights=none",
              "--res_scale=0.25", "--Z=32", "--Y=4", "--X=32", "--latent_dim=16", "--batch_size=1",
              "--grad_acc=1", "--max_iters=3", "--log_freq=1", "--do_val=False", "--save_freq=3",
              "--nworkers=0", "--viz_freq=0", "--exp_name=twin", "--threads=1",
              f"--log_dir={tmp_path / 'logs'}", f"--ckpt_dir={tmp_path / 'ckpt'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Start both just after a clock second ticks, so that they most likely pick the same name.
    time.sleep(1.02 - time.time() % 1)
    procs = [subprocess.Popen([sys.executable, "train_nuscenes.py", *common, f"--seed={seed}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(runs) == 2 and sorted(p.name for p in (tmp_path / "logs").iterdir()) == runs, (runs, outs)
    seeds = set()
    for run in runs:
        steps = [json.loads(line)["step"] for line in open(tmp_path / "logs" / run / "train_log.jsonl")
                 if '"step"' in line]
        assert steps == sorted(set(steps)) and steps[-1] == 3, (run, steps)  # one run's log, complete
        ckpts = list_checkpoints(tmp_path / "ckpt" / run)
        assert [c.name for c in ckpts] == ["model-000000003.pth"]
        ckpt = load_checkpoint(ckpts[0])
        assert ckpt["run_name"] == run
        seeds.add(ckpt["config"]["seed"])
    assert seeds == {0, 1}, "each run's checkpoint is its own"
    if runs[0] == runs[1].rsplit("_", 1)[0]:  # same second: the second one said it took another name
        assert sum(f"this run is {runs[1]}" in out for out in outs) == 1, outs
