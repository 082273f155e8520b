"""The synthetic nuScenes set, read by the real nuscenes-devkit, is complete and true to itself:
files parse, images show each object where the devkit projects its box, lidar and radar returns lie
on the ground or on annotated boxes, and generation is deterministic and crash-safe."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("nuscenes")
from nuscenes.nuscenes import NuScenes  # noqa: E402
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud  # noqa: E402
from nuscenes.utils.geometry_utils import BoxVisibility, transform_matrix, view_points  # noqa: E402
from nuscenes.utils.splits import create_splits_scenes  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

from bevtrain.synthetic import (  # noqa: E402
    MARKER,
    MINI_SCENES,
    PROBE_CATEGORIES,
    PROBE_HEIGHT,
    body_color,
    ensure_synthetic,
    generate,
    shade,
)
from bevtrain.synthetic import render as synthetic_render  # noqa: E402
from bevtrain.synthetic import sensors as synthetic_sensors  # noqa: E402
from bevtrain.synthetic.catalog import RADAR_PERIOD_US  # noqa: E402
from bevtrain.synthetic.sensors import RADAR_DTYPE  # noqa: E402

TINY = dict(keyframes=2, scenes=1, width=320, height=180, workers=1, progress=False)


@pytest.fixture(scope="module")
def nusc(synthetic_root) -> NuScenes:
    return NuScenes("v1.0-mini", dataroot=str(synthetic_root), verbose=False)


@pytest.fixture(autouse=True)
def _restore_radar_filters():
    yield
    RadarPointCloud.default_filters()


def _sensor_to_global(nusc, sd_token) -> np.ndarray:
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    ego_T_sensor = transform_matrix(cs["translation"], Quaternion(cs["rotation"]))
    global_T_ego = transform_matrix(pose["translation"], Quaternion(pose["rotation"]))
    return global_T_ego @ ego_T_sensor


def _inside_any_box(points_global: np.ndarray, anns, margin: float, shifts=None) -> np.ndarray:
    """(N,) bool: point inside some annotation box grown by `margin` m (and moved by its `shifts` row,
    global m); points (N, 3)."""
    inside = np.zeros(len(points_global), bool)
    for i, ann in enumerate(anns):
        w, l, h = ann["size"]
        centre = np.asarray(ann["translation"]) + (0.0 if shifts is None else shifts[i])
        local = (points_global - centre) @ Quaternion(ann["rotation"]).rotation_matrix
        inside |= (
            (np.abs(local[:, 0]) <= l / 2 + margin)
            & (np.abs(local[:, 1]) <= w / 2 + margin)
            & (np.abs(local[:, 2]) <= h / 2 + margin)
        )
    return inside


def _boxes_moved(nusc, anns, dt_s: float) -> np.ndarray:
    """(len(anns), 3) shifts that move each box by its devkit velocity over `dt_s` seconds: where it is
    when a sensor that fires `dt_s` after the sample (the annotations' time) captures it."""
    v = np.array([nusc.box_velocity(a["token"]) for a in anns]).reshape(-1, 3)
    return np.nan_to_num(v) * dt_s  # nan: a single annotation, no velocity known


def _spread_samples(nusc, n):
    """n keyframes spread over all scenes, none at either end of a scene (deterministic)."""
    inner = [s for s in nusc.sample if s["prev"] and s["next"]]
    idx = np.linspace(0, len(inner) - 1, n).round().astype(int)
    return [inner[i] for i in idx]


def test_mini_splits_scene_chains_and_timestamps(nusc):
    names = {s["name"] for s in nusc.scene}
    assert names == set(MINI_SCENES)
    splits = create_splits_scenes()
    assert set(splits["mini_train"]) <= names and set(splits["mini_val"]) <= names
    assert set(splits["mini_train"]) | set(splits["mini_val"]) == names
    for scene in nusc.scene:
        tokens, tok = [], scene["first_sample_token"]
        while tok:
            tokens.append(tok)
            tok = nusc.get("sample", tok)["next"]
        assert len(tokens) == scene["nbr_samples"] and tokens[-1] == scene["last_sample_token"]
        assert nusc.get("sample", tokens[0])["prev"] == ""
        stamps = [nusc.get("sample", t)["timestamp"] for t in tokens]
        assert all(isinstance(s, int) for s in stamps)
        assert np.allclose(np.diff(stamps), 500_000, atol=20_000)  # 2 Hz keyframes, microseconds


def test_every_file_exists_and_parses(nusc, synthetic_root):
    root = Path(synthetic_root)
    for sd in nusc.sample_data:
        path = root / sd["filename"]
        assert path.is_file(), path
        if sd["sensor_modality"] == "camera":
            img = cv2.imread(str(path))
            assert img is not None and img.shape == (sd["height"], sd["width"], 3) == (900, 1600, 3), path
        elif sd["sensor_modality"] == "lidar":
            assert LidarPointCloud.from_file(str(path)).points.shape[1] > 1000, path
        else:
            RadarPointCloud.default_filters()
            kept = RadarPointCloud.from_file(str(path)).points
            RadarPointCloud.disable_filters()
            raw = RadarPointCloud.from_file(str(path)).points
            assert kept.shape[0] == raw.shape[0] == 18 and kept.shape[1] <= raw.shape[1], path
    for record in nusc.map:
        mask = cv2.imread(str(root / record["filename"]), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and set(np.unique(mask)) <= {0, 255}
    marker = json.loads((root / MARKER).read_text())
    assert marker["stats"]["samples"] == len(nusc.sample)
    assert marker["stats"]["annotations"] == len(nusc.sample_annotation)


def test_keyframes_carry_every_sensor_and_sweeps_chain(nusc):
    channels = {s["channel"] for s in nusc.sensor}
    assert len(channels) == 12
    for sample in nusc.sample:
        assert set(sample["data"]) == channels
    for channel, nsweeps in (("LIDAR_TOP", 3), ("RADAR_FRONT", 5)):
        sample = nusc.sample[3]  # late enough in its scene to have a full history
        sd = nusc.get("sample_data", sample["data"][channel])
        seen = [sd]
        while sd["prev"] and len(seen) < nsweeps:
            sd = nusc.get("sample_data", sd["prev"])
            seen.append(sd)
        assert len(seen) == nsweeps and not seen[1]["is_key_frame"]
        for rec in seen:
            # Sweeps point to the next keyframe, as in nuScenes; a keyframe radar scan may come up to
            # half a radar period after its sample's time.
            owner = nusc.get("sample", rec["sample_token"])
            if rec["is_key_frame"]:
                assert abs(owner["timestamp"] - rec["timestamp"]) <= RADAR_PERIOD_US // 2
                assert channel != "LIDAR_TOP" or owner["timestamp"] == rec["timestamp"]
            else:
                assert owner["timestamp"] > rec["timestamp"]
        assert all(a["timestamp"] > b["timestamp"] for a, b in zip(seen[:-1], seen[1:]))
    RadarPointCloud.disable_filters()  # every scan has returns then (clutter included)
    pc, times = RadarPointCloud.from_file_multisweep(
        nusc, nusc.sample[3], "RADAR_FRONT", "LIDAR_TOP", nsweeps=5
    )
    assert len(np.unique(times)) == 5
    pc, times = LidarPointCloud.from_file_multisweep(
        nusc, nusc.sample[3], "LIDAR_TOP", "LIDAR_TOP", nsweeps=3
    )
    assert len(np.unique(times)) == 3


def test_sensors_fire_in_sequence_each_at_its_own_ego_pose(nusc):
    """As in nuScenes: the sample's time is its LIDAR_TOP scan's; the cameras fire one after another
    as the lidar sweeps past them (CAM_FRONT_LEFT first, CAM_BACK_LEFT last) within the 50 ms before
    it; the radars run free around it; every capture has the ego pose of its own time."""
    order = ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT"]
    radar_offsets, moved = set(), []
    for sample in nusc.sample:
        records = {ch: nusc.get("sample_data", tok) for ch, tok in sample["data"].items()}
        lidar_pose = nusc.get("ego_pose", records["LIDAR_TOP"]["ego_pose_token"])
        assert records["LIDAR_TOP"]["timestamp"] == sample["timestamp"] == lidar_pose["timestamp"]
        cam_times = [records[ch]["timestamp"] - sample["timestamp"] for ch in order]
        assert -50_000 <= cam_times[0] and cam_times == sorted(set(cam_times)) and cam_times[-1] < 0
        for ch, rec in records.items():
            pose = nusc.get("ego_pose", rec["ego_pose_token"])
            assert pose["timestamp"] == rec["timestamp"], ch
            dt = (rec["timestamp"] - sample["timestamp"]) * 1e-6
            step = np.linalg.norm(np.subtract(pose["translation"], lidar_pose["translation"]))
            assert step <= 20.0 * abs(dt) + 1e-6, (ch, step, dt)  # the ego drives under 20 m/s
            if ch.startswith("RADAR"):
                assert abs(dt) <= RADAR_PERIOD_US / 2 * 1e-6
                radar_offsets.add(rec["timestamp"] - sample["timestamp"])
            elif ch != "LIDAR_TOP":
                moved.append(step)
    assert len(radar_offsets) > len(nusc.sample)  # drawn per radar and keyframe
    assert np.median(moved) > 0.05  # the cameras' poses are not the lidar's


def test_each_camera_is_rendered_from_where_the_car_is_when_it_fires(nusc, synthetic_root):
    """Re-render camera images with the ego pose, calibration and timestamp the devkit reads for them
    (actors placed at that time): the JPEGs match. The LIDAR_TOP keyframe's pose and time, 0-43 ms
    later, give a visibly different picture, so the check can tell them apart."""
    from bevtrain.synthetic.render import Camera, place_objects
    from bevtrain.synthetic.world import ActorState, Scene, scene_origin

    params = json.loads((Path(synthetic_root) / MARKER).read_text())["params"]
    # the scene whose ego moves most between its first front camera and lidar captures
    first = [nusc.get("sample", s["first_sample_token"]) for s in nusc.scene]

    def step(sample, channel):
        poses = [nusc.get("ego_pose", nusc.get("sample_data", sample["data"][ch])["ego_pose_token"])
                 for ch in (channel, "LIDAR_TOP")]
        return np.linalg.norm(np.subtract(poses[0]["translation"], poses[1]["translation"]))

    scene_rec, sample = max(zip(nusc.scene, first), key=lambda pair: step(pair[1], "CAM_FRONT_LEFT"))
    assert step(sample, "CAM_FRONT_LEFT") > 0.2
    world = Scene(scene_rec["name"], params["seed"], params["keyframes"])
    origin = scene_origin(scene_rec["name"], params["seed"], params["keyframes"])  # in its location's map
    sample = nusc.get("sample", sample["next"])  # a keyframe inside the scene

    def render_at(sd, pose_sd):
        """The image the renderer makes for camera `sd` from `pose_sd`'s ego pose and time."""
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", pose_sd["ego_pose_token"])
        cam = Camera(Quaternion(cs["rotation"]).rotation_matrix, np.array(cs["translation"]),
                     np.array(cs["camera_intrinsic"]), sd["width"], sd["height"])
        ego = ActorState(pose["translation"][0] - origin[0], pose["translation"][1] - origin[1],
                         Quaternion(pose["rotation"]).yaw_pitch_roll[0], 0.0, 0.0)
        t = (pose_sd["timestamp"] - first[nusc.scene.index(scene_rec)]["timestamp"]) * 1e-6
        return cam.render(world, ego, place_objects(world, t, ego))[0].astype(np.float32)

    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    for channel in ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_BACK_RIGHT"):
        sd = nusc.get("sample_data", sample["data"][channel])
        jpeg = cv2.imread(str(Path(synthetic_root) / sd["filename"]))[..., ::-1].astype(np.float32)
        own = np.abs(jpeg - render_at(sd, sd)).mean()
        at_lidar = np.abs(jpeg - render_at(sd, lidar)).mean()
        assert own < 2.0 and at_lidar > 3 * own, (channel, own, at_lidar)


def test_annotation_tables_are_consistent(nusc):
    cats = {nusc.get("category", i["category_token"])["name"] for i in nusc.instance}
    assert {
        "vehicle.car",
        "human.pedestrian.adult",
        "movable_object.trafficcone",
        "movable_object.barrier",
    } <= cats
    assert len([c for c in cats if c.startswith("vehicle.")]) >= 4
    for inst in nusc.instance:
        chain, tok = [], inst["first_annotation_token"]
        while tok:
            chain.append(tok)
            tok = nusc.get("sample_annotation", tok)["next"]
        assert len(chain) == inst["nbr_annotations"] and chain[-1] == inst["last_annotation_token"]
    attributes = {a["token"]: a["name"] for a in nusc.attribute}
    vis = [a["visibility_token"] for a in nusc.sample_annotation]
    assert set(vis) == {"1", "2", "3", "4"}
    for ann in nusc.sample_annotation:
        names = [attributes[t] for t in ann["attribute_tokens"]]
        prefix = ann["category_name"].split(".")[0]
        if ann["category_name"] in ("vehicle.bicycle", "vehicle.motorcycle"):
            assert len(names) == 1 and names[0].startswith("cycle.")
        elif prefix == "vehicle":
            assert len(names) == 1 and names[0].startswith("vehicle.")
        elif prefix == "human":
            assert len(names) == 1 and names[0].startswith("pedestrian.")
        else:
            assert names == []
        assert abs(ann["translation"][2] - ann["size"][2] / 2) < 1e-6  # boxes stand on the ground
    moving = [
        a
        for a in nusc.sample_annotation
        if attributes.get(next(iter(a["attribute_tokens"]), "")) == "vehicle.moving"
    ]
    assert moving and np.linalg.norm(nusc.box_velocity(moving[len(moving) // 2]["token"])[:2]) > 0.3


def test_camera_rigs_look_like_nuscenes(nusc):
    for cs in nusc.calibrated_sensor:
        channel = nusc.get("sensor", cs["sensor_token"])["channel"]
        if not channel.startswith("CAM"):
            continue
        k = np.array(cs["camera_intrinsic"])
        assert (700 < k[0, 0] < 900) if channel == "CAM_BACK" else (1200 < k[0, 0] < 1320)
        forward = Quaternion(cs["rotation"]).rotation_matrix[:, 2]  # camera z axis in the ego frame
        yaw = np.degrees(np.arctan2(forward[1], forward[0]))
        expected = {"CAM_FRONT": 0, "CAM_FRONT_LEFT": 55, "CAM_FRONT_RIGHT": -55, "CAM_BACK": 180,
                    "CAM_BACK_LEFT": 110, "CAM_BACK_RIGHT": -110}[channel]  # fmt: skip
        assert abs((yaw - expected + 180) % 360 - 180) < 3, channel
        assert abs(forward[2]) < 0.05


def test_devkit_projection_lands_on_the_object_colour(nusc, synthetic_root):
    """Project the centre of the box face that looks at the camera with the devkit and find the
    object's body colour (shaded for that face) in the JPEG there."""
    anns = [
        a
        for a in nusc.sample_annotation
        if a["visibility_token"] == "4" and a["category_name"] in PROBE_CATEGORIES
    ]
    assert len(anns) >= 20
    anns = [anns[i] for i in np.linspace(0, len(anns) - 1, 60).round().astype(int)]
    checked, matched = 0, 0
    for ann in anns:
        sample = nusc.get("sample", ann["sample_token"])
        instance = nusc.get("instance", ann["instance_token"])
        global_R_box = Quaternion(ann["rotation"]).rotation_matrix
        for channel in (
            "CAM_FRONT",
            "CAM_FRONT_LEFT",
            "CAM_FRONT_RIGHT",
            "CAM_BACK",
            "CAM_BACK_LEFT",
            "CAM_BACK_RIGHT",
        ):
            path, boxes, k = nusc.get_sample_data(
                sample["data"][channel], box_vis_level=BoxVisibility.ANY, selected_anntokens=[ann["token"]]
            )
            if not boxes:
                continue
            box = boxes[0]
            w, l, h = box.wlh
            best = None
            for axis, half in ((0, l / 2), (1, w / 2)):
                for sign in (1.0, -1.0):
                    normal = box.rotation_matrix[:, axis] * sign
                    centre = box.center + box.rotation_matrix @ np.array([0, 0, -h / 2 + PROBE_HEIGHT * h])
                    point = centre + normal * half
                    facing = float(normal @ point) / np.linalg.norm(point)
                    if best is None or facing < best[0]:
                        along = box.rotation_matrix[:, 1 - axis] * (w if axis == 0 else l)  # the face's width
                        best = (facing, point, along, global_R_box[:, axis] * sign)
            facing, point, along, normal_global = best
            if facing > -0.35 or point[2] < 1.0:
                continue  # grazing view
            img = cv2.imread(path)
            expected = np.asarray(body_color(ann["category_name"], instance["token"]), float) * shade(
                normal_global
            )
            # Probe the face centre and points 10 % in from its left and right edges.
            for offset in (-0.4, 0.0, 0.4):
                u, v = view_points((point + offset * along)[:, None], k, normalize=True)[:2, 0]
                if not (4 <= u < img.shape[1] - 4 and 4 <= v < img.shape[0] - 4):
                    continue
                r, c = int(round(v)), int(round(u))  # the pixel whose centre is nearest
                patch = img[r - 1 : r + 2, c - 1 : c + 2, ::-1].reshape(-1, 3)
                checked += 1
                matched += int(np.abs(np.median(patch, axis=0) - expected).max() <= 24)
    assert checked >= 60
    assert matched >= 0.9 * checked, f"{matched}/{checked} probes show the object's colour"


def test_lidar_returns_lie_on_ground_or_annotated_boxes(nusc, synthetic_root):
    on_objects = 0
    total = 0
    for sample in _spread_samples(nusc, 6):
        sd_token = sample["data"]["LIDAR_TOP"]
        pc = LidarPointCloud.from_file(nusc.get_sample_data_path(sd_token))
        pts = (_sensor_to_global(nusc, sd_token) @ np.vstack([pc.points[:3], np.ones(pc.nbr_points())]))[:3].T
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        ground = np.abs(pts[:, 2]) < 0.05
        boxed = _inside_any_box(pts, anns, margin=0.1)
        assert (ground | boxed).mean() > 0.999
        on_objects += int((boxed & ~ground).sum())
        total += len(pts)
        # num_lidar_pts was counted from this very cloud.
        for ann in anns:
            n = int(_inside_any_box(pts, [ann], margin=0.05).sum())
            assert abs(n - ann["num_lidar_pts"]) <= 2, (ann["token"], n, ann["num_lidar_pts"])
    assert on_objects > 0.02 * total


def _read_radar(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    header, _, body = data.partition(b"DATA binary\n")
    width = int(next(line for line in header.split(b"\n") if line.startswith(b"WIDTH")).split()[1])
    return np.frombuffer(body, RADAR_DTYPE, count=width)


def test_radar_round_trips_and_lies_on_moving_objects(nusc):
    clutter_seen = 0
    checked_velocity = 0
    for sample in _spread_samples(nusc, 6):
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        for channel in (
            "RADAR_FRONT",
            "RADAR_FRONT_LEFT",
            "RADAR_FRONT_RIGHT",
            "RADAR_BACK_LEFT",
            "RADAR_BACK_RIGHT",
        ):
            sd_token = sample["data"][channel]
            path = nusc.get_sample_data_path(sd_token)
            written = _read_radar(path)
            RadarPointCloud.disable_filters()
            raw = RadarPointCloud.from_file(path).points
            assert raw.shape == (18, len(written))
            for i, name in enumerate(RADAR_DTYPE.names):
                assert np.allclose(raw[i], written[name].astype(np.float64)), name
            RadarPointCloud.default_filters()
            kept = RadarPointCloud.from_file(path).points
            global_T_radar = _sensor_to_global(nusc, sd_token)
            pts = (global_T_radar @ np.vstack([kept[:3], np.ones(kept.shape[1])]))[:3].T
            # the scan has its own time: the boxes are where their motion took them by then
            dt_s = (nusc.get("sample_data", sd_token)["timestamp"] - sample["timestamp"]) * 1e-6
            shifts = _boxes_moved(nusc, anns, dt_s)
            assert _inside_any_box(pts, anns, 0.3, shifts).all(), channel
            raw_pts = (global_T_radar @ np.vstack([raw[:3], np.ones(raw.shape[1])]))[:3].T
            clutter_seen += int((~_inside_any_box(raw_pts, anns, 0.3, shifts)).sum())
            # Compensated Doppler = the annotated box velocity along the line of sight.
            on_box = [_inside_any_box(pts, [a], 0.3, shifts[i : i + 1]) for i, a in enumerate(anns)]
            for j in range(kept.shape[1]):
                owner = [a for a, on in zip(anns, on_box) if on[j]]
                if len(owner) != 1 or not (owner[0]["prev"] and owner[0]["next"]):
                    continue  # the devkit's velocity is one-sided (inexact on curves) at track ends
                v_box = nusc.box_velocity(owner[0]["token"])[:2]
                radar_R_global = global_T_radar[:3, :3].T
                v_radar = (radar_R_global @ np.array([v_box[0], v_box[1], 0.0]))[:2]
                ray = kept[:2, j] / np.linalg.norm(kept[:2, j])
                assert abs(float(kept[8:10, j] @ ray) - float(v_radar @ ray)) < 1.0
                checked_velocity += 1
    assert clutter_seen > 0, "the default filters should have something to drop"
    assert checked_velocity > 20


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = generate(tmp_path / "a", seed=3, **TINY)
    b = generate(tmp_path / "b", seed=3, **TINY)
    c = generate(tmp_path / "c", seed=4, **TINY)
    for name in ("sample_data", "sample_annotation", "ego_pose", "instance", "scene"):
        ta = (a / "v1.0-mini" / f"{name}.json").read_bytes()
        assert ta == (b / "v1.0-mini" / f"{name}.json").read_bytes(), name
    assert (a / "v1.0-mini/sample_annotation.json").read_bytes() != (
        c / "v1.0-mini/sample_annotation.json"
    ).read_bytes()
    jpgs = sorted((a / "samples" / "CAM_FRONT").glob("*.jpg"))
    assert jpgs and jpgs[0].read_bytes() == (b / jpgs[0].relative_to(a)).read_bytes()


def test_generation_logs_progress_per_keyframe(tmp_path, capfd):
    generate(tmp_path / "set", **{**TINY, "keyframes": 4, "progress": True})
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[synthetic nuScenes] |")]
    # stderr is not a terminal here: one line per keyframe that enters a new tenth, then the summary.
    shown = [line.split("| ")[1].split("%")[0] + "%" for line in lines]
    assert shown == ["1/4  25.0%", "2/4  50.0%", "3/4  75.0%", "4/4 100.0%"]
    assert all("keyframes/s" in line and "ETA" in line for line in lines)
    assert "synthetic nuScenes: " in err.splitlines()[-1] and "4 samples" in err.splitlines()[-1]


def test_ensure_synthetic_reuses_and_recovers(tmp_path, monkeypatch):
    root = tmp_path / "set"
    ensure_synthetic(root, **TINY)
    marker = root / MARKER
    stamp = marker.stat().st_mtime_ns
    ensure_synthetic(root, **TINY)
    assert marker.stat().st_mtime_ns == stamp  # complete and unchanged: not regenerated

    real_scan = synthetic_sensors.lidar_scan
    calls = []

    def crash_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return real_scan(*args, **kwargs)

    # A crash while regenerating with other parameters leaves the old complete set in place.
    monkeypatch.setattr(synthetic_sensors, "lidar_scan", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_synthetic(root, **{**TINY, "keyframes": 3})
    assert json.loads(marker.read_text())["params"]["keyframes"] == 2
    monkeypatch.setattr(synthetic_sensors, "lidar_scan", real_scan)
    ensure_synthetic(root, **{**TINY, "keyframes": 3})
    assert json.loads(marker.read_text())["params"]["keyframes"] == 3
    assert len(json.loads((root / "v1.0-mini" / "sample.json").read_text())) == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

    # generate() interrupted in place leaves no marker; ensure_synthetic then rebuilds a complete set.
    calls.clear()
    monkeypatch.setattr(synthetic_sensors, "lidar_scan", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(root, **TINY)
    assert not marker.exists()
    monkeypatch.setattr(synthetic_sensors, "lidar_scan", real_scan)
    ensure_synthetic(root, **TINY)
    assert marker.is_file()
    NuScenes("v1.0-mini", dataroot=str(root), verbose=False)

    # A directory holding something else (say, real nuScenes) is never wiped.
    other = tmp_path / "other"
    (other / "samples").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_synthetic(other, **TINY)
    with pytest.raises(FileExistsError):
        generate(other, **TINY)
    assert (other / "notes.txt").read_text() == "mine" and (other / "samples").is_dir()


def test_pixel_rays_and_scaled_rigs_keep_pixel_centres_at_integers():
    """The renderer and the calibration follow the convention the rest of bevtrain assumes:
    pixel j's ray projects to u = j, and a rig made for another image size has the intrinsics that
    geometry.scale_intrinsics gives for that resize."""
    import torch

    from bevtrain.geometry import scale_intrinsics
    from bevtrain.synthetic.catalog import scene_rigs

    full, half = scene_rigs(1600, 900), scene_rigs(800, 450)
    for ch, rig in full.items():
        if rig["K"] is None:
            continue
        k = torch.from_numpy(np.pad(rig["K"], ((0, 1), (0, 1))))
        np.testing.assert_allclose(half[ch]["K"], scale_intrinsics(k, 0.5, 0.5)[:3, :3].numpy(), atol=1e-9)
        cam = synthetic_render.Camera(rig["R"], rig["t"], rig["K"], 1600, 900)
        K = rig["K"]
        np.testing.assert_allclose(K[0, 0] * cam.a + K[0, 2], np.arange(1600), atol=1e-3)
        np.testing.assert_allclose(K[1, 1] * cam.b + K[1, 2], np.arange(900), atol=1e-3)
