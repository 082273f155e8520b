"""Checkpoints: atomic writes survive a killed writer, pruning, RNG round trip, strict loading."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bevtrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_save,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    resolve_resume,
    restore_rng,
)

REPO = Path(__file__).resolve().parents[1]


def _state(step, n=10):
    return {"model": {"w": torch.full((n,), float(step))}, "step": step}


def test_manager_keeps_latest_and_names_files(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_latest=2)
    for step in (10, 20, 30):
        mgr.save(_state(step), step)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["model-000000020.pth", "model-000000030.pth"]
    assert load_checkpoint(mgr.latest())["step"] == 30
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_full_training_state_loads_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-7)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100, pct_start=0.05,
                                                cycle_momentum=False, anneal_strategy="linear")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict(), "rng": [capture_rng()], "config": {"lr": 1e-3, "bounds": [1.0]},
             "step": 1, "data": {"train": {"epoch": 0, "consumed": 3}}}
    path = atomic_save(state, tmp_path / "model-000000001.pth")
    back = load_checkpoint(path)  # weights_only=True inside
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=1e-3, total_steps=100)
    sched2.load_state_dict(back["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert back["data"]["train"]["consumed"] == 3


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    path = atomic_save({"model": {}, "rng": capture_rng()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


KILLED_WRITER = r"""
import sys, time, torch
from bevtrain.checkpoint import CheckpointManager
mgr = CheckpointManager(sys.argv[1], keep_latest=1)
mgr.save({"model": {"w": torch.ones(1000)}, "step": 1}, 1)
real_save = torch.save
def slow_partial_save(obj, f):
    import io
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])  # half of the new checkpoint is on disk ...
    f.flush()
    print("HALF", flush=True)
    time.sleep(60)  # ... when the process is killed
    f.write(data[len(data) // 2:])
torch.save = slow_partial_save
mgr.save({"model": {"w": torch.zeros(1000)}, "step": 2}, 2)
"""


def test_writer_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "HALF"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(run.glob(".model-000000002.pth.tmp.*")), "the partial temp file should exist"
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["model-000000001.pth"]
    ckpt = load_checkpoint(ckpts[-1])
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(1000))
    assert resolve_resume(True, tmp_path) == ckpts[-1]
    CheckpointManager(run)  # a new writer clears stale temp files
    assert not list(run.glob(".*tmp*"))


def test_corrupt_checkpoint_error_names_file(tmp_path):
    good = atomic_save(_state(1), tmp_path / "model-000000001.pth")
    truncated = tmp_path / "model-000000002.pth"
    truncated.write_bytes(good.read_bytes()[:100])
    garbage = tmp_path / "model-000000003.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=str(bad)):
            load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_resume_resolution(tmp_path):
    for name, step in (("old", 5), ("new", 3)):
        CheckpointManager(tmp_path / name).save(_state(step), step)
        time.sleep(0.02)
    assert resolve_resume(True, tmp_path).parent.name == "new"
    assert resolve_resume("old", tmp_path).name == "model-000000005.pth"
    assert resolve_resume(str(tmp_path / "old"), "elsewhere").name == "model-000000005.pth"
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        resolve_resume("nope", tmp_path)
    with pytest.raises(CheckpointError, match="no run with checkpoints"):
        resolve_resume(True, tmp_path / "empty")


class _Net(torch.nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.encoder = torch.nn.Linear(2, 2)
        self.decoder = torch.nn.Linear(2, 3 if extra else 1)
        if extra:
            self.head = torch.nn.Linear(1, 1)


def test_strict_loading_lists_keys_and_honours_ignore_load():
    src = _Net().state_dict()
    with pytest.raises(CheckpointError, match=r"missing \(2\): head.bias, head.weight.*shape mismatch"):
        load_weights(_Net(extra=True), src, source="ck.pth")
    with pytest.raises(CheckpointError, match=r"unexpected \(2\): head.bias, head.weight"):
        load_weights(_Net(), _Net(extra=True).state_dict())
    target = _Net(extra=True)
    ddp_src = {"module." + k: v for k, v in src.items()}
    skipped = load_weights(target, ddp_src, ignore_load=["decoder", "head"])
    assert torch.equal(target.encoder.weight, src["encoder.weight"])
    assert "head.weight" in skipped and "decoder.weight" in skipped
