"""Map-layer targets (issue 22) against the devkit's own rasteriser, NuScenesMap.get_map_mask, on the
synthetic set's map expansion; flips and reference cameras; the eight-channel list; bad expansion files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_dataset

from bevtrain.classes import MAP_LINE_LAYERS, MAP_POLYGON_LAYERS
from bevtrain.data import targets
from bevtrain.data.index import MapExpansionError, expansion_path
from bevtrain.geometry import Vox_util

LAYERS = list(MAP_POLYGON_LAYERS + MAP_LINE_LAYERS)
EIGHT = ["vehicle", "pedestrian", "drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area",
         "divider"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("index_cache")


@pytest.fixture(scope="module")
def maps(synthetic_root):
    from nuscenes.map_expansion.map_api import NuScenesMap

    cache = {}

    def get(location):
        if location not in cache:
            cache[location] = NuScenesMap(dataroot=str(synthetic_root), map_name=location)
        return cache[location]

    return get


def _ds(root, cache, split="val", is_train=False, **kw):
    return make_dataset(root, split, is_train, **{"res_scale": 0.25, "cache_dir": cache, **kw})


def devkit_masks(nmap, ref_T_global: np.ndarray, vox: Vox_util, layers) -> np.ndarray:
    """(L,Z,X) bool: get_map_mask on the patch that covers the grid, its pixel centres on our cell centres.

    The devkit's canvas has rows along local y (left) and columns along local x (the patch angle's
    direction, here forward), pixel k centred k pixels from the patch edge: so the patch is the grid
    shifted by half a cell forward and left, and our (row, col) is its (X - 1 - col, row)."""
    global_T_ref = np.linalg.inv(ref_T_global)
    origin = global_T_ref[:2, 3]
    fwd = global_T_ref[:2, 2] / np.linalg.norm(global_T_ref[:2, 2])  # ref z (forward) in the global plane
    left = -global_T_ref[:2, 0] / np.linalg.norm(global_T_ref[:2, 0])
    dx, dz = vox.vox_size_x, vox.vox_size_z
    xc, zc = (vox.xmin + vox.xmax) / 2, (vox.zmin + vox.zmax) / 2
    centre = origin + fwd * (zc + dz / 2) + left * (-xc + dx / 2)
    angle = float(np.degrees(np.arctan2(fwd[1], fwd[0])))
    patch = (centre[0], centre[1], vox.xmax - vox.xmin, vox.zmax - vox.zmin)
    masks = nmap.get_map_mask(patch, angle, list(layers), (vox.X, vox.Z))  # (L, X, Z)
    return masks[:, ::-1, :].transpose(0, 2, 1) > 0


def _mirror(sample) -> np.ndarray:
    """The sample's BEV mirror M (cams_T_ref[0] is M, up to the ego motion under the simplebev raster)."""
    return np.diag(np.round(np.diag(sample["cams_T_ref"][0].double().numpy())))


def _flip(masks: np.ndarray, m: np.ndarray) -> np.ndarray:
    if m[0, 0] < 0:
        masks = masks[..., ::-1]
    if m[2, 2] < 0:
        masks = masks[..., ::-1, :]
    return masks


def _near(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cells of a with no cell of b within one cell (8-neighbourhood)."""
    return a & ~(cv2.dilate(b.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)


@pytest.mark.parametrize("raster", ["simplebev", "exact"])
def test_map_targets_match_the_devkit_on_every_val_sample_and_every_training_draw(synthetic_root, cache, maps,
                                                                                 raster):
    kw = dict(classes=LAYERS, target_raster=raster)
    # val, and training draws: random reference camera, BEV mirrors, image crops
    datasets = [_ds(synthetic_root, cache, **kw), _ds(synthetic_root, cache, "train", True, **kw)]
    inter, union, pixels = (np.zeros(len(LAYERS)) for _ in range(3))
    mirrors, refs = set(), set()
    for ds in datasets:
        for i in range(len(ds)):
            s, rec = ds[(i, 0)], ds.records[i]
            m = _mirror(s)
            # ref_T_ego = M ref_T_global global_T_ego (dataset docstring); M is its own inverse
            ref_T_global = m @ s["ref_T_ego"].double().numpy() @ np.linalg.inv(rec["global_T_ego_lidar"])
            want = _flip(devkit_masks(maps(rec["location"]), ref_T_global, ds.vox, LAYERS), m)
            got = s["seg_bev"].numpy() > 0
            assert (s["valid_bev"] == 1).all()
            mirrors.add((m[0, 0], m[2, 2]))
            refs.add(int(s["cam_ids"][0]))
            for k, layer in enumerate(LAYERS):
                inter[k] += (got[k] & want[k]).sum()
                union[k] += (got[k] | want[k]).sum()
                pixels[k] += want[k].sum()
                if layer in MAP_LINE_LAYERS:  # the same line cells, within one cell
                    assert not _near(got[k], want[k]).any() and not _near(want[k], got[k]).any(), (layer, i)
    iou = dict(zip(LAYERS, np.round(inter / np.maximum(union, 1), 4)))
    assert (pixels > 0).all(), f"every layer should appear in the synthetic splits: {pixels}"
    print(f"devkit comparison ({raster}): IoU per layer {iou}")
    for layer in MAP_POLYGON_LAYERS:
        assert iou[layer] >= 0.98, iou
    assert len(mirrors) == 4 and len(refs) >= 4, (mirrors, refs)


def test_eight_channels_objects_and_map_layers(synthetic_root, cache):
    ds = _ds(synthetic_root, cache, classes=EIGHT, target_raster="exact")
    alone = {c: _ds(synthetic_root, cache, classes=[c], target_raster="exact") for c in EIGHT[:2]}
    parts = _ds(synthetic_root, cache, classes=["road_divider", "lane_divider"], target_raster="exact")
    seen = np.zeros(len(EIGHT))
    for i in range(len(ds)):
        s = ds[i]
        assert s["seg_bev"].shape == s["valid_bev"].shape == (8, 200, 200)
        seg, valid = s["seg_bev"].numpy(), s["valid_bev"].numpy()
        for k, c in enumerate(EIGHT[:2]):
            a = alone[c][i]
            np.testing.assert_array_equal(seg[k], a["seg_bev"][0])
            np.testing.assert_array_equal(valid[k], a["valid_bev"][0])
        assert (valid[2:] == 1).all()
        p = parts[i]["seg_bev"].numpy()
        np.testing.assert_array_equal(seg[7], np.maximum(p[0], p[1]))  # divider = road ∪ lane dividers
        assert set(np.unique(seg)) <= {0.0, 1.0}
        seen += seg.sum(axis=(1, 2)) > 0
    assert (seen > 0).all(), dict(zip(EIGHT, seen))


def test_map_outputs_between_object_outputs_match_the_same_outputs_in_one_block(synthetic_root, cache):
    """Map channels that are not consecutive (drawn, then copied into place) equal consecutive ones."""
    block = _ds(synthetic_root, cache, "train", True, classes=["vehicle", "drivable_area", "divider"])
    mixed = _ds(synthetic_root, cache, "train", True, classes=["drivable_area", "vehicle", "divider"])
    assert block.map_block == slice(1, 3) and mixed.map_block is None
    for i in range(0, len(block), 7):
        a, b = block[(i, 0)]["seg_bev"], mixed[(i, 0)]["seg_bev"]
        assert torch.equal(a[[1, 0, 2]], b)
        assert a[1:].sum() > 0


def test_map_layer_lands_forward_and_right_on_the_grid():
    """A 4 x 2 m rectangle 20 m ahead and 10 m right of a reference camera at a yaw of 30 degrees."""
    vox = Vox_util(200, 8, 200, scene_centroid=(0.0, 1.0, 0.0), bounds=(-50, 50, -5, 5, -50, 50))
    yaw = np.radians(30.0)
    fwd, right = np.array([np.cos(yaw), np.sin(yaw)]), np.array([np.sin(yaw), -np.cos(yaw)])
    pos = np.array([1000.0, 2000.0])
    global_T_ref = np.eye(4)  # camera axes: x right, y down, z forward
    global_T_ref[:3, 0], global_T_ref[:3, 1], global_T_ref[:3, 2] = [*right, 0], [0, 0, -1], [*fwd, 0]
    global_T_ref[:3, 3] = [*pos, 1.5]
    corners = [pos + fwd * f + right * r for f, r in ((18.1, 9.1), (22.1, 9.1), (22.1, 11.1), (18.1, 11.1))]
    layer = {"xy": np.array(corners), "ring_start": np.array([0, 4]), "shape_start": np.array([0, 1]),
             "bbox": np.array([[*np.min(corners, 0), *np.max(corners, 0)]])}
    mask = targets.map_layer_mask(layer, np.linalg.inv(global_T_ref), vox, line=False)
    rows, cols = np.nonzero(mask)
    # continuous cells (centres at integers): z 18.1..22.1 m -> rows 135.7..143.7, x 9.1..11.1 m -> columns
    # 117.7..121.7; vertices rounded to the nearest centre, and the cells on the edges filled
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (136, 144, 118, 122)


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture
def root_copy(synthetic_root, tmp_path):
    """The synthetic set with its own maps/ folder (everything else linked)."""
    root = tmp_path / "root"
    root.mkdir()
    for p in Path(synthetic_root).iterdir():
        if p.name != "maps":
            (root / p.name).symlink_to(p)
    (root / "maps" / "expansion").mkdir(parents=True)
    for p in (Path(synthetic_root) / "maps").glob("*.png"):
        (root / "maps" / p.name).symlink_to(p)
    for p in (Path(synthetic_root) / "maps" / "expansion").iterdir():
        (root / "maps" / "expansion" / p.name).write_bytes(p.read_bytes())
    return root


VAL_LOCATION = "boston-seaport"  # the location of scene-0103 (mini_val)


@pytest.mark.parametrize("damage, message", [
    ("missing", r"boston-seaport\.json do\(es\) not exist.*nuScenes-map-expansion-v1\.3"),
    ("truncated", r"boston-seaport\.json is not valid JSON.*nuScenes-map-expansion-v1\.3"),
    ("old", r"boston-seaport\.json is map expansion version 1\.2; version 1\.3 is needed"),
    ("no_layer", r"boston-seaport\.json has no carpark_area table"),
])
def test_a_bad_expansion_file_stops_before_training_naming_it(root_copy, tmp_path, damage, message):
    path = expansion_path(root_copy, VAL_LOCATION)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        data = json.loads(path.read_text())
        if damage == "old":
            data["version"] = "1.2"
        else:
            del data["carpark_area"]
        path.write_text(json.dumps(data))
    with pytest.raises(MapExpansionError, match=message):
        make_dataset(root_copy, "val", False, classes=["vehicle", "carpark_area"], cache_dir=tmp_path / "c")
    # object classes alone do not need the map
    make_dataset(root_copy, "val", False, classes=["vehicle", "pedestrian"], cache_dir=tmp_path / "c")


def test_verify_checks_the_expansion_files_of_the_locations_used(root_copy, tmp_path, capsys):
    from bevtrain.data.verify import verify

    kw = dict(dset="mini", workers=1, cache_dir=str(tmp_path / "c"), progress=False)
    assert "map_expansion" not in verify(str(root_copy), **kw)["problems"]
    path = expansion_path(root_copy, VAL_LOCATION)
    path.write_bytes(path.read_bytes()[:1000])
    summary = verify(str(root_copy), **kw)
    [(bad_path, _, why)] = summary["problems"]["map_expansion"]
    assert bad_path == str(path) and "not valid JSON" in why
    assert "map expansion missing or unusable: 1" in capsys.readouterr().out


def test_cached_map_layers_load_without_the_devkit(synthetic_root, cache):
    _ds(synthetic_root, cache, classes=["vehicle", "divider"])  # builds index and map caches
    code = ("import sys; from conftest import make_dataset; "
            f"ds = make_dataset({str(synthetic_root)!r}, 'val', False, classes=['vehicle', 'divider'], "
            f"cache_dir={str(cache)!r}, res_scale=0.25); ds[0]; "
            "assert not [m for m in sys.modules if m.startswith('nuscenes')], 'devkit imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_the_map_expansion_agrees_with_the_world_the_sensors_see(synthetic_root, maps):
    """Read through the devkit alone: the ego drives on the road, moving vehicles are on drivable area,
    pedestrians walk on walkways, the car park holds parked cars (and only them)."""
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)
    attribute = {a["token"]: a["name"] for a in nusc.attribute}
    in_carpark, peds_on_walkway, peds = 0, 0, 0
    for sample in nusc.sample:
        location = nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])["location"]
        nmap = maps(location)
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        x, y = pose["translation"][:2]
        assert nmap.record_on_point(x, y, "drivable_area") and nmap.record_on_point(x, y, "road_segment")
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            x, y = ann["translation"][:2]
            names = {attribute[a] for a in ann["attribute_tokens"]}
            if "vehicle.moving" in names:
                assert nmap.record_on_point(x, y, "drivable_area"), ann["category_name"]
            if nmap.record_on_point(x, y, "carpark_area"):
                assert ann["category_name"] == "vehicle.car" and names == {"vehicle.parked"}
                in_carpark += 1
            if ann["category_name"].startswith("human.pedestrian"):
                peds += 1
                peds_on_walkway += bool(nmap.record_on_point(x, y, "walkway"))
    assert in_carpark > 0
    assert peds_on_walkway >= 0.8 * peds, (peds_on_walkway, peds)
