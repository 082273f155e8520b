"""Never lose a run, the smaller failures: a crash before the first step, a save killed with
``kill -9``, and flag errors that point at the right flag."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bevtrain.checkpoint import CheckpointError, list_checkpoints, remove_stale_temp_files, resolve_resume
from bevtrain.config import ConfigError, resolve_config
from bevtrain.train import main

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path, root, **over):
    flags = dict(
        data_dir=str(root), dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25,
        Z=32, Y=4, X=32, latent_dim=16, batch_size=1, grad_acc=1, max_iters=2, log_freq=1, do_val=False,
        save_freq=100, nworkers=0, viz_freq=0, seed=0, exp_name="e",
        log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ckpt"),
    )
    flags.update(over)
    return flags


def test_crash_before_the_first_step_saves_nothing_and_exits(tmp_path, synthetic_root):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    for jpg in (data / "samples" / "CAM_FRONT").glob("*.jpg"):  # every sample unreadable
        jpg.write_bytes(jpg.read_bytes()[:200])
    # a subprocess with a loader worker: the read error comes from the worker, and the process must
    # then exit (loader workers ignore SIGTERM, which Python's exit would otherwise wait on forever)
    args = [f"--{k}={v}" for k, v in tiny(tmp_path, data, nworkers=1).items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "train_nuscenes.py"), *args], capture_output=True,
                       text=True, env=env, timeout=180)
    # a data error: its message alone (no worker traceback), with the data exit code
    assert r.returncode == 65 and "CAM_FRONT" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: sample ") and "Traceback" not in r.stderr
    (run,) = (tmp_path / "ckpt").iterdir()
    assert list_checkpoints(run) == []  # an untrained model-000000000.pth would only mislead
    assert "before the first step completed: nothing to save" in r.stdout
    assert "--resume" not in r.stdout + r.stderr


KILLED_FIRST_SAVE = r"""
import sys, time, torch
from bevtrain.checkpoint import CheckpointManager
def half_then_hang(obj, f):
    f.write(b"x" * 1000)
    f.flush()
    print("HALF", flush=True)
    time.sleep(60)
torch.save = half_then_hang
CheckpointManager(sys.argv[1]).save({"model": {}, "step": 1}, 1)
"""


def test_save_killed_during_the_first_checkpoint(tmp_path, synthetic_root, capsys):
    ckpt_dir = tmp_path / "ckpt"
    killed_run = ckpt_dir / "1x1_3e-4s_e_00:00:00"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FIRST_SAVE, str(killed_run)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "HALF"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (stale,) = killed_run.glob(".model-000000001.pth.tmp.*")

    # --resume=True says why there is nothing to resume, naming the run
    with pytest.raises(CheckpointError, match=r"without a completed checkpoint: 1x1_3e-4s_e_00:00:00 .*"
                                              r"killed while writing it\); start a new run without --resume"):
        resolve_resume(True, ckpt_dir)
    # a save in progress (a live process on this host) is left alone
    live = killed_run / f".model-000000002.pth.tmp.{socket.gethostname()}.{os.getpid()}"
    live.write_bytes(b"in progress")
    assert remove_stale_temp_files(ckpt_dir) == [stale]
    assert live.exists()
    live.unlink()

    # the next start in that ckpt_dir clears what a killed writer left
    stale.write_bytes(b"x" * 1000)
    main(**tiny(tmp_path, synthetic_root, max_iters=1))
    assert not stale.exists()
    assert f"removed {stale}" in capsys.readouterr().out


def test_flag_errors_point_at_the_right_flag(tmp_path):
    with pytest.raises(ConfigError, match="unknown flag 'learning_rate'; did you mean 'lr'"):
        resolve_config({"learning_rate": 1e-3})
    preset = tmp_path / "typo.yaml"
    preset.write_text(yaml.safe_dump({"lerning_rate": 1e-3}))
    with pytest.raises(ConfigError, match="'lerning_rate'; did you mean 'lr'"):
        resolve_config({"config": str(preset)})
    with pytest.raises(ConfigError, match="unknown flag 'num_workers'; did you mean 'nworkers'"):
        resolve_config({"num_workers": 2})
    with pytest.raises(ConfigError, match="unknown flag 'log_freqq'; did you mean 'log_freq'"):
        resolve_config({"log_freqq": 2})  # plain typos still find the flag itself
    for name in ("res_scale", "lr"):
        with pytest.raises(ConfigError) as err:
            resolve_config({name: 0})
        assert str(err.value).startswith(f"flag '{name}' must be > 0, got 0")  # that flag alone
    with pytest.raises(ConfigError, match="flag 'grad_clip' must be >= 0, got -1"):
        resolve_config({"grad_clip": -1.0})
    with pytest.raises(ConfigError, match="'signal_exit_code' must be in \\[1, 255\\]"):
        resolve_config({"signal_exit_code": 0})


def test_resume_after_a_kill_before_the_save_drops_log_lines_past_the_checkpoint(tmp_path, synthetic_root):
    # kill -9 after step 3 was logged but before its checkpoint: the resumed run redoes step 3 from
    # the step-2 checkpoint, and its log must read as one run, without step 3 twice
    flags = tiny(tmp_path, synthetic_root, max_iters=3, save_freq=2, keep_latest=2, do_val=True, val_freq=1,
                 val_batches=1)
    first = main(**flags)
    log = Path(first["log_dir"]) / "train_log.jsonl"

    def curves():
        records = map(json.loads, log.read_text().splitlines())
        return [(r["split"], r["step"], r["loss"], r["iou"]) for r in records]

    uninterrupted = curves()
    assert [r[1] for r in uninterrupted] == [1, 1, 2, 2, 3, 3]
    (Path(first["ckpt_dir"]) / "model-000000003.pth").unlink()
    main(resume=first["ckpt_dir"])
    assert curves() == uninterrupted  # step 3 redone with the same losses, logged once
