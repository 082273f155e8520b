"""One synthetic scene to disk: its sensor files (JPEGs, lidar .pcd.bin, radar .pcd) and its rows of the
nuScenes tables, in the order the devkit expects, and its part of its location's map expansion.

Global coordinates: the scene's world sits at ``world.scene_origin`` in its location's map, so the scenes
of one location lie side by side; every pose, box and map node written is shifted by that origin."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List

import cv2
import numpy as np

from . import render, sensors, streetmap
from .catalog import (
    ANNOTATION_RADIUS,
    ATTRIBUTES,
    CATEGORIES,
    DEFAULT_RIG,
    KEYFRAME_PERIOD_US,
    LIDAR,
    LIDAR_RANGE,
    LIDAR_SWEEPS_PER_INTERVAL,
    MINI_SCENES,
    RADAR_PERIOD_US,
    RADAR_RANGE,
    RADAR_SWEEPS_PER_INTERVAL,
    RADARS,
    RENDER_RADIUS,
    SCENE_LOCATIONS,
    camera_capture_offset_us,
    quaternion_wxyz,
    scene_rigs,
    stable_hash,
    visibility_token,
    yaw_matrix,
)
from .world import Scene, attribute_names, scene_origin

JPEG_QUALITY = 90
# The tables each scene contributes rows to (the others are the same for every scene).
SCENE_TABLES = (
    "scene",
    "log",
    "calibrated_sensor",
    "ego_pose",
    "sample",
    "sample_data",
    "instance",
    "sample_annotation",
)

_CAMERA_CACHE: Dict[tuple, render.Camera] = {}


def _camera(channel: str, rig: dict) -> render.Camera:
    """Cameras are the same in every scene: build their ray tables once per process."""
    width, height = rig["size"]
    key = (channel, width, height, rig["K"].tobytes(), rig["R"].tobytes(), rig["t"].tobytes())
    if key not in _CAMERA_CACHE:
        _CAMERA_CACHE[key] = render.Camera(rig["R"], rig["t"], rig["K"], width, height)
    return _CAMERA_CACHE[key]


def _ego_record(token, timestamp, ego, origin) -> dict:
    return dict(
        token=token,
        timestamp=timestamp,
        rotation=quaternion_wxyz(yaw_matrix(ego.yaw)),
        translation=[ego.x + origin[0], ego.y + origin[1], 0.0],
    )


def render_scene(job: dict, on_keyframe: Callable[[], None] | None = None) -> dict:
    """Write one scene (job: out, scene, seed, keyframes, width, height); return its table rows
    and the histogram of its visibility tokens. `on_keyframe` is called after each keyframe."""
    return SceneWriter(job).write(on_keyframe)


class SceneWriter:
    """Writes one scene's files under `out` and collects its table rows."""

    def __init__(self, job: dict):
        self.out = Path(job["out"])
        self.name, self.seed, self.keyframes = job["scene"], job["seed"], job["keyframes"]
        self.width, self.height = job["width"], job["height"]
        self.scene = Scene(self.name, self.seed, self.keyframes)
        self.origin = scene_origin(self.name, self.seed, self.keyframes)
        self.rigs = scene_rigs(self.width, self.height, job.get("rig", DEFAULT_RIG))
        self.cameras = {ch: _camera(ch, r) for ch, r in self.rigs.items() if r["modality"] == "camera"}
        scene_idx = MINI_SCENES.index(self.name)
        trng = np.random.default_rng(int(self._token("time")[:12], 16))
        self.t0_us = 1531883530_000000 + scene_idx * 86_400_000_000 + int(trng.integers(0, 3_600_000_000))
        self.day = 10 + scene_idx
        boston = SCENE_LOCATIONS[self.name].startswith("boston")
        vehicle, tz = ("n008", "-0400") if boston else ("n015", "+0800")
        self.logfile = f"{vehicle}-2018-07-{self.day:02d}-11-{scene_idx * 5:02d}-36{tz}"
        self.calib = {ch: self._token("calibrated_sensor", ch) for ch in self.rigs}
        self.sample_tokens = [self._token("sample", k) for k in range(self.keyframes)]
        self.tables: Dict[str, list] = {k: [] for k in SCENE_TABLES}
        self.per_channel: Dict[str, list] = {ch: [] for ch in self.rigs}  # sample_data rows
        self.tracks: Dict[int, list] = {}  # actor id -> its annotations in time order
        self.vis_hist = np.zeros(4, np.int64)
        self.rng_sensor = np.random.default_rng(int(self._token("sensors")[:12], 16))
        # Capture times relative to each keyframe (us): the cameras' are fixed by the rig, the radars'
        # drawn per keyframe (catalog: LIDAR_PERIOD_US, RADAR_PERIOD_US).
        self.camera_offsets_us = {ch: camera_capture_offset_us(self.rigs[ch]["R"]) for ch in self.cameras}
        self.rng_time = np.random.default_rng(int(self._token("radar_time")[:12], 16))

    def _token(self, kind: str, *parts) -> str:
        return stable_hash(kind, self.seed, self.name, *parts)

    def write(self, on_keyframe: Callable[[], None] | None = None) -> dict:
        self._write_log_map_and_calibration()
        for k in range(self.keyframes):
            half = RADAR_PERIOD_US // 2
            radar_offsets_us = {ch: int(self.rng_time.integers(-half, half + 1)) for ch in RADARS}
            self._write_sweeps(k, radar_offsets_us)
            self._write_keyframe(k, radar_offsets_us)
            if on_keyframe is not None:
                on_keyframe()
        self._link_chains()
        visibility = self.vis_hist.tolist()
        return dict(scene=self.name, tables=self.tables, visibility=visibility, **self._map_part())

    def _map_part(self) -> dict:
        """The scene's part of its location's map: expansion rows, the corner of its ground farthest from
        the location's origin, and its drivable area and sidewalks for the semantic prior (global metres)."""
        sm = self.scene.streetmap
        records = streetmap.expansion_records(sm, lambda kind, n: self._token("map_expansion", kind, n),
                                              self.origin)
        prior = [(np.asarray(p.exterior.coords) + self.origin, [np.asarray(h.coords) + self.origin
                                                              for h in p.interiors])
                 for p in sm.drivable + sm.walkways]
        corner = (self.origin + np.asarray(self.scene.extent)).tolist()
        return dict(location=SCENE_LOCATIONS[self.name], log_token=self._token("log"), map_records=records,
                    map_corner=corner, prior=prior)

    def _write_log_map_and_calibration(self) -> None:
        out, tables = self.out, self.tables
        log_token = self._token("log")
        tables["log"].append(
            dict(
                token=log_token,
                logfile=self.logfile,
                vehicle=self.logfile[:4],
                date_captured=f"2018-07-{self.day:02d}",
                location=SCENE_LOCATIONS[self.name],
            )
        )
        for ch, rig in self.rigs.items():
            tables["calibrated_sensor"].append(
                dict(
                    token=self.calib[ch],
                    sensor_token=stable_hash("sensor", ch),
                    translation=[float(v) for v in rig["t"]],
                    rotation=quaternion_wxyz(rig["R"]),
                    camera_intrinsic=[]
                    if rig["K"] is None
                    else [[float(v) for v in row] for row in rig["K"]],
                )
            )
        for ch in self.rigs:
            (out / "samples" / ch).mkdir(parents=True, exist_ok=True)
            (out / "sweeps" / ch).mkdir(parents=True, exist_ok=True)

    def _add_sample_data(self, ch, ts_us, k, is_key, ego, filename, fileformat, w=0, h=0) -> None:
        ep_token = self._token("ego_pose", ch, ts_us)
        self.tables["ego_pose"].append(_ego_record(ep_token, ts_us, ego, self.origin))
        self.per_channel[ch].append(
            dict(
                token=self._token("sample_data", ch, ts_us),
                sample_token=self.sample_tokens[k],
                ego_pose_token=ep_token,
                calibrated_sensor_token=self.calib[ch],
                timestamp=ts_us,
                fileformat=fileformat,
                is_key_frame=is_key,
                height=h,
                width=w,
                filename=filename,
                prev="",
                next="",
            )
        )

    def _write_lidar(self, ego, objects, ts_us, k, is_key) -> np.ndarray:
        pts = sensors.lidar_scan(self.scene, ego, objects, self.rigs[LIDAR], self.rng_sensor)
        fn = f"{'samples' if is_key else 'sweeps'}/{LIDAR}/{self.logfile}__{LIDAR}__{ts_us}.pcd.bin"
        pts.tofile(self.out / fn)
        self._add_sample_data(LIDAR, ts_us, k, is_key, ego, fn, "pcd")
        return pts

    def _write_radar(self, ch, ego, objects, ts_us, k, is_key) -> np.ndarray:
        pts = sensors.radar_scan(ego, objects, self.rigs[ch], self.rng_sensor)
        fn = f"{'samples' if is_key else 'sweeps'}/{ch}/{self.logfile}__{ch}__{ts_us}.pcd"
        sensors.write_radar_pcd(self.out / fn, pts)
        self._add_sample_data(ch, ts_us, k, is_key, ego, fn, "pcd")
        return pts

    def _at(self, ts_us: int, radius: float = RENDER_RADIUS):
        """The ego state and the objects placed around it at capture time ``ts_us``."""
        t = (ts_us - self.t0_us) * 1e-6
        ego = self.scene.ego_state(t)
        return ego, render.place_objects(self.scene, t, ego, radius=radius)

    def _write_sweeps(self, k: int, radar_offsets_us: Dict[str, int]) -> None:
        """Sweeps between the previous keyframe and this one belong to this (the next) sample; each radar
        keeps this keyframe's offset, so its scans stay one sweep interval apart."""
        t_k = k * KEYFRAME_PERIOD_US * 1e-6
        ts_k = self.t0_us + k * KEYFRAME_PERIOD_US
        sweeps = [
            (j / (LIDAR_SWEEPS_PER_INTERVAL + 1), "lidar") for j in range(LIDAR_SWEEPS_PER_INTERVAL, 0, -1)
        ]
        sweeps += [
            (j / (RADAR_SWEEPS_PER_INTERVAL + 1), "radar") for j in range(RADAR_SWEEPS_PER_INTERVAL, 0, -1)
        ]
        for frac, kind in sorted(sweeps, key=lambda x: -x[0]):
            dt_us = int(round(frac * KEYFRAME_PERIOD_US))
            ts = ts_k - dt_us
            t = t_k - dt_us * 1e-6
            ego = self.scene.ego_state(t)
            objects = render.place_objects(self.scene, t, ego, radius=LIDAR_RANGE + 30.0)
            if kind == "lidar":
                self._write_lidar(ego, objects, ts, k, False)
            else:
                for ch in RADARS:
                    ts_radar = ts + radar_offsets_us[ch]
                    ego_radar, objects_radar = self._at(ts_radar, RADAR_RANGE + 30.0)
                    self._write_radar(ch, ego_radar, objects_radar, ts_radar, k, False)

    def _write_keyframe(self, k: int, radar_offsets_us: Dict[str, int]) -> None:
        """The sample at the LIDAR_TOP scan's time; cameras and radars each at their own capture time,
        ego pose and object positions (annotations are at the sample's time, as in nuScenes)."""
        ts_k = self.t0_us + k * KEYFRAME_PERIOD_US
        ego, objects = self._at(ts_k)
        unoccluded, visible = self._write_cameras(ts_k, k)
        lidar_pts = self._write_lidar(ego, objects, ts_k, k, True)
        lidar_ego = lidar_pts[:, :3].astype(np.float64) @ self.rigs[LIDAR]["R"].T + self.rigs[LIDAR]["t"]
        n_lidar = sensors.points_in_box_counts(lidar_ego, objects, 0.05)
        n_radar = np.zeros(len(self.scene.actors), np.int64)  # by actor id
        for ch in RADARS:
            ts_radar = ts_k + radar_offsets_us[ch]
            ego_radar, objects_radar = self._at(ts_radar, RADAR_RANGE + 30.0)
            rp = self._write_radar(ch, ego_radar, objects_radar, ts_radar, k, True)
            xyz = np.stack([rp["x"], rp["y"], rp["z"]], 1).astype(np.float64)
            radar_ego = xyz @ self.rigs[ch]["R"].T + self.rigs[ch]["t"]
            # each scan against the boxes where they were when it was taken
            counts = sensors.points_in_box_counts(radar_ego, objects_radar, 0.3)
            np.add.at(n_radar, np.array([ob.actor.aid for ob in objects_radar], np.int64), counts)
        self.tables["sample"].append(
            dict(
                token=self.sample_tokens[k],
                timestamp=ts_k,
                prev=self.sample_tokens[k - 1] if k > 0 else "",
                next=self.sample_tokens[k + 1] if k + 1 < self.keyframes else "",
                scene_token=self._token("scene"),
            )
        )
        for i, ob in enumerate(objects):
            if math.hypot(ob.state.x - ego.x, ob.state.y - ego.y) > ANNOTATION_RADIUS:
                continue
            aid = ob.actor.aid
            vtok = visibility_token(visible[aid] / unoccluded[aid]) if unoccluded[aid] > 0 else "1"
            self.vis_hist[int(vtok) - 1] += 1
            ann = self._annotation(ob, k, vtok, int(n_lidar[i]), int(n_radar[aid]))
            self.tracks.setdefault(ob.actor.aid, []).append(ann)

    def _write_cameras(self, ts_k, k):
        """Render and write the rig's images (six for nuScenes' rig), each from where the car and the objects
        are when that camera fires; per actor id its unoccluded and visible pixel counts over them."""
        unoccluded = np.zeros(len(self.scene.actors), np.int64)
        visible = np.zeros(len(self.scene.actors), np.int64)
        for ch in self.cameras:
            ts = ts_k + self.camera_offsets_us[ch]
            ego, objects = self._at(ts)
            img, u, v = self.cameras[ch].render(self.scene, ego, objects)
            aids = np.array([ob.actor.aid for ob in objects], np.int64)
            np.add.at(unoccluded, aids, u)
            np.add.at(visible, aids, v)
            fn = f"samples/{ch}/{self.logfile}__{ch}__{ts}.jpg"
            ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {fn}")
            (self.out / fn).write_bytes(buf.tobytes())
            self._add_sample_data(ch, ts, k, True, ego, fn, "jpg", *self.rigs[ch]["size"])
        return unoccluded, visible

    def _annotation(self, ob, k: int, visibility: str, n_lidar: int, n_radar: int) -> dict:
        st = ob.state
        w, l, h = ob.actor.wlh
        return dict(
            token=self._token("sample_annotation", ob.actor.aid, k),
            sample_token=self.sample_tokens[k],
            instance_token=ob.actor.instance_token,
            visibility_token=visibility,
            attribute_tokens=[ATTRIBUTES[a][0] for a in attribute_names(ob.actor, st)],
            translation=[st.x + self.origin[0], st.y + self.origin[1], h / 2],
            size=[w, l, h],
            rotation=quaternion_wxyz(yaw_matrix(st.yaw)),
            prev="",
            next="",
            num_lidar_pts=n_lidar,
            num_radar_pts=n_radar,
        )

    def _link_chains(self) -> None:
        """prev/next of sample_data per channel and of annotations per track; instance and scene rows."""
        tables = self.tables
        for records in self.per_channel.values():
            records.sort(key=lambda r: r["timestamp"])
            _link(records)
            tables["sample_data"].extend(records)
        for aid in sorted(self.tracks):
            anns = self.tracks[aid]
            _link(anns)
            actor = self.scene.actors[aid]
            tables["instance"].append(
                dict(
                    token=actor.instance_token,
                    category_token=CATEGORIES[actor.category],
                    nbr_annotations=len(anns),
                    first_annotation_token=anns[0]["token"],
                    last_annotation_token=anns[-1]["token"],
                )
            )
            tables["sample_annotation"].extend(anns)
        tables["scene"].append(
            dict(
                token=self._token("scene"),
                log_token=self._token("log"),
                nbr_samples=self.keyframes,
                first_sample_token=self.sample_tokens[0],
                last_sample_token=self.sample_tokens[-1],
                name=self.name,
                description=self.scene.describe(),
            )
        )


def _link(records: List[dict]) -> None:
    """Chain records in list order through their prev / next tokens."""
    for a, b in zip(records[:-1], records[1:]):
        a["next"], b["prev"] = b["token"], a["token"]
