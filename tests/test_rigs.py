"""Any camera rig (issue 24): the synthetic generator's --rig, camera discovery, the dataset's geometry
against the devkit's own projections, and training, evaluation and pictures end to end on four cameras
with other names (1280x720 shape), on one camera and on a rig whose cameras differ in size."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from test_dataset import _warp_check

from bevtrain.checkpoint import load_checkpoint
from bevtrain.data import augment, index
from bevtrain.data.dataset import RigError
from bevtrain.synthetic.catalog import RIGS, camera_sizes

# Two scenes (one mini_train, one mini_val) of two keyframes at a fifth of the rigs' sizes: four
# 256x144 cameras, one 205x154 camera; mixed 384x216 + 128x96.
RIG_SET = dict(keyframes=2, scenes=2, width=320, height=180, seed=0)
TINY = dict(
    encoder_type="res18", encoder_weights="none", res_scale=0.25, Z=32, Y=4, X=32, latent_dim=16,
    batch_size=1, grad_acc=1, nworkers=0, device="cpu", dset="mini", amp="none", ncams=0, refcam_id=0,
)  # fmt: skip
VIZ_CELL = 120
BACKGROUND = np.array([18, 18, 18], np.uint8)  # viz.BACKGROUND


@pytest.fixture(scope="module")
def rig_root(tmp_path_factory):
    """rig name -> a tiny synthetic set of that rig, the 'four' one written through the command line."""
    from bevtrain.synthetic import ensure_synthetic
    from bevtrain.synthetic.__main__ import main as synthetic_main

    roots = {}

    def get(rig: str) -> Path:
        if rig not in roots:
            root = tmp_path_factory.mktemp(f"rig_{rig}")
            if rig == "four":
                synthetic_main([f"--out={root}", "--rig=four", "--keyframes=2", "--scenes=2", "--width=320",
                                "--height=180", "--workers=1"])
            else:
                ensure_synthetic(root, rig=rig, progress=False, workers=1, **RIG_SET)
            roots[rig] = root
        return roots[rig]

    return get


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rig_index_cache")


def _devkit(root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-mini", dataroot=str(root), verbose=False)


def test_generator_writes_each_rig_with_its_own_sizes_and_intrinsics(rig_root):
    import cv2

    for rig in ("four", "one", "mixed"):
        nusc = _devkit(rig_root(rig))
        cams = {s["channel"] for s in nusc.sensor if s["modality"] == "camera"}
        assert cams == set(RIGS[rig]), rig
        sizes = camera_sizes(rig, RIG_SET["width"], RIG_SET["height"])
        for sd in nusc.sample_data:
            ch = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            channel = nusc.get("sensor", ch["sensor_token"])["channel"]
            if channel not in cams:
                continue
            w, h = sizes[channel]
            assert (sd["width"], sd["height"]) == (w, h)
            img = cv2.imread(str(Path(nusc.dataroot) / sd["filename"]))
            assert img.shape[:2] == (h, w)
            # the rig's intrinsics at its own size, scaled with pixel centres kept
            _, _, f, cx, cy, W, H = RIGS[rig][channel]
            K = np.asarray(ch["camera_intrinsic"])
            np.testing.assert_allclose(K[0], [f * w / W, 0, (cx + 0.5) * w / W - 0.5], rtol=1e-12)
            np.testing.assert_allclose(K[1], [0, f * h / H, (cy + 0.5) * h / H - 0.5], rtol=1e-12)
    assert camera_sizes("four", 1600, 900) == dict.fromkeys(RIGS["four"], (1280, 720))
    assert len({s for s in camera_sizes("mixed", 320, 180).values()}) == 2


def test_index_discovers_the_rig_and_the_cameras_flag_picks_and_orders(rig_root, cache, synthetic_root):
    assert index.order_cameras(["b", "CAM_BACK", "a", "CAM_FRONT"]) == ["CAM_FRONT", "CAM_BACK", "a", "b"]
    _, info = index.load_index(synthetic_root, "mini", "val", cache_dir=cache, verbose=False)
    assert info["cameras"] == index.CAMERA_NAMES  # nuScenes keeps its order (and cam_ids)
    four = rig_root("four")
    _, info = index.load_index(four, "mini", "val", cache_dir=cache, verbose=False)
    assert info["cameras"] == ["FRONT_CAM", "LEFT_CAM", "REAR_CAM", "RIGHT_CAM"]

    ds = make_dataset(four, cache_dir=cache, res_scale=0.25, Z=32, Y=4, X=32, ncams=0, refcam_id=2)
    assert ds.camera_names == info["cameras"] and ds.ncams == 4
    out = ds[0]
    assert out["cam_ids"].tolist() == [2, 0, 1, 3] and out["images"].shape == (4, 3, 56, 100)
    assert json.loads(out["cam_names"]) == ["REAR_CAM", "FRONT_CAM", "LEFT_CAM", "RIGHT_CAM"]
    picked = make_dataset(four, cache_dir=cache, res_scale=0.25, Z=32, Y=4, X=32, ncams=0, refcam_id=0,
                          cameras=["RIGHT_CAM", "FRONT_CAM"])  # fmt: skip
    assert json.loads(picked[0]["cam_names"]) == ["RIGHT_CAM", "FRONT_CAM"]
    cases = [
        (dict(ncams=6), "ncams=6 must be in 1..4"),  # the nuScenes default on a four-camera rig
        (dict(ncams=0, refcam_id=4), "refcam_id=4 must index the 4 camera(s)"),
        (dict(ncams=0, cameras=["FRONT_CAM", "CAM_FRONT"]), "names ['CAM_FRONT'], not cameras of"),
    ]
    for settings, message in cases:
        with pytest.raises(RigError, match=None) as e:
            make_dataset(four, cache_dir=cache, res_scale=0.25, Z=32, Y=4, X=32, **settings)
        assert message in str(e.value) and "FRONT_CAM, LEFT_CAM, REAR_CAM, RIGHT_CAM" in str(e.value)


@pytest.mark.parametrize("rig", ["four", "one", "mixed"])
def test_boxes_project_like_the_devkit_on_other_rigs(rig_root, cache, rig):
    """Devkit boxes in each camera (get_sample_data, view_points with its K) land where bevtrain's
    pix_T_cams (after the per-camera resize to 56x100) put them, to 1e-3 px; bevtrain's box corners and
    cams_T_ref give the devkit's camera-frame corners."""
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    root = rig_root(rig)
    nusc = _devkit(root)
    checked, sizes = 0, set()
    for fast_decode, i in [(False, 0), (False, 1), (True, 0)]:
        ds = make_dataset(root, cache_dir=cache, res_scale=0.25, Z=32, Y=4, X=32, ncams=0, refcam_id=0,
                          target_raster="exact", classes=["vehicle", "pedestrian", "barrier", "traffic_cone"],
                          fast_decode=fast_decode)  # fmt: skip
        out, rec = ds[i], ds.records[i]
        sample = nusc.get("sample", out["sample_token"])
        n = int(out["box_count"])
        corners_ref = out["box_corners"][:n].double().numpy()
        for s, name in enumerate(json.loads(out["cam_names"])):
            sd = nusc.get("sample_data", sample["data"][name])
            w, h = sd["width"], sd["height"]
            sizes.add((w, h))
            _, boxes, K = nusc.get_sample_data(sample["data"][name], box_vis_level=BoxVisibility.NONE)
            np.testing.assert_array_equal(rec["cams"][name]["pix_T_cam"][:3, :3], K)
            pix_T_cam = out["pix_T_cams"][s].double().numpy()
            # How this camera's 56x100 input was made from its own size: a JPEG decode at 1/f (pixel k is
            # the block [f k, f k + f), the last one padded), then a resize of the decoded image to 100x56.
            f = augment.decode_factor((w, h), (100, 56), fast_decode)
            dec_w, dec_h = -(-w // f), -(-h // f)
            cam_T_ref = out["cams_T_ref"][s].double().numpy()
            ours_cam = corners_ref @ cam_T_ref[:3, :3].T + cam_T_ref[:3, 3]  # (n, 8, 3)
            theirs_all = np.stack([b.corners().T for b in boxes]) if boxes else np.zeros((0, 8, 3))
            for c in ours_cam:  # each of bevtrain's boxes is one of the devkit's (same corner order)
                assert np.abs(theirs_all - c).max(axis=(1, 2)).min() < 2e-3
            for box in boxes:
                corners = box.corners()  # (3, 8) camera frame, from the devkit alone
                front = corners[2] > 0.5
                if not front.any():
                    continue
                theirs = view_points(corners[:, front], K, normalize=True)[:2]
                scale = np.array([[100 / dec_w], [56 / dec_h]]) / f  # source -> input pixel, centres kept
                want = (theirs + 0.5) * scale - 0.5
                ours = view_points(corners[:, front], pix_T_cam[:3, :3], normalize=True)[:2]
                np.testing.assert_allclose(ours, want, atol=1e-3, rtol=0)
                checked += 1
    assert checked > 10
    assert len(sizes) == (2 if rig == "mixed" else 1)


@pytest.mark.parametrize("rig", ["four", "mixed"])
def test_train_augmentation_resizes_each_camera_from_its_own_size(rig_root, cache, rig):
    """Random resize / crop / flip per camera: the image content matches its intrinsics (a 1.5 px error
    in cx reads clearly worse)."""
    import cv2

    root = rig_root(rig)
    ds = make_dataset(root, "train", True, cache_dir=cache, res_scale=0.5, Z=32, Y=4, X=32, ncams=0,
                      refcam_id=0, seed=1)  # fmt: skip
    out, rec = ds[0], ds.records[0]
    for s, name in enumerate(json.loads(out["cam_names"])):
        K_aug = out["pix_T_cams"][s].double().numpy()
        K_raw = rec["cams"][name]["pix_T_cam"]
        orig = cv2.imread(f"{root}/{rec['cams'][name]['path']}")[:, :, ::-1].copy()
        err, frac = _warp_check(out["images"][s].numpy(), orig, K_aug, K_raw)
        K_off = K_aug.copy()
        K_off[0, 2] += 1.5
        err_off, _ = _warp_check(out["images"][s].numpy(), orig, K_off, K_raw)
        assert frac > 0.5 and err < 8 and err < 0.8 * err_off, (name, err, err_off)


def _camera_cells(png: Path, rows: int, cols: int, cell_h: int) -> list:
    """Whether each cell of the camera block (below the 26 px header) shows an image."""
    from bevtrain.viz import read_png

    img = read_png(png)
    width = img.shape[1] // cols
    block = img[26 : 26 + rows * cell_h]
    return [bool((block[r * cell_h : (r + 1) * cell_h, c * width : (c + 1) * width] != BACKGROUND).any())
            for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize("rig, grid", [("four", (2, 2)), ("one", (1, 3))])
def test_train_evaluate_draw_end_to_end(rig_root, cache, tmp_path, rig, grid):
    """The real training loop (ncams derived from the rig), its evaluation and composites."""
    from bevtrain.evaluate import evaluate
    from bevtrain.train import main as train_main

    root = rig_root(rig)
    with contextlib.redirect_stdout(io.StringIO()):
        res = train_main(**TINY, data_dir=str(root), cache_dir=str(cache), max_iters=2, val_freq=2,
                         val_batches=1, viz_freq=2, log_freq=1, save_freq=2, exp_name=f"rig_{rig}",
                         ckpt_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"))  # fmt: skip
        run_dir = tmp_path / "ckpt" / res["run_name"]
        summary = evaluate(init_dir=str(run_dir), viz_every=1, max_viz=2, viz_width=VIZ_CELL, nworkers=0,
                           log_dir=str(tmp_path / "logs"), tensorboard=False)  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["samples"] == 2 and metrics["step"] == 2
    assert all(0 <= metrics["protocols"][p]["intersection"] <= metrics["protocols"][p]["union"]
               for p in ("simplebev", "lss"))
    assert len(summary["pngs"]) == 2
    rows, cols = grid
    # nuScenes' names keep nuScenes' 2x3 layout (one camera: its cell of the front row); other rigs a
    # grid as wide as the three BEV panels
    cell_h = round(56 * (3 * VIZ_CELL // cols) / 100)
    for png in summary["pngs"]:
        from bevtrain.viz import read_png

        h, w = read_png(png).shape[:2]
        assert (h, w) == (26 + rows * cell_h + 28 + VIZ_CELL + 48, 3 * VIZ_CELL)
        cells = _camera_cells(Path(png), rows, cols, cell_h)
        assert cells == ([True] * 4 if rig == "four" else [False, True, False]), cells
    assert load_checkpoint(run_dir / "model-000000002.pth")["config"]["ncams"] == 0
