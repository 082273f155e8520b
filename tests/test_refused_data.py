"""Loading refuses what verify refuses, and verify reports every problem in one pass (issue 26 items
3 and 4). Each test corrupts a private copy of the synthetic set."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from bevtrain.data import index, verify
from bevtrain.data.dataset import SampleReadError
from tests.conftest import make_dataset

TABLES = "v1.0-mini"


@pytest.fixture
def data_copy(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def _ds(root, tmp_path, **kw):
    settings = {"res_scale": 0.25, "Z": 32, "Y": 4, "X": 32, "cache_dir": tmp_path / "cache", **kw}
    return make_dataset(root, "train", True, **settings)


def _garble(path):
    """100 bytes cut out of the middle: start and end markers intact, libjpeg warns and decodes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + data[len(data) // 2 + 100 :])


def _rows(root, name):
    return json.loads((root / TABLES / f"{name}.json").read_text())


def _write(root, name, rows):
    (root / TABLES / f"{name}.json").write_text(json.dumps(rows, indent=0))


def test_a_jpeg_libjpeg_reports_corrupt_is_refused_with_its_path_or_skipped(data_copy, tmp_path):
    ds = _ds(data_copy, tmp_path)
    path = data_copy / ds.records[0]["cams"]["CAM_FRONT"]["path"]
    _garble(path)
    with pytest.raises(SampleReadError, match=re.escape(str(path)) + ".*libjpeg reports corrupt data"):
        ds[0]
    skipping = _ds(data_copy, tmp_path, bad_samples="skip")
    sample = skipping[0]
    assert sample["sample_token"] != ds.records[0]["token"] and ds.records[0]["token"] in sample["skipped"]


@pytest.mark.parametrize("cut", ["3 extra bytes", "empty"])
def test_lidar_files_that_are_no_whole_number_of_points_are_refused(data_copy, tmp_path, cut):
    ds = _ds(data_copy, tmp_path, use_lidar=True)
    lidar = data_copy / ds.records[0]["sweeps"]["LIDAR_TOP"]["paths"][0]
    lidar.write_bytes(lidar.read_bytes() + b"\0\0\0" if cut == "3 extra bytes" else b"")
    refused = re.escape(str(lidar)) + r" has \d+ bytes, not a non-zero multiple of 20"
    with pytest.raises(SampleReadError, match=refused):
        ds[0]
    assert "lidar_size" in verify.verify(str(data_copy), "mini", ["train"], workers=1, progress=False,
                                         cache_dir=tmp_path / "cache")["problems"]


@pytest.mark.parametrize("size", [[0.0, 4.0, 1.5], [-1.8, 4.0, 1.5]])
def test_boxes_with_a_side_not_above_zero_are_named_by_the_index_and_verify(data_copy, tmp_path, size):
    anns = _rows(data_copy, "sample_annotation")
    samples = {s["token"]: s for s in _rows(data_copy, "sample")}
    scenes = {s["token"]: s["name"] for s in _rows(data_copy, "scene")}
    victim = next(a for a in anns if scenes[samples[a["sample_token"]]["scene_token"]] != "scene-0103")
    victim["size"] = size
    _write(data_copy, "sample_annotation", anns)
    records, info = index.load_index(data_copy, "mini", "train", cache_dir=tmp_path / "cache")
    named = [p for issues in info["problems"].values() for p in issues if p["token"] == victim["token"]]
    assert named and "side <= 0" in named[0]["reason"]
    summary = verify.verify(str(data_copy), "mini", ["train", "val"], workers=1, progress=False,
                            cache_dir=tmp_path / "cache")
    assert any(victim["token"] in m for _, _, m in summary["problems"]["sample_annotation"])


def test_verify_reports_a_broken_table_and_every_other_problem_in_one_pass(data_copy, tmp_path, capsys):
    ds = _ds(data_copy, tmp_path)
    truncated = data_copy / ds.records[0]["cams"]["CAM_FRONT"]["path"]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    calib = _rows(data_copy, "calibrated_sensor")
    cams = [c for c in calib if c["camera_intrinsic"]]
    for c in cams[:4]:
        c["camera_intrinsic"][0][0] = math.nan
    _write(data_copy, "calibrated_sensor", calib)
    ego = (data_copy / TABLES / "ego_pose.json").read_bytes()
    (data_copy / TABLES / "ego_pose.json").write_bytes(ego[: len(ego) // 2])  # half-written

    rc = verify.main(["--data_dir", str(data_copy), "--dset", "mini", "--workers", "2",
                      "--cache_dir", str(tmp_path / "cache2")])
    out = capsys.readouterr().out
    print(out)
    assert rc == 1
    assert "table not valid JSON: 1" in out and "ego_pose.json" in out
    assert "JPEG truncated" in out and str(truncated) in out
    assert "calibration not finite / out of range: 4" in out and cams[0]["token"] in out
    assert "extract the v1.0-mini metadata archive again" in out.lower()
    tables_advice = next(line for line in out.splitlines() if line.startswith("Tables:"))
    assert "cannot help" in tables_advice
