"""The training front door on the synthetic set: run folders, event tags, checkpoints, exact resume,
non-finite guard, interruption, two-process DDP."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bevtrain import train as train_mod
from bevtrain.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from bevtrain.config import ConfigError, resolve_config
from bevtrain.distributed import per_rank_batch
from bevtrain.train import NonFiniteLossError, main

REPO = Path(__file__).resolve().parents[1]
RUN_RE = r"^{b}x{g}_3e-4s_{name}_\d\d:\d\d:\d\d(_\d+)?$"


def tiny(tmp_path, root, **over):
    """A model and grid small enough for a step in well under a second on one core."""
    flags = dict(
        data_dir=str(root), dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25,
        Z=32, Y=4, X=32, latent_dim=16, batch_size=1, grad_acc=2, max_iters=4, log_freq=1, val_freq=2,
        val_batches=1, save_freq=2, keep_latest=1, nworkers=0, viz_freq=0, seed=0, exp_name="t",
        log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ckpt"),
    )
    flags.update(over)
    return flags


def train_log(run_log_dir):
    return [json.loads(line) for line in open(Path(run_log_dir) / "train_log.jsonl")]


def scalar_tags(event_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return acc, set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


def test_short_run_writes_named_folders_events_and_checkpoints(tmp_path, synthetic_root):
    res = main(**tiny(tmp_path, synthetic_root, max_iters=6, keep_latest=2, viz_freq=6, exp_name="short"))
    name = res["run_name"]
    assert re.match(RUN_RE.format(b=1, g=2, name="short"), name), name
    log_run, ckpt_run = tmp_path / "logs" / name, tmp_path / "ckpt" / name
    for folder in (log_run, ckpt_run):
        assert {"config.yaml", "command.txt", "version.txt"} <= {p.name for p in folder.iterdir()}
    assert "bevtrain" in (ckpt_run / "version.txt").read_text()

    acc, tags, images = scalar_tags(log_run / "t")
    expected = {"loss", "loss/ce", "loss/center", "loss/offset", "iou", "lr", "time/data", "time/step",
                "samples_per_s"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert images, "BEV images at viz_freq"
    acc_v, tags_v, _ = scalar_tags(log_run / "v")
    assert {"loss", "iou", "loss/ce"} <= tags_v
    assert [e.step for e in acc_v.Scalars("iou")] == [2, 4, 6]

    # saved at save_freq=2 (steps 2, 4, 6); keep_latest=2 leaves the newest two
    assert [p.name for p in list_checkpoints(ckpt_run)] == ["model-000000004.pth", "model-000000006.pth"]
    ckpt = load_checkpoint(ckpt_run / "model-000000006.pth")
    assert ckpt["step"] == 6 and ckpt["run_name"] == name and ckpt["config"]["max_iters"] == 6
    assert ckpt["data"]["train"] == {"epoch": 0, "consumed": 12}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(ckpt)

    # a second run in the same second gets a distinct name
    again = main(**tiny(tmp_path, synthetic_root, max_iters=1, do_val=False, exp_name="short"))
    names = {name, again["run_name"]}
    assert len(names) == 2


def _losses(res_or_dir):
    return [(r["split"], r["step"], r["loss"], r["iou"]) for r in train_log(res_or_dir)]


@pytest.mark.parametrize("nworkers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_continues_the_same_run(tmp_path, synthetic_root, nworkers):
    # shuffled train order and random augmentation: the resumed half must see the same data
    flags = tiny(tmp_path, synthetic_root, max_iters=6, nworkers=nworkers, save_freq=100)
    straight = main(**{**flags, "exp_name": "straight"})
    first = main(**{**flags, "ckpt_dir": str(tmp_path / "ckpt2"), "exp_name": "split"}, stop_at=3)
    assert first["status"] == "stopped" and first["step"] == 3
    second = main(resume=True, ckpt_dir=str(tmp_path / "ckpt2"), log_dir=str(tmp_path / "logs"))
    assert second["run_name"] == first["run_name"] and second["step"] == 6
    a, b = _losses(straight["log_dir"]), _losses(second["log_dir"])
    assert len(a) == len(b) == 9  # 6 train + 3 val records
    assert a == b


def _lrs(res):
    return {r["step"]: r["lr"] for r in train_log(res["log_dir"]) if r["split"] == "train"}


@pytest.mark.parametrize("changed", [
    {"max_iters": 7},
    {"max_iters": 7, "lr": 1e-3},
    {"max_iters": 7, "use_scheduler": False},
])  # fmt: skip
def test_resume_with_new_schedule_flags_ends_as_a_run_launched_with_them(tmp_path, synthetic_root, capsys,
                                                                         changed):
    """Issue 25 item 2: --resume --max_iters=N on a finished run kept the old one-cycle total (old
    max_iters + 100), so the learning rate past it sat near 0. The schedule is rebuilt from the new
    flags at the position reached: every step after the resume has the lr of a run launched with them."""
    flags = tiny(tmp_path, synthetic_root, max_iters=3, grad_acc=1, save_freq=100, do_val=False, lr=2e-3)
    first = main(**{**flags, "exp_name": "short"})
    capsys.readouterr()
    resumed = main(resume=first["ckpt_dir"], log_dir=flags["log_dir"], **changed)
    said = capsys.readouterr().out
    launched = main(**{**flags, **changed, "exp_name": "long", "ckpt_dir": str(tmp_path / "ckpt_long")})
    assert resumed["step"] == launched["step"] == 7
    got, want = _lrs(resumed), _lrs(launched)
    assert [got[s] for s in range(4, 8)] == [want[s] for s in range(4, 8)]
    assert "schedule rebuilt for max_iters 3 -> 7" in said and "from here on as a run launched with" in said
    ckpt = load_checkpoint(list_checkpoints(first["ckpt_dir"])[-1])
    if changed.get("use_scheduler", True):
        assert ckpt["scheduler"]["total_steps"] == 107  # saved: the rebuilt schedule, for the next resume


def test_a_resumed_run_ends_with_a_validation(tmp_path, synthetic_root):
    """Item 11: the last step is validated even when val_freq does not divide max_iters, resumed or not."""
    flags = tiny(tmp_path, synthetic_root, max_iters=5, val_freq=4, save_freq=100)
    first = main(**flags, stop_at=2)
    resumed = main(resume=first["ckpt_dir"], log_dir=flags["log_dir"])
    assert [r["step"] for r in train_log(resumed["log_dir"]) if r["split"] == "val"] == [4, 5]
    assert resumed["last_val"]["step"] == 5


def test_nonfinite_loss_skips_steps_then_stops_with_checkpoint(tmp_path, synthetic_root, monkeypatch):
    real = train_mod.compute_losses
    calls = {"n": 0}

    def nan_after_first_step(out, batch, model):
        loss, parts = real(out, batch, model)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), parts  # step 1 fine, then NaN

    monkeypatch.setattr(train_mod, "compute_losses", nan_after_first_step)
    flags = tiny(tmp_path, synthetic_root, max_iters=10, max_nonfinite=3, do_val=False, save_freq=100)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row at step 4"):
        main(**flags)
    (run,) = (tmp_path / "ckpt").iterdir()
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    assert ckpt["step"] == 4 and ckpt["nonfinite_total"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    records = train_log(tmp_path / "logs" / run.name)
    assert [r["nonfinite_total"] for r in records] == [0, 1, 2, 3]


def test_interrupt_saves_checkpoint_and_resume_matches(tmp_path, synthetic_root, monkeypatch):
    flags = tiny(tmp_path, synthetic_root, max_iters=4, save_freq=100, val_freq=100)
    straight = main(**{**flags, "exp_name": "straight"})
    real = train_mod.forward
    calls = {"n": 0}

    def interrupt_in_step_3(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # second micro-batch of step 3 (grad_acc 2)
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(train_mod, "forward", interrupt_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(**{**flags, "ckpt_dir": str(tmp_path / "ckpt2"), "exp_name": "ctrlc"})
    monkeypatch.setattr(train_mod, "forward", real)
    (run,) = (tmp_path / "ckpt2").iterdir()
    assert [p.name for p in list_checkpoints(run)] == ["model-000000002.pth"]
    resumed = main(resume=str(run), log_dir=str(tmp_path / "logs"))
    assert _losses(resumed["log_dir"]) == _losses(straight["log_dir"])


def test_corrupt_checkpoint_on_resume_names_the_file(tmp_path, synthetic_root):
    run = tmp_path / "ckpt" / "1x2_3e-4s_t_00:00:00"
    run.mkdir(parents=True)
    bad = run / "model-000000002.pth"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        main(**tiny(tmp_path, synthetic_root, resume=True))


def test_global_batch_must_divide_across_ranks():
    assert per_rank_batch(8, 4) == 2
    with pytest.raises(ConfigError, match="must divide by the number of processes \\(3\\)"):
        per_rank_batch(8, 3)


def _torchrun(tmp_path, flags, nproc):
    args = [f"--{k}={v}" for k, v in flags.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train_nuscenes.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process(tmp_path, synthetic_root):
    # Deterministic data (no augmentation, fixed order). The single process runs the same 4 samples
    # per step as 4 micro-batches of 1 (batch 1 x grad_acc 4) that the two ranks run as 2 x 2 (global
    # batch 2 x grad_acc 2), so BatchNorm sees one sample per forward in both and the averaged
    # gradients are the same sums: train losses agree to float rounding. Val uses BatchNorm running
    # statistics, which rank 0 gathers from half as many forwards, so val only agrees roughly.
    flags = tiny(tmp_path, synthetic_root, max_iters=3, val_freq=3, shuffle=False,
                 rand_flip=False, rand_crop_and_resize=False, do_shuffle_cams=False,
                 device="cpu", save_freq=3)
    single = main(**{**flags, "batch_size": 1, "grad_acc": 4, "exp_name": "single"})
    _torchrun(tmp_path, {**flags, "batch_size": 2, "grad_acc": 2, "exp_name": "ddp"}, nproc=2)
    (ddp_dir,) = [p for p in (tmp_path / "logs").iterdir() if "_ddp_" in p.name]
    a, b = _losses(single["log_dir"]), _losses(ddp_dir)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        assert y[2] == pytest.approx(x[2], rel=1e-4 if x[0] == "train" else 3e-2), (x, y)
    (ckpt_run,) = [p for p in (tmp_path / "ckpt").iterdir() if "_ddp_" in p.name]
    ckpt = load_checkpoint(list_checkpoints(ckpt_run)[-1])
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_missing_imagenet_weights_stop_the_run_before_any_data(tmp_path, synthetic_root, monkeypatch):
    """Empty hub cache, no network: the run stops with the URL and cache path before it reads data
    (a data_dir without tables would be the error otherwise) and before any run folder; a data_dir
    that does not exist is said first, before any download is tried."""
    import socket

    from bevtrain.data.index import DataLayoutError
    from bevtrain.model.encoders import WeightsUnavailableError

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        (tmp_path / "empty").mkdir()
        flags = tiny(tmp_path, synthetic_root, encoder_weights="imagenet", data_dir=str(tmp_path / "empty"))
        with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth"):
            main(**flags)
        # with the weights on purpose off, the same flags fail on the data instead
        with pytest.raises(DataLayoutError, match="empty"):
            main(**{**flags, "encoder_weights": "none"})
        with pytest.raises(ConfigError, match="absent does not exist"):
            main(**{**flags, "data_dir": str(tmp_path / "absent")})
    finally:
        torch.hub.set_dir(previous)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


def test_grad_clip_clips_the_micro_batch_sum_as_simple_bev(tmp_path, synthetic_root, monkeypatch):
    """Simple-BEV summed the gradients of its grad_acc micro-batches and clipped the sum at grad_clip;
    we average. In the real loop, the gradient handed to the optimiser times grad_acc must equal
    Simple-BEV's clipped sum (= grad_acc x our average before clipping, then clipped at grad_clip)."""
    real_clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def observed_clip(parameters, max_norm, *args, **kwargs):
        params = [p for p in parameters if p.grad is not None]
        before = [p.grad.detach().clone() for p in params]
        norm = real_clip(params, max_norm, *args, **kwargs)
        seen.append((before, [p.grad.detach().clone() for p in params]))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", observed_clip)
    grad_acc, grad_clip = 3, 0.05  # small enough that every step is clipped
    main(**tiny(tmp_path, synthetic_root, grad_acc=grad_acc, grad_clip=grad_clip, max_iters=2, do_val=False))
    assert len(seen) == 2
    for before, after in seen:
        summed = [g * grad_acc for g in before]  # what Simple-BEV's un-divided loss gives
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in summed]))
        assert total > grad_clip * 2, "the test needs clipping to be active"
        scale = grad_clip / (total + 1e-6)  # torch's (and Simple-BEV's) clip_grad_norm_ rule
        for ours, sb_sum in zip(after, summed):
            torch.testing.assert_close(ours * grad_acc, sb_sum * scale, rtol=1e-4, atol=1e-9)


def test_grad_acc_averages_micro_batches_like_one_big_batch(tmp_path, synthetic_root, monkeypatch):
    """The optimiser sees the same gradient for grad_acc=k micro-batches of b as for one batch of k*b
    (the loss is divided by grad_acc; Simple-BEV summed instead, k times larger).

    What makes the identity exact: the losses are masked means over the whole batch, so a batch's mean
    equals the mean of its micro-batches' means only when every micro-batch has the same mask counts;
    BatchNorm in training mode mixes the samples of a forward. So the k*b samples here are one sample
    under different flips (images flipped, BEV mirrored: different inputs and targets, equal counts),
    and BatchNorm runs in eval mode. Clipping is off (grad_clip=0): this pins the normalisation only.
    """
    from bevtrain import build

    real_dataset, real_model = build.build_dataset, build.build_model
    epochs = [0, 1, 2, 3]  # sample 0 drawn at these epochs: four different flip draws

    class FlipsOfOneSample(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getattr__(self, name):
            return getattr(self.ds, name)

        def __getitem__(self, item):
            return self.ds[(0, epochs[item[0] % len(epochs)])]

    def dataset(cfg, split="train", is_train=True):
        return FlipsOfOneSample(real_dataset(cfg, split=split, is_train=is_train))

    def model_with_frozen_bn(cfg):
        model = real_model(cfg)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train = (lambda self, mode=True: torch.nn.Module.train(self, False)).__get__(m)
        return model

    grads, run = {}, {}

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            grads[run["key"]] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                           for p in params])
            return super().step(closure)

    monkeypatch.setattr(build, "build_dataset", dataset)
    monkeypatch.setattr(build, "build_model", model_with_frozen_bn)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    flags = tiny(tmp_path, synthetic_root, max_iters=1, do_val=False, shuffle=False, grad_clip=0.0,
                 rand_flip=True, rand_crop_and_resize=False, do_shuffle_cams=False, device="cpu")
    for key in [(1, 4), (2, 2), (4, 1)]:  # (batch_size, grad_acc)
        run["key"] = key
        main(**{**flags, "batch_size": key[0], "grad_acc": key[1], "exp_name": f"acc{key[1]}"})

    # the four micro-batches differ, with equal mask counts
    ds = FlipsOfOneSample(real_dataset(resolve_config(flags)[0], split="train", is_train=True))
    samples = [ds[(i, 0)] for i in range(4)]
    for a, b in zip(samples, samples[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in ("images", "cams_T_ref", "seg_bev"))
        for k in ("seg_bev", "valid_bev", "center_bev"):
            assert (a[k] > 0.5).sum() == (b[k] > 0.5).sum() and (a[k] > 0).sum() == (b[k] > 0).sum()
    big = grads[(4, 1)]
    for key in [(1, 4), (2, 2)]:
        rel = ((grads[key] - big).norm() / big.norm()).item()
        assert rel < 1e-4, (key, rel)


def test_loader_workers_are_gone_when_the_run_returns(tmp_path, synthetic_root):
    """Workers ignore SIGTERM (signals are the main process's business), so any left alive when a run
    returns would make the interpreter's exit wait on them forever: the run stops them itself."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    main(**tiny(tmp_path, synthetic_root, nworkers=2, max_iters=2))
    assert set(multiprocessing.active_children()) - before == set()


def test_several_classes_train_and_evaluate_with_a_table_per_protocol(tmp_path, synthetic_root, capsys):
    """Issue 23: a run on vehicle and two map layers logs iou/<class> (val also iou@max and mIoU), ends by
    printing the last validation's tables under the three protocols, and eval_nuscenes prints them again
    and writes them per class to metrics.json."""
    from bevtrain.evaluate import evaluate

    classes = ["vehicle", "drivable_area", "divider"]
    res = main(**tiny(tmp_path, synthetic_root, classes=classes, max_iters=2, exp_name="classes"))
    said = capsys.readouterr().out
    titles = ("Simple-BEV protocol", "LSS protocol", "BEVFusion protocol")
    tables = said[said.index("[bevtrain] last validation, step 2"):]
    assert all(title in tables for title in titles)
    assert {line.split()[0] for line in tables.splitlines() if line.split()} >= set(classes)
    val = [r for r in train_log(res["log_dir"]) if r["split"] == "val"][-1]
    logged = {f"iou/{c}" for c in classes} | {"iou@max/drivable_area", "iou@max/divider", "miou@max"}
    assert logged <= set(val)
    _, tags, _ = scalar_tags(Path(res["log_dir"]) / "v")
    assert {f"iou/{c}" for c in classes} <= tags

    summary = evaluate(init_dir=res["ckpt_dir"], viz_every=0, tensorboard=False,
                       metrics_path=str(tmp_path / "metrics.json"))
    said = capsys.readouterr().out
    assert all(title in said for title in titles)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["classes"] == summary["classes"] == classes
    assert {"simplebev", "lss", "bevfusion"} <= set(saved["per_class"]["drivable_area"])
    assert "bevfusion" not in saved["per_class"]["vehicle"]
    # One-class runs keep their last line and print no tables.
    one = main(**tiny(tmp_path, synthetic_root, max_iters=2, exp_name="one"))
    assert "last validation" not in capsys.readouterr().out and one["last_val"]["step"] == 2
