"""predict on frames copied from the synthetic set, with the rig written by --rig_from: evaluation's
inputs and probabilities; its error lines; the rig file."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bevtrain.build import build_dataset
from bevtrain.data.index import CAMERA_NAMES

# The CPU model and data of tests/test_eval.py: 56x100 images, a 50x50 grid.
TINY = dict(
    encoder_type="res18", encoder_weights="none", res_scale=0.25, Z=50, Y=4, X=50, latent_dim=16,
    batch_size=2, grad_acc=1, nworkers=0, device="cpu", dset="mini", amp="none",
)  # fmt: skip


def _train(root: Path, synthetic_root: Path, cache: Path, **kw) -> Path:
    from bevtrain.train import main as train_main

    with contextlib.redirect_stdout(io.StringIO()):
        train_main(
            **TINY, **kw, data_dir=str(synthetic_root), cache_dir=str(cache), max_iters=1, do_val=False,
            viz_freq=0, log_freq=1, save_freq=1, exp_name="predicttest", ckpt_dir=str(root / "ckpt"),
            log_dir=str(root / "logs"),
        )  # fmt: skip
    (run,) = [p for p in (root / "ckpt").iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("predict_index_cache")


@pytest.fixture(scope="module")
def static_rig_run(synthetic_root, cache, tmp_path_factory):
    """A 1-step checkpoint with compat='simplebev': its evaluation places the cameras by their
    extrinsics alone, as a rig file does."""
    return _train(tmp_path_factory.mktemp("run_sb"), synthetic_root, cache, compat="simplebev")


def _val_dataset(run: Path):
    from bevtrain.evaluate import eval_config, open_run

    cfg, _ = eval_config(open_run(str(run)).trained, {})
    return cfg, build_dataset(cfg, split="val", is_train=False)


def _copy_frames(ds, folder: Path) -> list:
    """<folder>/<scene>/<camera>/<position>.jpg of every val sample; returns (scene, position) in order."""
    order = []
    for i in range(len(ds)):
        rec = ds.records[i]
        for cam in CAMERA_NAMES:
            dst = folder / rec["scene_name"] / cam / f"{i:04d}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(ds.dataroot) / rec["cams"][cam]["path"], dst)
        order.append((rec["scene_name"], i))
    return order


def _predict(*args, **flags):
    from bevtrain.predict import main

    with contextlib.redirect_stdout(io.StringIO()):
        return main(*args, **flags, progress=False)


def test_predict_gives_evaluations_probabilities(static_rig_run, synthetic_root, tmp_path):
    from bevtrain.build import forward
    from bevtrain.predict import load_model

    rig = tmp_path / "rig.yaml"
    _predict(rig_from=str(synthetic_root), rig=str(rig))
    cfg, ds = _val_dataset(static_rig_run)
    order = _copy_frames(ds, tmp_path / "frames")
    out = tmp_path / "out"
    summary = _predict(init_dir=str(static_rig_run), rig=str(rig), frames=str(tmp_path / "frames"),
                       out_dir=str(out), batch_size=3, viz_width=120, device="cpu")
    assert summary["frames"] == len(ds) and summary["classes"] == [c.name for c in cfg.model.outputs]

    model = load_model(str(static_rig_run), None, torch.device("cpu")).model
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)
    worst, seen = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            prob = torch.sigmoid(forward(model, batch)["seg"].float()).numpy()  # (B,C,Z,X) eval's
            for b in range(len(prob)):
                scene, i = order[seen]
                mine = np.load(out / scene / f"{i:04d}.npy")
                assert mine.shape == prob[b].shape and mine.dtype == np.float32
                worst = max(worst, float(np.abs(mine - prob[b]).max()))
                seen += 1
    assert seen == len(ds)
    assert worst <= 1e-5, worst
    scenes = sorted({s for s, _ in order})
    assert sorted(p.stem for p in out.glob("*.gif")) == scenes
    assert len(list(out.glob("*/*.png"))) == len(ds)
    saved = json.loads((out / "predict.json").read_text())
    assert saved["grid"]["Z"] == 50 and saved["rig_cameras"][0] == "CAM_FRONT"


def test_predict_inputs_are_evaluations_for_the_default_conventions(synthetic_root, cache, tmp_path):
    """compat='none': the same resized images and exactly scaled intrinsics as the val dataset."""
    from bevtrain.config import DataConfig
    from bevtrain.data.dataset import NuScenesBEVDataset
    from bevtrain.predict import FrameSet, find_frames, rig_from_dataroot

    ds = NuScenesBEVDataset(DataConfig.make(data_dir=synthetic_root, dset="mini", res_scale=0.25,
                                            cache_dir=str(cache)), split="val", is_train=False)
    rig, _ = rig_from_dataroot(str(synthetic_root), "mini", "val", cache_dir=str(cache))
    _copy_frames(ds, tmp_path / "frames")
    frames = find_frames(str(tmp_path / "frames"), rig)
    mine = FrameSet(frames, rig, ds.final_dim, "none")
    assert len(mine) == len(ds)
    for i in (0, len(ds) - 1):
        theirs = ds[i]
        got = mine[i]
        assert torch.equal(got["images"], theirs["images"])
        assert torch.allclose(got["pix_T_cams"], theirs["pix_T_cams"], atol=1e-4, rtol=0)


def _run_cli(**flags):
    from bevtrain.predict import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as e:
            main(**flags, progress=False)
    return e.value.code, err.getvalue()


def test_errors_are_one_line(static_rig_run, synthetic_root, tmp_path):
    rig = tmp_path / "rig.yaml"
    _predict(rig_from=str(synthetic_root), rig=str(rig))
    _, ds = _val_dataset(static_rig_run)
    frames = tmp_path / "frames"
    _copy_frames(ds, frames)
    scene = sorted(p for p in frames.iterdir())[0]
    common = dict(init_dir=str(static_rig_run), rig=str(rig), out_dir=str(tmp_path / "out"), device="cpu")

    # a rig camera without a folder
    shutil.move(str(scene / "CAM_BACK"), str(tmp_path / "CAM_BACK"))
    code, err = _run_cli(frames=str(frames), **common)
    assert code == 2 and err.count("error:") == 1 and "CAM_BACK" in err and "Traceback" not in err
    shutil.move(str(tmp_path / "CAM_BACK"), str(scene / "CAM_BACK"))

    # an image of another size than the rig's
    import cv2

    victim = sorted((scene / "CAM_FRONT_LEFT").iterdir())[0]
    cv2.imwrite(str(victim), np.zeros((450, 800, 3), np.uint8))
    code, err = _run_cli(frames=str(frames), **common)
    assert code == 65 and err.startswith("error:") and str(victim) in err and "800x450" in err
    assert f"the rig {rig} says CAM_FRONT_LEFT takes 1600x900" in err

    # a rig with fewer cameras than the checkpoint takes
    data = yaml.safe_load(rig.read_text())
    data["cameras"] = data["cameras"][:5]
    small = tmp_path / "five.yaml"
    small.write_text(yaml.safe_dump(data))
    code, err = _run_cli(frames=str(frames), **{**common, "rig": str(small)})
    assert code == 2 and err.count("error:") == 1 and "ncams=6" in err and "5 cameras" in err


def test_rig_file_reads_back_and_refuses_a_bad_quaternion(synthetic_root, cache, tmp_path):
    from bevtrain.predict import rig_from_dataroot
    from bevtrain.rig import RigFileError, read_rig, write_rig

    rig, _ = rig_from_dataroot(str(synthetic_root), "mini", "val", cache_dir=str(cache))
    path = tmp_path / "rig.yaml"
    write_rig(rig, path)
    back = read_rig(path)
    assert back.names == rig.names and back.reference == "CAM_FRONT"
    for a, b in zip(back.cameras, rig.cameras):
        assert np.allclose(a.ego_T_cam, b.ego_T_cam, atol=1e-12) and np.array_equal(a.K, b.K)
    data = yaml.safe_load(path.read_text())
    data["cameras"][2]["rotation"] = [1.0, 0.2, 0.0, 0.0]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RigFileError, match="CAM_FRONT_RIGHT.*not 1"):
        read_rig(path)


def test_frames_named_by_timestamp_are_matched_by_time(synthetic_root, cache, tmp_path):
    """nuScenes-style names (<log>__<camera>__<timestamp>.jpg, the cameras ~10-45 ms apart): each
    reference-camera frame gets the other cameras' images of the same sample."""
    from bevtrain.data.index import load_index
    from bevtrain.predict import PredictError, find_frames, rig_from_dataroot

    rig, _ = rig_from_dataroot(str(synthetic_root), "mini", "val", cache_dir=str(cache))
    records, info = load_index(synthetic_root, "mini", "val", cache_dir=str(cache), verbose=False)
    folder = tmp_path / "frames"
    for rec in records:
        for cam in CAMERA_NAMES:
            src = Path(info["dataroot"]) / rec["cams"][cam]["path"]
            (folder / cam).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / cam / src.name)
    frames = find_frames(str(folder), rig)
    want = {Path(rec["cams"]["CAM_FRONT"]["path"]).stem: [Path(rec["cams"][c.name]["path"]).name
                                                          for c in rig.model_order()] for rec in records}
    assert len(frames) == len(records)
    for frame in frames:
        assert [Path(p).name for p in frame.paths] == want[frame.name]
    with pytest.raises(PredictError, match="max_dt"):
        find_frames(str(folder), rig, max_dt=5000)  # 5 ms: the cameras fire further apart
