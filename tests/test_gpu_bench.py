"""benchmarks/gpu.py in dry mode (the GPU command's every code path on the CPU), its guards, and the
``compile`` flag of training and evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bevtrain.build import compile_model
from bevtrain.config import ConfigError
from bevtrain.evaluate import evaluate
from bevtrain.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
GPU_BENCH = REPO / "benchmarks" / "gpu.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu as gpu_bench  # noqa: E402
import model as model_bench  # noqa: E402


def run_dry(tmp_path, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(GPU_BENCH), "--dry", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    return res, (tmp_path / "out" / "results.md").read_text(), proc.stdout


def val_split_size(root: Path) -> int:
    """Samples of mini_val, counted from the tables and the devkit's split list."""
    from nuscenes.utils.splits import create_splits_scenes

    val = set(create_splits_scenes()["mini_val"])
    scenes = json.loads((Path(root) / "v1.0-mini" / "scene.json").read_text())
    return sum(s["nbr_samples"] for s in scenes if s["name"] in val)


def check_train_and_eval(res, data_root, batch=2, grad_acc=2, warmup=1):
    t = res["train"]
    records = [json.loads(x) for x in open(Path(t["log_dir"]) / "train_log.jsonl")]
    steady = [r for r in records if r.get("split") == "train" and r["step"] > warmup]
    assert t["steps_done"] == records[-1]["step"] and t["steady_steps"] == len(steady)
    step_s = sum(r["step_time"] for r in steady)  # log_freq 1: one record per step
    assert t["samples_per_s"] == pytest.approx(batch * grad_acc * len(steady) / step_s)
    assert t["data_wait_fraction"] == pytest.approx(sum(r["data_time"] for r in steady) / step_s)
    assert 0 <= t["data_wait_fraction"] < 1
    assert Path(t["checkpoint"]).is_file()
    e = res["eval"]
    assert "error" not in e, e
    assert e["samples"] == val_split_size(data_root) and e["samples_per_s"] > 0
    assert e["step"] == t["steps_done"]


def test_dry_run_times_the_model_trains_and_evaluates(tmp_path, synthetic_root):
    res, md, stdout = run_dry(tmp_path, "--data_dir", str(synthetic_root), "--rows", "bf16_compile:sparse")
    (row,) = res["model"]
    assert "error" not in row, row
    assert (row["mode"], row["lift"], row["batch"], row["optimizer"]) == ("bf16_compile", "sparse", 2, True)
    assert row["iters"] >= 1 and row["ms_per_iter"] > 0 and row["peak_mem_mb"] > 0
    assert row["samples_per_s"] == pytest.approx(1000 * row["batch"] / row["ms_per_iter"])
    assert row["compiled_graphs"] > 0, "the compile row ran without torch.compile"
    assert "--_child" in (tmp_path / "out" / "model.log").read_text()

    t = res["train"]
    assert t["status"] == "finished" and t["steps_done"] == 3 and t["steady_steps"] == 2
    check_train_and_eval(res, synthetic_root)
    assert res["meta"]["missing_imports"] == [] and res["data"]["source"] == "given"

    # one table, printed last and written: a header, the model row, training, evaluation
    table = [x for x in md.splitlines() if x.startswith("| ")]
    assert len(table) == 4 and table[1].startswith("| model step, bf16 + torch.compile, sparse lift")
    assert table[2].startswith("| train, 3 steps") and table[3].startswith("| eval, val split")
    assert stdout.rstrip().endswith(md.rstrip())


def test_failed_rows_are_reported_not_raised(tmp_path):
    spec = dict(setting="tiny", mode="bf16_compile", lift="sparse", iters=1, warmup=1, batch=1,
                optimizer=True, budget_s=0.0, compile_backend="no_such_backend")
    log = tmp_path / "rows.log"
    bad = model_bench.run_row(spec, "cpu", timeout_s=300, log=str(log))
    assert "compile_backend" in bad["error"] and "no_such_backend" in bad["error"]
    assert "ConfigError" in log.read_text()  # the child's traceback is kept
    slow = model_bench.run_row(dict(spec, mode="fp32"), "cpu", timeout_s=0.5)
    assert slow["error"].startswith("timed out") and slow["mode"] == "fp32"
    md = gpu_bench.render_markdown({"profile": "dry", "meta": {}, "model": [bad, slow]})
    assert md.count("| model step,") == 2 and "timed out after" in md and "no_such_backend" in md


def tiny_flags(tmp_path, root, **over):
    flags = dict(
        data_dir=str(root), dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25,
        Z=32, Y=4, X=32, latent_dim=16, batch_size=1, grad_acc=2, max_iters=2, log_freq=1, do_val=False,
        save_freq=2, nworkers=0, viz_freq=0, seed=0, exp_name="c", log_dir=str(tmp_path / "logs"),
        ckpt_dir=str(tmp_path / "ckpt"),
    )
    flags.update(over)
    return flags


def test_compile_flag_traces_the_model_and_keeps_the_numbers(tmp_path, synthetic_root):
    from torch._dynamo.utils import counters

    plain = train_main(**tiny_flags(tmp_path, synthetic_root))
    torch._dynamo.reset()
    counters.clear()
    compiled = train_main(**tiny_flags(tmp_path, synthetic_root, compile=True, compile_backend="eager"))
    assert counters["stats"]["unique_graphs"] > 0, "training ran without torch.compile"
    losses = [[r["loss"] for r in run["history"]] for run in (plain, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # the checkpoint holds the plain model's parameter names, loadable without compiling
    state = torch.load(compiled["checkpoint"], weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)

    kw = dict(init_dir=compiled["ckpt_dir"], viz_every=0, tensorboard=False, nworkers=0)
    ref = evaluate(metrics_path=str(tmp_path / "m0.json"), **kw)
    torch._dynamo.reset()
    counters.clear()
    comp = evaluate(metrics_path=str(tmp_path / "m1.json"), compile=True, compile_backend="eager", **kw)
    assert counters["stats"]["unique_graphs"] > 0, "evaluation ran without torch.compile"
    assert comp["iou"] == pytest.approx(ref["iou"], abs=1e-6)


def test_unknown_compile_backend_names_the_flag():
    with pytest.raises(ConfigError, match="compile_backend.*nope"):
        compile_model(torch.nn.Linear(2, 2), "nope")


@pytest.mark.slow
def test_dry_run_whole(tmp_path):
    """The whole dry command: generating a tiny set, all model rows, training, evaluation."""
    res, md, _ = run_dry(tmp_path, timeout=1800)
    assert res["data"]["source"] == "generated" and "error" not in res["data"]
    rows = {(r["mode"], r["lift"], r["classes"]): r for r in res["model"]}
    assert set(rows) == set(gpu_bench.FULL_ROWS)
    assert not [r["error"] for r in rows.values() if "error" in r]
    check_train_and_eval(res, res["data"]["data_dir"])
    assert md.count("| model step,") == len(gpu_bench.FULL_ROWS)
    assert "x the time and" in md  # the multiclass row against the vehicle row


@pytest.mark.slow
def test_training_over_its_time_limit_stops_with_a_checkpoint_and_eval_still_runs(tmp_path, synthetic_root):
    # budget 100 s, 40 s of it kept for eval: training gets SIGTERM about 55 s after it starts
    res, md, _ = run_dry(tmp_path, "--data_dir", str(synthetic_root), "--rows", "none", "--steps", "100000",
                         "--budget", "100")
    t = res["train"]
    assert res["model"] == []
    assert "SIGTERM" in t["note"] and t["status"] == "signalled" and 1 <= t["steps_done"] < 100000
    assert Path(t["checkpoint"]).is_file()
    assert res["eval"]["samples"] == val_split_size(synthetic_root)
    assert "stopped by SIGTERM" in md


def test_multiclass_rows_are_set_against_the_vehicle_row():
    assert model_bench.class_set("multiclass")[:2] == ["vehicle", "pedestrian"]
    assert len(model_bench.class_set("multiclass")) == 8
    common = dict(setting="paper", mode="bf16", lift="sparse", batch=8, iters=5, first_ms=900.0)
    rows = [dict(common, classes="vehicle", ms_per_iter=400.0, samples_per_s=20.0, peak_mem_mb=1000.0),
            dict(common, classes="multiclass", ms_per_iter=410.0, samples_per_s=19.5, peak_mem_mb=1100.0)]
    md = gpu_bench.render_markdown({"profile": "full", "meta": {}, "model": rows})
    multi = [line for line in md.splitlines() if "multiclass (8 classes)" in line]
    assert len(multi) == 1 and "1.025x the time and 1.100x the memory of [vehicle]" in multi[0]
    assert gpu_bench.parse_row("bf16:sparse") == ("bf16", "sparse", "vehicle")
    assert ("bf16", "sparse", "multiclass") in gpu_bench.FULL_ROWS[:2]
