"""The sample index: splits, clear errors, records equal to the devkit tables, on-disk cache."""

import subprocess
import sys
import time

import numpy as np
import pytest

from bevtrain.data import index


# -- no data needed -----------------------------------------------------------------------------------
def test_unknown_dset_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dset"):
        index.resolve_split(tmp_path, "bogus", "train")
    with pytest.raises(ValueError, match="unknown split"):
        index.resolve_split(tmp_path, "mini", "test")
    assert index.resolve_split(tmp_path, "mini", "train")[:2] == ("v1.0-mini", "mini_train")
    assert index.resolve_split(tmp_path, "mini", "val")[:2] == ("v1.0-mini", "mini_val")
    assert index.resolve_split(tmp_path, "trainval", "val")[:2] == ("v1.0-trainval", "val")


def test_missing_dataroot_says_what_and_where(tmp_path):
    with pytest.raises(index.DataLayoutError, match="does not exist.*data/nuscenes"):
        index.check_dataroot(tmp_path / "nothing", "v1.0-mini")
    (tmp_path / "samples").mkdir()
    with pytest.raises(index.DataLayoutError, match=r"no v1.0-trainval/ folder \(found: \['samples'\]\)"):
        index.check_dataroot(tmp_path, "v1.0-trainval")


def test_split_files(tmp_path):
    yml = tmp_path / "s.yaml"
    yml.write_text("version: v1.0-mini\ntrain: [scene-0061, scene-0553]\nval: [scene-0103]\n")
    assert index.resolve_split(tmp_path, str(yml), "train") == (
        "v1.0-mini",
        "train",
        ["scene-0061", "scene-0553"],
    )
    txt = tmp_path / "s.txt"
    txt.write_text(
        "# my split\nversion v1.0-mini\nmine scene-0061\nmine scene-0103  # a comment\nother scene-0553\n"
    )
    assert index.resolve_split(tmp_path, str(txt), "mine") == (
        "v1.0-mini",
        "mine",
        ["scene-0061", "scene-0103"],
    )
    with pytest.raises(ValueError, match="not in split file"):
        index.resolve_split(tmp_path, str(txt), "val")
    bad = tmp_path / "bad.txt"
    bad.write_text("train scene-0061 scene-0103\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        index.resolve_split(tmp_path, str(bad), "train")


def test_packed_records_roundtrip():
    recs = [{"a": np.arange(i), "s": "x" * i} for i in range(5)]
    packed = index.PackedRecords(recs)
    assert len(packed) == 5
    for got, want in zip(packed, recs):
        np.testing.assert_array_equal(got["a"], want["a"])
        assert got["s"] == want["s"]
    assert packed[-1]["s"] == "xxxx"
    with pytest.raises(IndexError):
        packed[5]


# -- on the synthetic set -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nusc(synthetic_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)


def test_cache_hit_skips_devkit_and_is_identical(synthetic_root, tmp_path):
    before = index.DEVKIT_LOADS
    t0 = time.perf_counter()
    first, info1 = index.load_index(
        synthetic_root, "mini", "val", nsweeps=3, cache_dir=tmp_path, verbose=False
    )
    build_s = time.perf_counter() - t0
    assert index.DEVKIT_LOADS == before + 1 and not info1["cache_hit"]
    t0 = time.perf_counter()
    second, info2 = index.load_index(
        synthetic_root, "mini", "val", nsweeps=3, cache_dir=tmp_path, verbose=False
    )
    hit_s = time.perf_counter() - t0
    assert index.DEVKIT_LOADS == before + 1 and info2["cache_hit"]
    assert info2["cache_path"] == info1["cache_path"]
    np.testing.assert_array_equal(first.offsets, second.offsets)
    assert first.data.tobytes() == second.data.tobytes()
    assert hit_s < build_s
    print(f"index build {build_s:.2f}s, cache hit {hit_s * 1e3:.1f} ms, {len(first)} samples")

    # Another split, version depth or dataroot state is another cache entry.
    _, info3 = index.load_index(synthetic_root, "mini", "train", nsweeps=3, cache_dir=tmp_path, verbose=False)
    _, info4 = index.load_index(synthetic_root, "mini", "val", nsweeps=1, cache_dir=tmp_path, verbose=False)
    assert len({info1["cache_path"], info3["cache_path"], info4["cache_path"]}) == 3
    assert index.DEVKIT_LOADS == before + 3


def test_cache_env_var(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BEVTRAIN_CACHE", str(tmp_path / "envcache"))
    assert index.default_cache_dir() == tmp_path / "envcache"
    _, info = index.load_index(synthetic_root, "mini", "val", nsweeps=1, verbose=False)
    assert info["cache_path"].startswith(str(tmp_path / "envcache"))


def test_cache_hit_does_not_import_devkit(synthetic_root, tmp_path):
    index.load_index(synthetic_root, "mini", "val", nsweeps=3, cache_dir=tmp_path, verbose=False)
    code = (
        "import sys; from bevtrain.config import DataConfig;"
        "from bevtrain.data.dataset import NuScenesBEVDataset;"
        f"data = DataConfig.make(data_dir={str(synthetic_root)!r}, dset='mini', cache_dir={str(tmp_path)!r});"
        "ds = NuScenesBEVDataset(data, 'val', is_train=False);"
        "ds[0];"
        "bad = [m for m in sys.modules if m.startswith('nuscenes')];"
        "assert not bad, bad; print(len(ds))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_records_match_devkit_tables(synthetic_root, nusc, tmp_path):
    from nuscenes.utils.splits import create_splits_scenes

    recs, _ = index.load_index(synthetic_root, "mini", "train", nsweeps=3, cache_dir=tmp_path, verbose=False)
    scenes = set(create_splits_scenes()["mini_train"])
    want = [s for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]
    assert len(recs) == len(want) > 0
    by_token = {r["token"]: r for r in recs}
    order = [(r["scene_name"], r["timestamp"]) for r in recs]
    assert order == sorted(order)
    for sample in want[:5]:
        rec = by_token[sample["token"]]
        for cam in index.CAMERA_NAMES:
            sd = nusc.get("sample_data", sample["data"][cam])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            assert rec["cams"][cam]["path"] == sd["filename"]
            np.testing.assert_allclose(rec["cams"][cam]["pix_T_cam"][:3, :3], cs["camera_intrinsic"])
            np.testing.assert_allclose(rec["cams"][cam]["ego_T_cam"][:3, 3], cs["translation"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            np.testing.assert_allclose(rec["cams"][cam]["global_T_ego"][:3, 3], pose["translation"])
        # Sweeps follow prev: newest first, up to nsweeps, each with its own ego pose.
        for chan, sweeps in rec["sweeps"].items():
            sd = nusc.get("sample_data", sample["data"][chan])
            for k, path in enumerate(sweeps["paths"]):
                assert path == sd["filename"]
                pose = nusc.get("ego_pose", sd["ego_pose_token"])
                cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
                from nuscenes.utils.geometry_utils import transform_matrix
                from pyquaternion import Quaternion

                g = transform_matrix(pose["translation"], Quaternion(pose["rotation"])) @ transform_matrix(
                    cs["translation"], Quaternion(cs["rotation"])
                )
                np.testing.assert_allclose(sweeps["global_T_sensor"][k], g, atol=1e-9)
                if k + 1 < len(sweeps["paths"]):
                    sd = nusc.get("sample_data", sd["prev"])
            assert len(sweeps["paths"]) == 3 or sd["prev"] == ""
        assert len(rec["boxes"]["category"]) == len(sample["anns"])
        ann = nusc.get("sample_annotation", sample["anns"][0])
        np.testing.assert_allclose(rec["boxes"]["center"][0], ann["translation"])
        assert rec["boxes"]["instance"][0] == ann["instance_token"]
        assert rec["boxes"]["visibility"][0] == int(ann["visibility_token"])
