"""Golden run: the first 20 training steps and the evaluation of their checkpoint, bit for bit.

Written before the train/eval restructuring (issue 14) and kept after it: a refactor of the loop,
the validation or the evaluation must not change a single bit of what a run computes. The numbers
come from the real loop on the synthetic test set (CPU, one thread, seed 0) and are compared with
``tests/golden/run20.json``:

- exactly, when this machine matches the one that wrote the file (torch version, CPU model, one
  thread): float reduction order is then fixed, so any difference is a behaviour change;
- within a small tolerance elsewhere (other CPUs may pick other kernels), so CI on another machine
  still catches real changes.

The dataset's targets are pinned too: a digest of every BEV target and box key of every val sample under
both target rasters, and of every train sample with training augmentation (flips, shuffled reference
camera), on the default 200 x 200 grid.

After an intended behaviour change (or a changed synthetic generator), rewrite the file with
``BEVTRAIN_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "run20.json"

# Quickstart-like (res18 from scratch, small images, a small grid), with every periodic duty due
# inside 20 steps: logging each step, validation and pictures every 10, a checkpoint every 10.
FLAGS = dict(
    dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25, Z=32, Y=4, X=32,
    bounds=[-25.0, 25.0, -5.0, 5.0, -25.0, 25.0], latent_dim=16, batch_size=1, grad_acc=2, lr=2e-3,
    max_iters=20, log_freq=1, val_freq=10, val_batches=2, save_freq=10, viz_freq=10, keep_latest=2,
    nworkers=0, seed=0, exp_name="golden",
)
# Wall-clock figures differ from run to run; everything else a log record holds is compared.
TIMING_KEYS = ("data_time", "step_time", "samples_per_s")


def fingerprint() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": cpu, "threads": 1}


def weights_digest(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# The dataset keys pinned per sample (images and point clouds are pinned through the run above).
TARGET_KEYS = ("seg_bev", "valid_bev", "center_bev", "offset_bev", "box_corners", "box_count",
               "box_visibility")
# Which datasets: (name, split, is_train, settings); res_scale only shrinks the images (targets do not
# depend on it), the grid is the default one.
DATASETS = (
    ("val_simplebev", "val", False, dict(target_raster="simplebev")),
    ("val_exact", "val", False, dict(target_raster="exact")),
    ("train_augmented", "train", True, dict()),
)


def dataset_digests(root: Path) -> dict:
    """{dataset: {key: {"sha256": digest over all samples, "sum": float sum}}} of TARGET_KEYS."""
    from conftest import make_dataset

    from bevtrain.data.dataset import MASK_KEYS

    out = {}
    for name, split, is_train, settings in DATASETS:
        ds = make_dataset(root, split=split, is_train=is_train, res_scale=0.25, **settings)
        hashes = {k: hashlib.sha256() for k in TARGET_KEYS}
        sums = dict.fromkeys(TARGET_KEYS, 0.0)
        for i in range(len(ds)):
            sample = ds[(i, 0)]
            for k in TARGET_KEYS:
                # the masks as float32 values: they travelled as float32 when the digests were written
                a = (sample[k].float() if k in MASK_KEYS else sample[k]).contiguous().numpy()
                hashes[k].update(str(a.shape).encode())
                hashes[k].update(a.tobytes())
                sums[k] += float(a.astype("float64").sum())
        out[name] = {k: {"sha256": hashes[k].hexdigest(), "sum": sums[k]} for k in TARGET_KEYS}
        out[name]["samples"] = len(ds)
    return out


def run_golden(root: Path, tmp: Path) -> dict:
    from bevtrain.evaluate import evaluate
    from bevtrain.train import main

    res = main(**FLAGS, data_dir=str(root), log_dir=str(tmp / "logs"), ckpt_dir=str(tmp / "ckpt"))
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in res["history"]]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    ckpt = Path(res["checkpoint"])
    summary = evaluate(init_dir=str(ckpt.parent), data_dir=str(root), nworkers=0, viz_every=0,
                       tensorboard=False, metrics_path=str(tmp / "metrics.json"))
    protocols = summary["protocols"]
    counts = {p: {"intersection": protocols[p]["intersection"], "union": protocols[p]["union"],
                  "bands": {b: [v["intersection"], v["union"]] for b, v in protocols[p]["bands"].items()}}
              for p in ("simplebev", "lss")}
    return {"train": train, "val": val, "weights_sha256": weights_digest(ckpt),
            "eval": {"samples": summary["samples"], "counts": counts}, "dataset": dataset_digests(root)}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_first_20_steps_and_their_eval_are_unchanged(synthetic_root, tmp_path, one_thread):
    got = run_golden(synthetic_root, tmp_path)
    if os.environ.get("BEVTRAIN_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(), **got}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert len(got["train"]) == len(want["train"]) == FLAGS["max_iters"]
    assert [r["step"] for r in got["val"]] == [r["step"] for r in want["val"]] == [10, 20]
    if want["fingerprint"] == fingerprint():
        # Same machine and torch: every bit must match.
        assert got["train"] == want["train"]
        assert got["val"] == want["val"]
        assert got["weights_sha256"] == want["weights_sha256"]
        assert got["eval"] == want["eval"]
        assert got["dataset"] == want["dataset"]
        return
    # Another CPU or torch: kernels may round differently; real changes are still far outside this.
    for g, w in zip(got["train"] + got["val"], want["train"] + want["val"]):
        assert set(g) == set(w)
        for k in w:
            if k == "split":
                continue
            assert g[k] == pytest.approx(w[k], rel=2e-3, abs=1e-4), (k, g, w)
    assert got["eval"]["samples"] == want["eval"]["samples"]
    for p, w in want["eval"]["counts"].items():
        assert got["eval"]["counts"][p]["union"] == pytest.approx(w["union"], rel=0.02)
        assert got["eval"]["counts"][p]["intersection"] == pytest.approx(w["intersection"], rel=0.02, abs=20)
    for name, keys in want["dataset"].items():  # numpy / OpenCV arithmetic, not torch kernels: tight
        assert got["dataset"][name]["samples"] == keys["samples"]
        for k in TARGET_KEYS:
            got_sum = got["dataset"][name][k]["sum"]
            assert got_sum == pytest.approx(keys[k]["sum"], rel=1e-5, abs=1e-3), (name, k)


SIMPLEBEV_GOLDEN = Path(__file__).parent / "golden" / "simplebev_eval.json"


def test_a_simplebev_checkpoint_scores_the_same_counts_as_before(synthetic_root, tmp_path, one_thread):
    """A Simple-BEV checkpoint folder (its saverloader format, random weights, a small effb0 model) evaluated
    on the synthetic val split: the integer counts of both protocols and every band, compared with what
    the evaluation gave before per-class heads and metrics (written by the
    one-class code of i22-targets d8770ad; bdb935f gives the same)."""
    from test_simplebev_compat import TINY, random_state, save_like_saverloader, simplebev_shapes

    from bevtrain.evaluate import evaluate

    folder = tmp_path / "8x5_5e-4_rgb12_22:43:46"
    save_like_saverloader(folder, random_state(simplebev_shapes("effb0", 16, 4), seed=3), step=300,
                          module_prefix=True)
    summary = evaluate(init_dir=str(folder), data_dir=str(synthetic_root), cache_dir=str(tmp_path / "cache"),
                       batch_size=2, viz_every=0, tensorboard=False, metrics_path=str(tmp_path / "m.json"),
                       **TINY)
    protocols = summary["protocols"]
    counts = {p: {"intersection": protocols[p]["intersection"], "union": protocols[p]["union"],
                  "bands": {b: [v["intersection"], v["union"]] for b, v in protocols[p]["bands"].items()}}
              for p in ("simplebev", "lss")}
    got = {"samples": summary["samples"], "compat": summary["compat"], "counts": counts}
    if os.environ.get("BEVTRAIN_WRITE_GOLDEN"):
        SIMPLEBEV_GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(), **got}, indent=1) + "\n")
        pytest.skip(f"wrote {SIMPLEBEV_GOLDEN}")
    want = json.loads(SIMPLEBEV_GOLDEN.read_text())
    assert got["compat"] == "simplebev" and got["samples"] == want["samples"]
    assert 0 < got["counts"]["lss"]["intersection"] < got["counts"]["lss"]["union"]  # not a trivial case
    if want["fingerprint"] == fingerprint():
        assert got["counts"] == want["counts"]
        return
    for p, w in want["counts"].items():
        assert got["counts"][p]["union"] == pytest.approx(w["union"], rel=0.02)
        assert got["counts"][p]["intersection"] == pytest.approx(w["intersection"], rel=0.02, abs=20)
