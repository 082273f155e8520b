"""The synthetic nuScenes set, read by the real nuscenes-devkit, is complete and true to itself."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

nuscenes = pytest.importorskip("nuscenes")
from nuscenes.nuscenes import NuScenes  # noqa: E402
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud  # noqa: E402
from nuscenes.utils.splits import create_splits_scenes  # noqa: E402

from bevtrain.data.synthetic import MARKER, MINI_SCENES  # noqa: E402


@pytest.fixture(scope="module")
def nusc(synthetic_root) -> NuScenes:
    return NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)


def test_mini_splits_and_scene_names(nusc):
    names = {s["name"] for s in nusc.scene}
    assert names == set(MINI_SCENES)
    splits = create_splits_scenes()
    assert set(splits["mini_train"]) | set(splits["mini_val"]) == names
    for scene in nusc.scene:
        tokens = []
        tok = scene["first_sample_token"]
        while tok:
            tokens.append(tok)
            tok = nusc.get("sample", tok)["next"]
        assert len(tokens) == scene["nbr_samples"]
        assert tokens[-1] == scene["last_sample_token"]


def test_every_file_exists_and_parses(nusc, synthetic_root):
    RadarPointCloud.default_filters()
    for sd in nusc.sample_data:
        path = Path(synthetic_root) / sd["filename"]
        assert path.is_file(), path
        if sd["sensor_modality"] == "camera":
            img = cv2.imread(str(path))
            assert img is not None and img.shape == (sd["height"], sd["width"], 3), path
        elif sd["sensor_modality"] == "lidar":
            pc = LidarPointCloud.from_file(str(path))
            assert pc.points.shape[0] == 4 and pc.points.shape[1] > 1000, path
        else:
            assert RadarPointCloud.from_file(str(path)).points.shape[0] == 18
    marker = json.loads((Path(synthetic_root) / MARKER).read_text())
    assert marker["stats"]["samples"] == len(nusc.sample)
    assert np.isfinite(marker["stats"]["bytes"])
