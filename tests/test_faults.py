"""Never lose a run: SIGTERM (pre-emption) and SIGINT (Ctrl-C) sent to the whole process group of a
real training process (loader worker included) at exact points of the loop (BEVTRAIN_TEST_SIGNAL)
and at random moments. Every stop must leave a loadable checkpoint of a completed step that equals
the uninterrupted run's checkpoint of that step (BatchNorm statistics, optimiser, RNG and loader
positions included), exit with the "stopped early, resumable" code, and a resumed run must log the
same train and val curves as the uninterrupted run, exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bevtrain.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXIT_RESUMABLE = 75  # the default --signal_exit_code
MAX_ITERS = 6


def flags(root: Path, data: Path, **over) -> dict:
    """Tiny model and grid, one loader worker, val at steps 2, 4 and 6 (two batches each)."""
    f = dict(
        data_dir=str(data), dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25,
        Z=32, Y=4, X=32, latent_dim=16, batch_size=1, grad_acc=2, max_iters=MAX_ITERS, log_freq=1,
        val_freq=2, val_batches=2, save_freq=100, keep_latest=100, nworkers=1, viz_freq=0, seed=0,
        exp_name="f", device="cpu", log_dir=str(root / "logs"), ckpt_dir=str(root / "ckpt"),
    )
    f.update(over)
    return f


def launch(cwd: Path, flags: dict, signal_at: str = "") -> subprocess.Popen:
    """train_nuscenes.py in a new session: its own process group, as a scheduler or a shell starts it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("BEVTRAIN_TEST_SIGNAL", None)
    if signal_at:
        env["BEVTRAIN_TEST_SIGNAL"] = signal_at
    args = [f"--{k}={v}" for k, v in flags.items()]
    cmd = [sys.executable, "-u", str(REPO / "train_nuscenes.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def wait_for_first_step(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.startswith("step       1/"):
            return
    raise AssertionError("the run ended before its first step")


def the_run(ckpt_dir: Path) -> Path:
    (run,) = [p for p in Path(ckpt_dir).iterdir() if p.is_dir()]
    return run


def curves(log_dir: Path, run_name: str):
    lines = (Path(log_dir) / run_name / "train_log.jsonl").read_text().splitlines()
    return [(r["split"], r["step"], r["loss"], r["iou"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_root):
    """The uninterrupted run, checkpointed after every step."""
    root = tmp_path_factory.mktemp("reference")
    proc = launch(root, flags(root, synthetic_root, save_freq=1))
    wait_for_first_step(proc)
    t0 = time.time()
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    run = the_run(root / "ckpt")
    ckpts = {load_checkpoint(p)["step"]: load_checkpoint(p) for p in list_checkpoints(run)}
    assert sorted(ckpts) == list(range(1, MAX_ITERS + 1))
    # seconds from the first step's log line to the end: the span random signals are drawn from
    return {"ckpts": ckpts, "curves": curves(root / "logs", run.name), "seconds": time.time() - t0}


def assert_same_tensors(a, b, where):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_checkpoint_of_completed_step(got: dict, ref: dict, rng: bool = True):
    """Exactly the uninterrupted run's state after that step: weights and buffers (BatchNorm running
    statistics, num_batches_tracked), optimiser, schedule, loader positions and RNG."""
    assert got["step"] == ref["step"]
    for key in ("model", "optimizer", "scheduler", "data", "nonfinite_total") + (("rng",) if rng else ()):
        assert_same_tensors(got[key], ref[key], key)


def resume_and_compare(root: Path, run: Path, reference):
    rc, out = finish(launch(root, {"resume": str(run), "log_dir": str(root / "logs")}))
    assert rc == 0, out[-3000:]
    assert curves(root / "logs", run.name) == reference["curves"]
    assert not list(run.glob(".*tmp*"))


def test_sigterm_mid_step_keeps_the_last_completed_step_exactly(tmp_path, synthetic_root, reference):
    # SIGTERM to the group before the second micro-batch of step 3: the first one has already moved
    # the BatchNorm statistics, and the loader worker gets the signal too
    proc = launch(tmp_path, flags(tmp_path, synthetic_root), signal_at="micro:3:1:SIGTERM")
    rc, out = finish(proc)
    assert rc == EXIT_RESUMABLE, out[-3000:]
    assert "stopped by SIGTERM at step 2" in out
    run = the_run(tmp_path / "ckpt")
    assert [p.name for p in list_checkpoints(run)] == ["model-000000002.pth"]
    assert not list(run.glob(".*tmp*"))
    got = load_checkpoint(run / "model-000000002.pth")
    assert got["val_pending"] is False
    assert_checkpoint_of_completed_step(got, reference["ckpts"][2])
    resume_and_compare(tmp_path, run, reference)


def test_sigint_during_validation_redoes_it_on_resume(tmp_path, synthetic_root, reference):
    # Ctrl-C between the two val batches at step 4: step 4 is complete, its validation is not
    proc = launch(tmp_path, flags(tmp_path, synthetic_root), signal_at="val:4:1:SIGINT")
    rc, out = finish(proc)
    assert rc == EXIT_RESUMABLE, out[-3000:]
    assert "stopped by SIGINT at step 4 (its validation is redone on resume)" in out
    run = the_run(tmp_path / "ckpt")
    got = load_checkpoint(list_checkpoints(run)[-1])
    ref4 = reference["ckpts"][4]
    assert got["step"] == 4 and got["val_pending"] is True
    for key in ("model", "optimizer", "scheduler", "nonfinite_total"):
        assert_same_tensors(got[key], ref4[key], key)
    assert got["data"]["train"] == ref4["data"]["train"]
    # the val cursor as it was before that validation started (as the reference had it after step 3)
    assert got["data"]["val"] == reference["ckpts"][3]["data"]["val"] != ref4["data"]["val"]
    resume_and_compare(tmp_path, run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("signal_at, step", [("save:2:0:SIGTERM", 2), ("save:2:0:SIGINT", 2),
                                             ("update:3:0:SIGTERM", 3), ("micro:1:0:SIGINT", 0)])
def test_signal_during_save_update_or_before_first_step(tmp_path, synthetic_root, reference, signal_at, step):
    # during the periodic save of step 2 (it completes and loads), during the optimiser update of
    # step 3 (the step completes), before the first step (nothing to save, no --resume advice)
    proc = launch(tmp_path, flags(tmp_path, synthetic_root, save_freq=2), signal_at=signal_at)
    rc, out = finish(proc)
    assert rc == EXIT_RESUMABLE, out[-3000:]
    run = the_run(tmp_path / "ckpt")
    assert not list(run.glob(".*tmp*"))
    if step == 0:
        assert list_checkpoints(run) == [] and "--resume" not in out
        return
    assert [p.name for p in list_checkpoints(run)] == [f"model-{s:09d}.pth" for s in sorted({2, step})]
    assert_checkpoint_of_completed_step(load_checkpoint(list_checkpoints(run)[-1]), reference["ckpts"][step])
    resume_and_compare(tmp_path, run, reference)


@pytest.mark.slow
def test_signals_at_random_moments(tmp_path, synthetic_root, reference):
    # Whatever moment the signal lands in (loading, forward, backward, update, logging, validation,
    # saving), the newest checkpoint is a completed step identical to the reference's, and the resumed
    # run's curves are the reference's.
    rnd = random.Random(int(os.environ.get("BEVTRAIN_FAULT_SEED", "13")))
    stopped_at = []
    for trial in range(4):
        root = tmp_path / f"trial{trial}"
        sig = rnd.choice([signal.SIGTERM, signal.SIGINT])
        root.mkdir()
        proc = launch(root, flags(root, synthetic_root, save_freq=3))
        wait_for_first_step(proc)  # from then on there is a completed step to keep
        time.sleep(rnd.uniform(0.0, 0.9 * reference["seconds"]))
        os.killpg(proc.pid, sig)
        rc, out = finish(proc)
        run = the_run(root / "ckpt")
        assert not list(run.glob(".*tmp*"))
        if rc != EXIT_RESUMABLE:
            # the signal came after the loop had ended (the handlers are gone then): the run is complete
            assert rc in (0, -sig), out[-3000:]
            assert list_checkpoints(run)[-1].name == f"model-{MAX_ITERS:09d}.pth"
            assert curves(root / "logs", run.name) == reference["curves"]
            continue
        got = load_checkpoint(list_checkpoints(run)[-1])
        stopped_at.append((sig.name, got["step"], got["val_pending"]))
        ref = reference["ckpts"][got["step"]]
        if got["val_pending"]:
            assert_same_tensors(got["model"], ref["model"], "model")
            assert got["data"]["val"] == reference["ckpts"][got["step"] - 1]["data"]["val"]
        else:
            assert_checkpoint_of_completed_step(got, ref)
        resume_and_compare(root, run, reference)
    print("stopped at (signal, step, val pending):", stopped_at)
    assert stopped_at, "every signal came after the run had finished: nothing was tested"


def test_a_stop_is_acknowledged_at_once_and_a_second_signal_stops_now(tmp_path, synthetic_root, reference):
    """Issue 25 item 4: a step that takes long (here a stall inside the forward of step 3, which Python
    signal handlers wait out as they wait out a long torch operation). The first SIGTERM is answered at
    once; the second stops within seconds, saving step 2 exactly as the uninterrupted run had it, and
    the resumed run's curves are the uninterrupted run's."""
    proc = launch(tmp_path, flags(tmp_path, synthetic_root), signal_at="forward:3:0:STALL120")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[test] stalling"):
            break
    else:
        raise AssertionError("".join(lines[-20:]))

    def read_until(fragment: str) -> float:
        t0 = time.monotonic()
        for line in proc.stdout:  # a stalled process prints nothing else: this returns on the line
            lines.append(line)
            if fragment in line:
                return time.monotonic() - t0
        raise AssertionError("".join(lines[-20:]))

    os.killpg(proc.pid, signal.SIGTERM)
    assert read_until("SIGTERM received: stopping at the end of the current micro-batch or step") < 10
    ack = lines[-1]
    assert "saving the last completed step (2)" in ack and "send it again to stop now" in ack
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    rc, out = finish(proc, timeout=60)
    assert time.monotonic() - t0 < 30  # not the 120 s the step would still take
    assert rc == EXIT_RESUMABLE, "".join(lines) + out
    assert "SIGTERM again: stopping now" in out and "checkpoint saved to" in out
    run = the_run(tmp_path / "ckpt")
    assert [p.name for p in list_checkpoints(run)] == ["model-000000002.pth"]
    assert not list(run.glob(".*tmp*"))
    assert_checkpoint_of_completed_step(load_checkpoint(run / "model-000000002.pth"), reference["ckpts"][2])
    resume_and_compare(tmp_path, run, reference)
