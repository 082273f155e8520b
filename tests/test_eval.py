"""Evaluation end to end on the synthetic val split: oracle/empty IoU, a trained checkpoint, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import socket
from pathlib import Path

import pytest
import torch

from bevtrain.build import build_dataset, build_vox_util
from bevtrain.checkpoint import CheckpointError
from bevtrain.config import ConfigError, resolve_config
from bevtrain.evaluate import EvalError, evaluate, find_checkpoint, run_split

make_loader = pytest.importorskip("bevtrain.data.dataset").make_loader

# A model and data small enough for CPU tests: 56x100 images, a 50x50 grid of 2 m cells.
TINY = dict(
    encoder_type="res18", encoder_weights="none", res_scale=0.25, Z=50, Y=4, X=50, latent_dim=16,
    batch_size=2, grad_acc=1, nworkers=0, device="cpu", dset="mini", amp="none",
)  # fmt: skip
VIZ_CELL = 160


def _tiny_cfg(root: Path, cache: Path, **kw):
    cfg, _ = resolve_config({**TINY, "data_dir": str(root), "cache_dir": str(cache), **kw})
    return cfg


def _val_sample_count(root: Path) -> int:
    """Samples of the mini val scenes, counted by the devkit (independent of our index)."""
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_scenes

    nusc = NuScenes("v1.0-mini", dataroot=str(root), verbose=False)
    val_scenes = set(create_splits_scenes()["mini_val"])
    return sum(s["nbr_samples"] for s in nusc.scene if s["name"] in val_scenes)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_index_cache")


@pytest.fixture(scope="module")
def val_loader(synthetic_root, cache):
    cfg = _tiny_cfg(synthetic_root, cache)
    ds = build_dataset(cfg, split="val", is_train=False)
    return cfg, ds, make_loader(ds, 2, 0, shuffle=False, is_train=False)


def test_oracle_gets_one_and_empty_gets_zero_on_synthetic_val(val_loader, synthetic_root):
    cfg, ds, loader = val_loader
    vox_util = build_vox_util(cfg)
    n = len(ds)
    assert n == _val_sample_count(synthetic_root)
    cpu = torch.device("cpu")

    def oracle(batch):  # ground truth as logits through the same metric path
        return torch.where(batch["seg_bev"] > 0.5, 20.0, -20.0)

    def empty(batch):
        return torch.full_like(batch["seg_bev"], -20.0)

    res = run_split(loader, oracle, n, vox_util, cpu)
    assert res["samples"] == n
    r = res["result"]
    assert r["samples"] == n
    for protocol in ("simplebev", "lss"):
        assert r[protocol]["union"] > 0
        assert r[protocol]["iou"] == 1.0
        for band in r[protocol]["bands"].values():
            assert band["union"] == 0 or band["iou"] == 1.0
    # The synthetic set has low-visibility vehicles: the protocols score different pixels.
    assert r["simplebev"]["union"] < r["lss"]["union"]

    r0 = run_split(loader, empty, n, vox_util, cpu)["result"]
    assert r0["simplebev"]["iou"] == 0.0 and r0["lss"]["iou"] == 0.0
    assert r0["lss"]["union"] == r["lss"]["union"]  # the union is the ground truth alone


def test_every_sample_exactly_once(val_loader):
    cfg, ds, _ = val_loader
    n = len(ds)
    vox_util = build_vox_util(cfg)
    cpu = torch.device("cpu")

    def oracle(batch):
        return torch.where(batch["seg_bev"] > 0.5, 20.0, -20.0)

    # A sampler that pads with duplicates (like DistributedSampler): duplicates count once.
    padded = torch.utils.data.DataLoader(ds, batch_size=3, sampler=list(range(n)) + [0, 1])
    res = run_split(padded, oracle, n, vox_util, cpu)
    assert res["samples"] == n and res["result"]["samples"] == n
    # A loader that drops samples (drop_last) cannot pass for the split.
    dropping = torch.utils.data.DataLoader(ds, batch_size=3, sampler=list(range(n)), drop_last=True)
    assert n % 3 != 0
    with pytest.raises(EvalError, match="no turn"):
        run_split(dropping, oracle, n, vox_util, cpu)


def test_progress_in_a_log_shows_each_tenth(val_loader, capfd):
    cfg, ds, loader = val_loader
    n = len(ds)
    empty = lambda b: torch.full_like(b["seg_bev"], -20.0)  # noqa: E731
    run_split(loader, empty, n, build_vox_util(cfg), torch.device("cpu"), show_progress=True)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[eval] |")]
    # stderr is not a terminal here: a line for the first batch and for each further tenth reached.
    shown = [int(line.split("| ")[1].split("/")[0]) for line in lines]
    per_batch = list(range(2, n, 2)) + [n]  # batch size 2
    expected = [d for i, d in enumerate(per_batch) if i == 0 or 10 * d // n > 10 * per_batch[i - 1] // n]
    assert shown == expected and len(shown) > 2
    assert f"{n}/{n} 100.0%" in lines[-1] and "samples/s" in lines[-1] and "ETA" in lines[-1]


@pytest.fixture(scope="module")
def trained_run(synthetic_root, cache, tmp_path_factory):
    """A checkpoint from a 2-step training run of the real training loop (and what it printed)."""
    from bevtrain.train import main as train_main

    root = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_main(
            **TINY, data_dir=str(synthetic_root), cache_dir=str(cache), max_iters=2, do_val=False,
            viz_freq=0, log_freq=1, save_freq=2, exp_name="evaltest", ckpt_dir=str(root / "ckpt"),
            log_dir=str(root / "logs"),
        )  # fmt: skip
    runs = [p for p in (root / "ckpt").iterdir() if p.is_dir()]
    assert len(runs) == 1
    (root / "train_stdout.txt").write_text(printed.getvalue())
    return runs[0], root


def test_eval_of_a_trained_checkpoint_writes_metrics_and_pictures(trained_run, synthetic_root, cache):
    from PIL import Image

    run_dir, root = trained_run
    n = _val_sample_count(synthetic_root)
    summary = evaluate(
        init_dir=str(run_dir), viz_every=3, max_viz=4, viz_width=VIZ_CELL, gif_scale=0.5, nworkers=0,
        log_dir=str(root / "logs"), batch_size=3,  # 3 does not divide the split: no sample may be dropped
    )  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert n % 3 != 0
    assert metrics["samples"] == n == metrics["data"]["split_size"]
    assert metrics["step"] == 2 and metrics["checkpoint"].endswith("model-000000002.pth")
    assert metrics["data"]["split"] == "val" and metrics["config"]["encoder_type"] == "res18"
    for protocol in ("simplebev", "lss"):
        p = metrics["protocols"][protocol]
        assert 0 <= p["intersection"] <= p["union"]
        assert set(p["bands"]) == {"0-20m", "20-35m", "35-50m"}
    assert metrics["samples_per_s"] > 0
    assert any(note.startswith("batch_size: 2 -> 3") for note in metrics["overrides"])

    # Composites of positions 0, 3, 6, ... (at most 4) of the expected size; one GIF per scene among them.
    pngs = [Path(p) for p in summary["pngs"]]
    assert sorted(int(p.stem.rsplit("__", 1)[1]) for p in pngs) == list(range(0, n, 3))[:4]
    assert all(p.is_file() for p in pngs)
    H, W = 56, 100  # res_scale 0.25
    expected_hw = (26 + 2 * round(H * VIZ_CELL / W) + 28 + VIZ_CELL + 48, 3 * VIZ_CELL)
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[::-1] == expected_hw
    scenes = {p.name.rsplit("__", 1)[0] for p in pngs}
    gifs = [Path(g) for g in summary["gifs"]]
    assert {g.stem for g in gifs} == scenes
    for g in gifs:
        with Image.open(g) as im:
            assert im.size == (round(expected_hw[1] * 0.5), round(expected_hw[0] * 0.5))
            assert im.n_frames == sum(p.name.startswith(g.stem + "__") for p in pngs)
    events = list((root / "logs" / run_dir.name).glob("eval-*-mini-val/events.out.tfevents.*"))
    assert events

    # --viz_only draws without scoring the split and leaves metrics.json alone.
    before = (run_dir / "metrics.json").read_text()
    only = evaluate(init_dir=str(run_dir), viz_only=True, viz_every=5, max_viz=2, viz_width=VIZ_CELL,
                    viz_dir=str(root / "vizonly"), tensorboard=False)  # fmt: skip
    assert only["samples"] == 2 and len(only["pngs"]) == 2 and "protocols" not in only
    assert (run_dir / "metrics.json").read_text() == before


def test_training_prints_a_working_eval_command_and_tensorboard_command(trained_run, synthetic_root):
    run_dir, root = trained_run
    lines = (root / "train_stdout.txt").read_text().splitlines()
    checkpoint = next(line.split(": ", 1)[1] for line in lines if line.startswith("[bevtrain] checkpoint: "))
    assert Path(checkpoint) == run_dir / "model-000000002.pth" and Path(checkpoint).is_file()
    eval_cmd = shlex.split(lines[lines.index(next(x for x in lines if "evaluate it" in x)) + 1])
    tb_cmd = shlex.split(lines[lines.index(next(x for x in lines if "TensorBoard" in x)) + 1])
    assert eval_cmd[:2] == ["python", "eval_nuscenes.py"] and tb_cmd[0] == "tensorboard"
    # The run alone: eval takes the data the run was trained on from its config (repeating
    # --data_dir/--dset would be reported as overrides).
    flags = dict(arg[2:].split("=", 1) for arg in eval_cmd[2:])
    assert flags == {"init_dir": str(run_dir)}
    summary = evaluate(**flags, viz_every=0, tensorboard=False, metrics_path=str(root / "pasted.json"))
    assert summary["checkpoint"] == str(Path(checkpoint).resolve()) and summary["samples"] > 0
    logdir = Path(tb_cmd[1].split("=", 1)[1])
    assert logdir == root / "logs" / run_dir.name and list((logdir / "t").glob("events.out.tfevents.*"))


def test_other_dataroots_and_splits_get_their_own_folders(trained_run, synthetic_root, tmp_path, capsys):
    """Two dataroots with the same scene names (here: the same folder name too) must not share
    composites, GIFs, metrics or TensorBoard folders; nor may two splits of one dataroot."""
    run_dir, root = trained_run
    twin = tmp_path / synthetic_root.name
    try:  # hard links: cheap, and nothing here writes into the data
        shutil.copytree(synthetic_root, twin, copy_function=os.link)
    except OSError:
        shutil.rmtree(twin, ignore_errors=True)
        shutil.copytree(synthetic_root, twin)
    kw = dict(init_dir=str(run_dir), viz_every=4, max_viz=2, viz_width=VIZ_CELL, nworkers=0,
              log_dir=str(root / "logs"))  # fmt: skip
    first = evaluate(**kw)
    printed = capsys.readouterr().out
    second = evaluate(**kw, data_dir=str(twin))
    train_split = evaluate(**kw, split="train", viz_only=True)
    folders = [Path(r["viz_dir"]) for r in (first, second, train_split)]
    assert len(set(folders)) == 3 and all(f.parent == run_dir for f in folders)
    assert folders[0].name.startswith("viz-000000002-" + synthetic_root.name + "-")
    assert folders[0].name.endswith("-mini-val") and folders[2].name.endswith("-mini-train")
    # The eval said where its pictures and metrics are.
    assert f"in {folders[0]}" in printed and f"metrics: {folders[0] / 'metrics.json'}" in printed
    for result, folder in zip((first, second), folders):
        pngs = sorted(Path(p) for p in result["pngs"])
        assert pngs and all(p.parent == folder and p.is_file() for p in pngs)
        assert all(Path(g).parent == folder for g in result["gifs"])
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["data"]["data_dir"] == result["data"]["data_dir"]
    # Same scenes, same names: both sets of composites survive, side by side.
    names = [sorted(Path(p).name for p in r["pngs"]) for r in (first, second)]
    assert names[0] == names[1]
    assert all(Path(p).is_file() for p in first["pngs"])
    assert json.loads((run_dir / "metrics.json").read_text())["data"]["data_dir"] == str(twin)
    assert first["tensorboard"] != second["tensorboard"]


def test_clear_errors(trained_run, synthetic_root, tmp_path):
    run_dir, _ = trained_run
    with pytest.raises(EvalError, match="--init_dir is required"):
        find_checkpoint("")
    with pytest.raises(EvalError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="it is empty"):
        find_checkpoint(str(tmp_path / "empty"))
    # The ckpt_dir instead of a run folder: the message names the run folders inside.
    with pytest.raises(EvalError, match=f"run folders inside it: .*{run_dir.name}"):
        find_checkpoint(str(run_dir.parent))
    with pytest.raises(EvalError, match=r"steps in .*: \[2\]"):
        find_checkpoint(str(run_dir), load_step=7)
    assert find_checkpoint(str(run_dir), load_step=2).name == "model-000000002.pth"

    # A misspelt flag: name the closest one.
    with pytest.raises(ConfigError, match="did you mean 'viz_every'"):
        evaluate(init_dir=str(run_dir), viz_evry=3)

    # A model setting that differs from the checkpoint's: say which.
    with pytest.raises(EvalError, match=r"latent_dim: 16 \(checkpoint\) vs 32 \(now\)"):
        evaluate(init_dir=str(run_dir), latent_dim=32, tensorboard=False, viz_every=0)
    # A checkpoint whose saved config does not match its weights.
    ckpt = torch.load(find_checkpoint(str(run_dir)), weights_only=True)
    ckpt["config"]["encoder_type"] = "res50"
    bad = tmp_path / "bad_run"
    bad.mkdir()
    torch.save(ckpt, bad / "model-000000002.pth")
    with pytest.raises(EvalError, match="does not match the model"):
        evaluate(init_dir=str(bad), tensorboard=False, viz_every=0)

    # Other classes than the checkpoint was trained on: both lists named (same count or not).
    for asked in (["pedestrian"], ["vehicle", "drivable_area"]):
        named = rf"trained on classes \['vehicle'\], but {re.escape(str(asked))} were asked"
        with pytest.raises(EvalError, match=named):
            evaluate(init_dir=str(run_dir), classes=asked, tensorboard=False, viz_every=0)
    with pytest.raises(EvalError, match=r"viz_class='lane' is not one of the model's classes \['vehicle'\]"):
        evaluate(init_dir=str(run_dir), viz_class="lane", tensorboard=False, viz_every=0)

    # data_dir without the split's tables.
    with pytest.raises(EvalError, match=r"has no v1.0-trainval/ .*pass --dset=mini"):
        evaluate(init_dir=str(run_dir), dset="trainval", tensorboard=False, viz_every=0)
    (tmp_path / "not_nuscenes").mkdir()
    with pytest.raises(EvalError, match="has no v1.0-mini/"):
        evaluate(
            init_dir=str(run_dir), data_dir=str(tmp_path / "not_nuscenes"), tensorboard=False, viz_every=0
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_rank(rank, world_size, port, run_dir, out_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    summary = evaluate(
        init_dir=run_dir, metrics_path=str(out_dir / "metrics.json"), viz_every=3, max_viz=3,
        viz_dir=str(out_dir / "viz"), viz_width=VIZ_CELL, tensorboard=False,
    )  # fmt: skip
    queue.put((rank, summary.get("protocols"), summary["samples"], sorted(summary["pngs"])))


@pytest.mark.slow
def test_two_ranks_give_the_single_process_numbers(trained_run, tmp_path):
    import torch.multiprocessing as mp

    run_dir, _ = trained_run
    single = evaluate(init_dir=str(run_dir), metrics_path=str(tmp_path / "single.json"), viz_every=0,
                      tensorboard=False)  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_eval_rank, args=(r, 2, port, str(run_dir), str(tmp_path), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    protocols, samples, pngs = results[0]
    assert samples == single["samples"]
    for protocol in ("simplebev", "lss"):
        for key in ("intersection", "union"):
            assert protocols[protocol][key] == single["protocols"][protocol][key]
    # Every rank knows every rank's composites (positions 0 and 6 on rank 0, 3 on rank 1).
    assert [int(Path(p).stem.rsplit("__", 1)[1]) for p in sorted(pngs, key=lambda p: Path(p).stem[-6:])] == [
        0,
        3,
        6,
    ]
    assert all(Path(p).is_file() for p in pngs)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["samples"] == single["samples"]


def _tally_rank(rank, world_size, port, loaders, queue):
    """One rank of run_split with the metric off (compute_metric=False, as --viz_only runs it), on
    tiny batches that carry only what the tally reads; one result per loader of dataset positions."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for positions in loaders:
            batches = [{"index": torch.tensor([i]), "seg_bev": torch.zeros(1, 1, 2, 2)}
                       for i in positions[rank]]  # fmt: skip
            try:
                run_split(batches, lambda b: b["seg_bev"], 4, None, torch.device("cpu"), compute_metric=False,
                          world_size=world_size)  # fmt: skip
                queue.put((rank, tuple(map(tuple, positions)), "ok"))
            except EvalError as e:
                queue.put((rank, tuple(map(tuple, positions)), str(e)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_sample_counted_on_two_ranks_is_an_error_without_the_metric():
    """The exactly-once tally across ranks stands alone when no metric runs (whose own sample count
    would otherwise also notice): position 2 on both ranks must stop evaluation; a clean split passes."""
    import torch.multiprocessing as mp

    clean, twice = ((0, 1), (2, 3)), ((0, 1, 2), (2, 3))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_tally_rank, args=(r, 2, port, [clean, twice], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    outcome = {(rank, loaders): message for rank, loaders, message in results}
    for rank in (0, 1):
        assert outcome[(rank, clean)] == "ok"
        assert "1 more than one (across ranks)" in outcome[(rank, twice)], outcome[(rank, twice)]


def test_target_raster_is_recorded_and_old_checkpoints_keep_exact(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    kw = dict(viz_every=0, tensorboard=False, nworkers=0)

    def run(init_dir, name, **flags):
        evaluate(init_dir=str(init_dir), metrics_path=str(tmp_path / name), **kw, **flags)
        return json.loads((tmp_path / name).read_text()), capsys.readouterr().out

    # Trained with the default: evaluated with it, and every number names it.
    sb, out = run(run_dir, "sb.json")
    assert sb["config"]["target_raster"] == sb["target_raster"] == "simplebev"
    for protocol in ("simplebev", "lss"):
        assert sb["protocols"][protocol]["label"].endswith(", simplebev raster")
        assert "simplebev target raster" in sb["protocols"][protocol]["description"]
    assert "Simple-BEV protocol (vis-1 ignored), simplebev raster" in out
    assert "LSS protocol (all boxes), simplebev raster" in out

    # A checkpoint saved before the flag existed was trained on the exact raster: use it, say so once.
    ckpt = torch.load(find_checkpoint(str(run_dir)), weights_only=True)
    del ckpt["config"]["target_raster"]
    old = tmp_path / "old_run"
    old.mkdir()
    torch.save(ckpt, old / "model-000000002.pth")
    legacy, out = run(old, "old.json")
    assert legacy["target_raster"] == "exact"
    assert legacy["protocols"]["lss"]["label"].endswith(", exact raster")
    assert out.count("has no 'target_raster' (saved before the flag existed): using 'exact'") == 1
    assert "exact raster" in out and "simplebev raster" not in out
    # Same weights, other ground truth: other counts.
    assert legacy["protocols"]["lss"]["union"] != sb["protocols"]["lss"]["union"]
    # The flag overrides it, and the override says the ground truth differs from training's.
    again, out = run(old, "old_sb.json", target_raster="simplebev")
    assert again["target_raster"] == "simplebev" and "has no 'target_raster'" not in out
    assert any("another rule than in training" in n for n in again["overrides"])
    for protocol in ("simplebev", "lss"):
        assert again["protocols"][protocol]["union"] == sb["protocols"][protocol]["union"]


def _eval_cli(args, cwd, timeout=300):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(repo / "eval_nuscenes.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_eval_flags_are_checked_like_trainings(trained_run, tmp_path):
    """Issue 25 item 6: a misspelt flag names the closest one (not '--init_dir is required'), a stray
    argument or a bad value is one error: line, --help describes every eval flag in plain words, and
    --init_dir takes a run name under --ckpt_dir as --resume does."""
    run_dir, root = trained_run
    for args, fragment in (
        (["--init_dri=x"], "unknown flag '--init_dri'; did you mean 'init_dir'?"),
        ([str(run_dir)], f"did you mean --init_dir={run_dir}?"),
        ([f"--init_dir={run_dir}", "--viz_every=often"], "flag 'viz_every' expects int"),
        ([f"--init_dir={run_dir}", "--split=test"], "flag 'split' must be one of"),
        (["--init_dir=nope", f"--ckpt_dir={run_dir.parent}"], f"newest runs there: {run_dir.name}"),
    ):
        r = _eval_cli(args, tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = _eval_cli(["--help"], tmp_path)
    assert r.returncode == 0
    from bevtrain.config import EVAL_FLAGS

    for flag in EVAL_FLAGS:
        at = r.stdout.index(f"  --{flag.name}=")
        assert r.stdout[at:].splitlines()[1].strip(), flag.name  # a description under each flag
    for internal in ("EvalOptions", "``", "Args:", "Returns"):
        assert internal not in r.stdout

    by_name = evaluate(init_dir=run_dir.name, ckpt_dir=str(run_dir.parent), viz_every=0, tensorboard=False,
                       metrics_path=str(tmp_path / "m.json"))  # fmt: skip
    assert by_name["checkpoint"] == str((run_dir / "model-000000002.pth").resolve())
    assert by_name["overrides"] == []  # ckpt_dir given with the run's own value: no override


def test_viz_only_writes_its_own_folder_and_tensorboard(trained_run, synthetic_root):
    """Issue 25 item 8: --viz_only drew over a full evaluation's pictures (a scene GIF of 4 frames
    became 6) and added TensorBoard images at the same step."""
    from PIL import Image

    run_dir, root = trained_run
    kw = dict(init_dir=str(run_dir), viz_width=VIZ_CELL, nworkers=0, log_dir=str(root / "logs"))
    full = evaluate(**kw, viz_every=4, max_viz=4)

    def folder_state():
        files = sorted(Path(full["viz_dir"]).iterdir())
        return [(p.name, p.stat().st_mtime_ns) for p in files], [Image.open(g).n_frames for g in full["gifs"]]

    before = folder_state()
    only = evaluate(**kw, viz_only=True, viz_every=1, max_viz=6)
    assert Path(only["viz_dir"]).name.startswith("viz_only-000000002-")
    assert Path(only["viz_dir"]).parent == run_dir and only["viz_dir"] != full["viz_dir"]
    assert folder_state() == before  # not a file of the full evaluation's folder touched
    assert only["tensorboard"] != full["tensorboard"] and only["tensorboard"].endswith("-viz_only")


def test_overrides_that_change_the_numbers_say_so(trained_run, tmp_path, capsys):
    """Issue 26 item 5: Z=100 on eval warned 'the checkpoint may not load', then scored on another grid
    without saying the numbers are not comparable. Issue 25 item 11: an empty distance band is no NaN
    curve in TensorBoard; --data_dir with the run's own value is no override."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, root = trained_run
    trained_data = json.loads(json.dumps(torch.load(run_dir / "model-000000002.pth")["config"]))["data_dir"]
    kw = dict(init_dir=str(run_dir), nworkers=0, viz_every=0, metrics_path=str(tmp_path / "m.json"),
              log_dir=str(tmp_path / "logs"))  # fmt: skip
    same = evaluate(**kw, data_dir=trained_data, tensorboard=False)
    assert not any(note.startswith("data_dir") for note in same["overrides"])
    assert same["comparable_with_training"] is True
    capsys.readouterr()
    other = evaluate(**kw, Z=40, bounds=[-15.0, 15.0, -5.0, 5.0, -15.0, 15.0])
    printed = capsys.readouterr().out
    assert other["comparable_with_training"] is False
    assert "[eval] override Z: 50 -> 40 (command line)  [another BEV grid than in training: numbers not " \
           "comparable to the run's own]" in printed
    assert "[eval] scored with Z, bounds other than in training: these numbers are not comparable" in printed
    assert json.loads((tmp_path / "m.json").read_text())["comparable_with_training"] is False
    bands = other["protocols"]["simplebev"]["bands"]
    assert bands["35-50m"]["union"] == 0  # nothing within 15 m is 35-50 m away
    acc = EventAccumulator(other["tensorboard"])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any(t.endswith("_0-20m") for t in tags) and not any(t.endswith("_35-50m") for t in tags)
    assert all(math.isfinite(e.value) for t in tags for e in acc.Scalars(t))


def test_corrupt_checkpoint_message_names_evals_own_flags(trained_run, tmp_path):
    """Issue 26 item 5: eval suggested --resume=<file.pth>, a training flag."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model-000000002.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError) as err:
        evaluate(init_dir=str(bad), viz_every=0, tensorboard=False)
    assert "--init_dir=<file.pth> or --load_step=<step>" in str(err.value)
    assert "--resume" not in str(err.value)
