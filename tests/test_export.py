"""bevtrain.export: the .pt2 program of a checkpoint and a rig gives the eager network's probabilities."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch

from bevtrain.data import augment


def test_exported_program_matches_eager_at_any_batch(synthetic_root, tmp_path):
    from test_predict import _train

    from bevtrain.export import RigNet, input_intrinsics, main
    from bevtrain.predict import load_model
    from bevtrain.predict import main as predict_main
    from bevtrain.rig import read_rig

    run = _train(tmp_path, synthetic_root, tmp_path / "cache")
    rig = tmp_path / "rig.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        predict_main(rig_from=str(synthetic_root), rig=str(rig), cache_dir=str(tmp_path / "cache"))
        main(init_dir=str(run), rig=str(rig), out=str(tmp_path / "model.pt2"))
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["batch"].startswith("any batch size") and record["input"]["cameras"][0] == "CAM_FRONT"
    program = torch.export.load(str(tmp_path / "model.pt2")).module()

    # eager: the network as predict runs it (sparse lift), the rig's matrices as predict computes them
    loaded = load_model(str(run), None, torch.device("cpu"))
    the_rig = read_rig(rig)
    final_dim = augment.final_dim_for(loaded.cfg.res_scale)
    eager = RigNet(loaded.model, input_intrinsics(the_rig, final_dim), the_rig.cams_T_ref()).eval()
    assert eager.model.lift_impl == "sparse"
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        images = torch.rand(batch, 6, 3, *final_dim, generator=gen)  # (B,S,3,H,W)
        with torch.no_grad():
            want, got = eager(images), program(images)
        assert got.shape == (batch, 1, 50, 50)
        assert float((got - want).abs().max()) <= 1e-4


def test_input_intrinsics_are_predicts(synthetic_root, tmp_path):
    """The matrices inside the program are those load_frame_images gives with the images."""
    from bevtrain.data.index import CAMERA_NAMES, load_index
    from bevtrain.export import input_intrinsics
    from bevtrain.predict import load_frame_images, rig_from_dataroot

    rig, _ = rig_from_dataroot(str(synthetic_root), "mini", "val", cache_dir=str(tmp_path))
    records, info = load_index(synthetic_root, "mini", "val", cache_dir=str(tmp_path), verbose=False)
    by_name = {c.name: c for c in rig.model_order()}
    paths = [f"{info['dataroot']}/{records[0]['cams'][c.name]['path']}" for c in rig.model_order()]
    assert set(by_name) == set(CAMERA_NAMES)
    for final_dim in ((56, 100), (224, 400)):
        for compat in ("none", "simplebev"):
            _, pix = load_frame_images(paths, rig, final_dim, compat)
            assert np.allclose(input_intrinsics(rig, final_dim, compat), pix, atol=1e-9, rtol=0)
