"""Bad data caught where it happens (issue 13, data side): truncated JPEGs, non-finite calibration
and poses, tables that are not JSON; bad_samples=stop/skip, the run's bad-sample report and the
verify command. Every test corrupts a copy of the synthetic set in tmp_path, never the shared one."""

import json
import math
import re
import shutil

import numpy as np
import pytest
from conftest import make_dataset

from bevtrain.data import augment, index, verify
from bevtrain.data.dataset import (
    BadSampleError,
    BadSampleLog,
    SampleReadError,
    TooManyBadSamplesError,
    make_loader,
)
from bevtrain.train import main

TABLES = "v1.0-mini"
VAL_SCENES = ("scene-0103", "scene-0916")  # mini_val; every other scene is in mini_train


@pytest.fixture
def data_copy(synthetic_root, tmp_path):
    """A private copy of the synthetic set to corrupt."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def _table(root, name):
    return json.loads((root / TABLES / f"{name}.json").read_text())


def _write_table(root, name, rows):
    (root / TABLES / f"{name}.json").write_text(json.dumps(rows, indent=0))


def _train_ds(root, tmp_path, fast_decode=True, **kw):
    settings = {"res_scale": 0.25, "Z": 32, "Y": 4, "X": 32, "cache_dir": tmp_path / "cache", **kw}
    return make_dataset(root, "train", True, fast_decode=fast_decode, **settings)


def _cam_file(root, ds, position, cam="CAM_FRONT"):
    rec = ds.records[position]
    return root / rec["cams"][cam]["path"], rec


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- item 4: truncated JPEG ---------------------------------------------------------------------------
@pytest.mark.parametrize("fast_decode", [True, False])
def test_truncated_jpeg_is_an_error_naming_file_and_sample(data_copy, tmp_path, fast_decode):
    ds = _train_ds(data_copy, tmp_path, fast_decode=fast_decode)
    path, rec = _cam_file(data_copy, ds, 3)
    _truncate(path)
    with pytest.raises(SampleReadError) as err:
        ds[(3, 0)]
    message = str(err.value)
    assert str(path) in message and rec["token"] in message and "truncated" in message, message
    assert "--bad_samples=skip" in message
    ds[(2, 0)]  # the others still load


def test_decode_checks_markers_and_size(tmp_path, synthetic_root):
    good = next((synthetic_root / "samples" / "CAM_FRONT").glob("*.jpg"))
    data = good.read_bytes()
    assert augment.decode_jpeg(str(good), 8).shape == (113, 200, 3)
    cases = {"truncated": data[: len(data) * 3 // 4], "not_jpeg": b"GIF89a" + data[6:], "missing": None}
    for kind, blob in cases.items():
        path = tmp_path / f"{kind}.jpg"
        if blob is not None:
            path.write_bytes(blob)
        for factor in (1, 8):
            with pytest.raises(augment.ImageReadError, match=re.escape(str(path))) as err:
                augment.decode_jpeg(str(path), factor)
            assert err.value.kind == kind
    assert augment.jpeg_size(np.frombuffer(data, np.uint8)) == (1600, 900)
    # the index's size is checked at the reduced factor too (a 1600x900 file said to be 1280x720)
    aug = augment.ImageAug((100, 56), (0, 0), (56, 100))
    with pytest.raises(augment.ImageReadError, match="dataset says 1280x720") as err:
        augment.load_augmented_image(str(good), np.eye(4), (1280, 720), aug)
    assert err.value.kind == "size"


# -- item 5: non-finite / non-positive calibration and poses ------------------------------------------
def _calib_of(root, channel, scene_name):
    """(calibrated_sensor row, a sample_data row) of ``channel`` in ``scene_name``."""
    scenes = {s["token"]: s["name"] for s in _table(root, "scene")}
    samples = {s["token"]: scenes[s["scene_token"]] for s in _table(root, "sample")}
    rows = [r for r in _table(root, "sample_data") if f"/{channel}/" in r["filename"] and r["is_key_frame"]]
    sd = next(r for r in rows if samples[r["sample_token"]] == scene_name)
    return sd["calibrated_sensor_token"], sd


@pytest.mark.parametrize("case", ["fx_nan", "fy_zero", "cx_inf", "extrinsic_nan", "ego_pose_nan"])
def test_bad_calibration_or_pose_stops_before_training(data_copy, tmp_path, case):
    calib_token, sd = _calib_of(data_copy, "CAM_BACK", "scene-0553")
    table, token = "calibrated_sensor", calib_token
    if case == "ego_pose_nan":
        table, token = "ego_pose", sd["ego_pose_token"]
    rows = _table(data_copy, table)
    row = next(r for r in rows if r["token"] == token)
    if case == "fx_nan":
        row["camera_intrinsic"][0][0] = math.nan
    elif case == "fy_zero":
        row["camera_intrinsic"][1][1] = 0.0
    elif case == "cx_inf":
        row["camera_intrinsic"][0][2] = math.inf
    else:
        row["translation"][1] = math.nan
    _write_table(data_copy, table, rows)
    with pytest.raises(BadSampleError) as err:
        _train_ds(data_copy, tmp_path)
    message = str(err.value)
    assert str(data_copy / TABLES / f"{table}.json") in message and token in message, message
    assert "CAM_BACK" in message and "scene-0553" in message and "--bad_samples=skip" in message
    if case == "ego_pose_nan":
        assert "1 of 32 samples" in message  # the pose of one image
    else:
        assert "4 of 32 samples" in message  # the scene's four keyframes share the calibration
    # skip: the same samples are left out, and the rest of the split is usable
    ds = _train_ds(data_copy, tmp_path, bad_samples="skip", max_bad_fraction=0.2)
    assert len(ds.bad) == (1 if case == "ego_pose_nan" else 4)
    for i in ds.bad:
        out = ds[(i, 0)]
        assert int(out["index"]) not in ds.bad
        assert np.isfinite(out["pix_T_cams"].numpy()).all() and np.isfinite(out["cams_T_ref"].numpy()).all()
    with pytest.raises(BadSampleError, match=r"more than max_bad_fraction=0.0 allows \(0\)"):
        _train_ds(data_copy, tmp_path, bad_samples="skip", max_bad_fraction=0.0)


def test_sweep_pose_matters_only_when_that_modality_is_used(data_copy, tmp_path):
    calib_token, _ = _calib_of(data_copy, "LIDAR_TOP", "scene-0061")
    rows = _table(data_copy, "calibrated_sensor")
    next(r for r in rows if r["token"] == calib_token)["rotation"] = [0.0, 0.0, 0.0, 0.0]
    _write_table(data_copy, "calibrated_sensor", rows)
    assert len(_train_ds(data_copy, tmp_path)) == 32  # cameras only: not needed
    with pytest.raises(BadSampleError, match="LIDAR_TOP.*not a unit quaternion"):
        _train_ds(data_copy, tmp_path, use_lidar=True)


# -- item 6: a table that is not valid JSON ----------------------------------------------------------
def test_invalid_json_table_names_the_file(data_copy, tmp_path):
    path = data_copy / TABLES / "ego_pose.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(index.DataTableError) as err:
        _train_ds(data_copy, tmp_path)
    message = str(err.value)
    assert str(path) in message and re.search(r"line \d+ column \d+", message), message


# -- bad_samples=skip ---------------------------------------------------------------------------------
def test_skip_substitutes_the_next_good_sample_deterministically(data_copy, tmp_path):
    ds = _train_ds(data_copy, tmp_path, bad_samples="skip", max_bad_fraction=0.1)
    clean = {i: ds[(i, 0)] for i in (5, 6)}
    path, rec = _cam_file(data_copy, ds, 5, "CAM_BACK_LEFT")
    _truncate(path)
    fresh = _train_ds(data_copy, tmp_path, bad_samples="skip", max_bad_fraction=0.1)
    for _ in range(2):  # first finding the bad file, then knowing it
        out = fresh[(5, 0)]
        assert int(out["index"]) == 6 and out["sample_token"] == clean[6]["sample_token"]
        (entry,) = json.loads(out["skipped"])
        assert entry["index"] == 5 and entry["token"] == rec["token"] and str(path) in entry["reason"]
        # position 5's augmentation applied to sample 6's data: the same cameras, crops and flips
        assert out["cam_ids"].tolist() == clean[5]["cam_ids"].tolist()
        assert not np.array_equal(out["images"].numpy(), clean[6]["images"].numpy())
    assert fresh[(6, 0)]["skipped"] == "" and int(fresh[(6, 0)]["index"]) == 6
    # batches keep their size
    batches = list(make_loader(fresh, 4, 0, shuffle=False, is_train=True))
    assert [len(b["index"]) for b in batches] == [4] * (len(fresh) // 4)
    assert batches[1]["index"].tolist() == [4, 6, 6, 7]
    assert [s != "" for s in batches[1]["skipped"]] == [False, True, False, False]


def test_bad_sample_log_counts_once_resumes_and_stops_past_the_fraction(tmp_path):
    path = tmp_path / "run" / "bad_samples.jsonl"
    entry = {"index": 3, "token": "t3", "scene": "scene-1", "reason": "image x is truncated"}
    log = BadSampleLog(path, {"train": 100}, max_bad_fraction=0.02)
    batch = {"skipped": [json.dumps([entry]), "", json.dumps([entry])]}
    log.add_batch("train", batch, step=7)
    log.add_batch("train", batch, step=8)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [{"split": "train", **entry, "step": 7}]
    resumed = BadSampleLog(path, {"train": 100}, max_bad_fraction=0.02)  # a resumed run reads it back
    assert resumed.count("train") == 1
    resumed.add("train", [{**entry, "token": "t4", "index": 4}], step=9)  # 2 of 100: allowed
    with pytest.raises(TooManyBadSamplesError, match=rf"3 of the 100 .*{re.escape(str(path))}"):
        resumed.add("train", [{**entry, "token": "t5", "index": 5}], step=9)
    assert len(path.read_text().splitlines()) == 3


def _tiny(tmp_path, root, **over):
    flags = dict(
        data_dir=str(root), dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25,
        Z=32, Y=4, X=32, latent_dim=16, batch_size=2, grad_acc=1, max_iters=3, log_freq=1, do_val=False,
        save_freq=100, nworkers=0, viz_freq=0, seed=0, shuffle=False, exp_name="bad",
        log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ckpt"), cache_dir=str(tmp_path / "cache"),
    )
    flags.update(over)
    return flags


def test_training_stops_on_a_truncated_jpeg_and_skip_trains_through_it(data_copy, tmp_path):
    ds = _train_ds(data_copy, tmp_path)
    path, rec = _cam_file(data_copy, ds, 2, "CAM_FRONT_RIGHT")  # in the second batch (shuffle off)
    _truncate(path)
    with pytest.raises(SampleReadError, match=re.escape(str(path))):
        main(**_tiny(tmp_path, data_copy, exp_name="stop"))
    (stopped,) = (tmp_path / "logs").iterdir()
    steps = [json.loads(x)["step"] for x in (stopped / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1]  # the step that would have used the bad sample never ran

    res = main(**_tiny(tmp_path, data_copy, exp_name="skip", bad_samples="skip", max_bad_fraction=0.05))
    assert res["status"] == "finished" and res["step"] == 3
    assert all(math.isfinite(r["loss"]) for r in res["history"])
    lines = [json.loads(x) for x in open(f"{res['log_dir']}/bad_samples.jsonl")]
    assert len(lines) == 1
    assert lines[0]["token"] == rec["token"] and lines[0]["split"] == "train" and lines[0]["step"] == 2
    assert str(path) in lines[0]["reason"]

    # 1 bad sample of 32 is more than max_bad_fraction=0.01 allows (0): stop, pointing at the list
    with pytest.raises(TooManyBadSamplesError, match="bad_samples.jsonl"):
        main(**_tiny(tmp_path, data_copy, exp_name="toomany", bad_samples="skip", max_bad_fraction=0.01))


# -- the verify command -------------------------------------------------------------------------------
def test_verify_passes_a_clean_set(synthetic_root, tmp_path, capsys):
    rc = verify.main(["--data_dir", str(synthetic_root), "--dset", "mini", "--workers", "2",
                      "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all good" in out and "40 samples" in out and "files/s" in out


def test_verify_finds_and_names_every_kind_of_bad_file(data_copy, tmp_path, capsys):
    ds = _train_ds(data_copy, tmp_path)
    truncated, _ = _cam_file(data_copy, ds, 0)
    _truncate(truncated)
    corrupt, _ = _cam_file(data_copy, ds, 1)  # markers intact, 100 bytes cut out of the entropy data
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2] + data[len(data) // 2 + 100 :])
    resized, _ = _cam_file(data_copy, ds, 2, "CAM_BACK")
    import cv2

    img = cv2.imread(str(resized))
    cv2.imwrite(str(resized), cv2.resize(img, (1592, 896)))  # 1592/8 = 199: the reduced size differs too
    rec = ds.records[4]
    lidar = data_copy / rec["sweeps"]["LIDAR_TOP"]["paths"][0]
    lidar.write_bytes(lidar.read_bytes()[:-3])
    radar = data_copy / rec["sweeps"]["RADAR_FRONT"]["paths"][0]
    radar.write_bytes(radar.read_bytes()[:-30])
    calib_token, _ = _calib_of(data_copy, "CAM_FRONT_LEFT", VAL_SCENES[0])
    rows = _table(data_copy, "calibrated_sensor")
    next(r for r in rows if r["token"] == calib_token)["camera_intrinsic"][1][1] = math.nan
    _write_table(data_copy, "calibrated_sensor", rows)

    rc = verify.main(["--data_dir", str(data_copy), "--dset", "mini", "--workers", "2",
                      "--cache_dir", str(tmp_path / "cache2"), "--show", "10"])
    out = capsys.readouterr().out
    assert rc == 1
    expected = [  # (summary title, what it must name, count)
        ("JPEG truncated", truncated, 1), ("JPEG corrupt (libjpeg", corrupt, 1),
        ("JPEG of the wrong size", resized, 1),
        ("lidar file size", lidar, 1), ("radar file", radar, 1),
        ("calibration not finite", calib_token, 4),  # the val scene's four keyframes
    ]
    for title, what, count in expected:
        assert re.search(rf"{re.escape(title)}.*: {count}\n", out), (title, out)
        assert str(what) in out, (what, out)
    assert "premature end of data segment" in out
    assert "1592x896" in out


@pytest.mark.slow  # four short runs: ~3 min on 2 busy cores
def test_skip_keeps_resume_exact(data_copy, tmp_path):
    ds = _train_ds(data_copy, tmp_path)
    path, rec = _cam_file(data_copy, ds, 5, "CAM_BACK")  # met in step 3 (batch 2, shuffle off)
    _truncate(path)
    flags = _tiny(tmp_path, data_copy, max_iters=4, bad_samples="skip", max_bad_fraction=0.05)
    straight = main(**{**flags, "exp_name": "straight"})
    first = main(**{**flags, "exp_name": "split", "ckpt_dir": str(tmp_path / "ckpt2")}, stop_at=2)
    assert first["step"] == 2 and not (tmp_path / "logs" / first["run_name"] / "bad_samples.jsonl").exists()
    second = main(resume=True, ckpt_dir=str(tmp_path / "ckpt2"), log_dir=str(tmp_path / "logs"))
    assert second["step"] == 4

    def losses(res):
        return [(r["step"], r["loss"]) for r in res["history"] if r["split"] == "train"]

    assert losses(first) + losses(second) == losses(straight)
    reports = [[json.loads(x) for x in open(f"{r['log_dir']}/bad_samples.jsonl")] for r in (straight, second)]
    assert reports[0] == reports[1] and [e["token"] for e in reports[0]] == [rec["token"]]
