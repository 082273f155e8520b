"""Shared fixtures: one small synthetic nuScenes set per test session, read by the real devkit.

Set BEVTRAIN_TEST_DATA=DIR to reuse a set across runs (it is regenerated when the generator or
its parameters change).
"""

import os
from pathlib import Path

import pytest

# Small enough to generate in seconds, large enough for every split: 10 scenes x 4 keyframes.
TEST_SET = dict(keyframes=4, seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from bevtrain.synthetic import ensure_synthetic

    root = os.environ.get("BEVTRAIN_TEST_DATA")
    root = Path(root) if root else tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root, progress=False, **TEST_SET)
    return root


def make_dataset(root, split="val", is_train=False, fast_decode=True, **settings):
    """NuScenesBEVDataset of ``root`` with data settings named as flags (dset 'mini' unless given)."""
    from bevtrain.config import DataConfig
    from bevtrain.data.dataset import NuScenesBEVDataset

    settings.setdefault("dset", "mini")
    data = DataConfig.make(data_dir=root, **settings)
    return NuScenesBEVDataset(data, split=split, is_train=is_train, fast_decode=fast_decode)
