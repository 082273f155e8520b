"""A camera rig file (YAML): what ``python -m bevtrain.predict`` and ``bevtrain.export`` need to know
about a user's cameras, in nuScenes' conventions (README "Your own cameras").

    reference_camera: CAM_FRONT        # the BEV grid is laid out in this camera's frame
    cameras:
      - name: CAM_FRONT
        image_size: [1600, 900]        # width, height of the frames in pixels
        intrinsics: {fx: 1266.4, fy: 1266.4, cx: 816.3, cy: 491.5}   # or a 3x3 list of rows
        translation: [1.70, 0.016, 1.51]      # camera -> ego, metres (ego: x forward, y left, z up)
        rotation: [0.5, -0.5, 0.5, -0.5]      # camera -> ego quaternion w, x, y, z

Cameras are x right, y down, z forward, pixel centres at integers: nuScenes' ``calibrated_sensor``
rows, so ``rig_from_records`` copies them from a dataroot's index. Standard library, numpy, yaml
and pyquaternion only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import yaml
from pyquaternion import Quaternion

RIG_FORMAT = 1
CAMERA_KEYS = ("name", "image_size", "intrinsics", "translation", "rotation")
QUAT_NORM_TOL = 1e-3  # a quaternion this far from unit length is a typo, not rounding


class RigFileError(ValueError):
    """A rig file that cannot be used; the message names the file, the camera and what to fix."""


@dataclass(frozen=True)
class RigCamera:
    name: str
    width: int
    height: int
    K: np.ndarray  # (3,3) float64 pix_T_cam at image_size
    ego_T_cam: np.ndarray  # (4,4) float64

    @property
    def pix_T_cam(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.K
        return m  # (4,4)


@dataclass(frozen=True)
class Rig:
    cameras: tuple  # RigCamera, in the file's order
    reference: str

    @property
    def names(self) -> List[str]:
        return [c.name for c in self.cameras]

    def names_in_model_order(self) -> List[str]:
        return [c.name for c in self.model_order()]

    def model_order(self) -> List[RigCamera]:
        """The cameras as the network takes them: the reference camera first, then the others in the
        file's order (evaluation's order when the file lists nuScenes' cameras in the index's order)."""
        ref = [c for c in self.cameras if c.name == self.reference]
        return ref + [c for c in self.cameras if c.name != self.reference]

    def cams_T_ref(self) -> np.ndarray:
        """(S,4,4) float64 in ``model_order``: every camera placed on one ego pose by its extrinsics (a
        rig has no per-camera ego poses; the same static rig as compat='simplebev' evaluation)."""
        import torch

        from bevtrain.geometry import rigid_inverse

        cams = self.model_order()
        ego_T_ref = cams[0].ego_T_cam
        # one matrix at a time, as the dataset does: a batched inverse rounds differently (1e-14)
        return np.stack([rigid_inverse(torch.from_numpy(c.ego_T_cam)).numpy() @ ego_T_ref for c in cams])

    def to_dict(self) -> Dict[str, Any]:
        cams = []
        for c in self.cameras:
            q = Quaternion(matrix=c.ego_T_cam[:3, :3], atol=1e-6)
            cams.append({
                "name": c.name,
                "image_size": [int(c.width), int(c.height)],
                "intrinsics": {"fx": float(c.K[0, 0]), "fy": float(c.K[1, 1]),
                               "cx": float(c.K[0, 2]), "cy": float(c.K[1, 2])},
                "translation": [float(v) for v in c.ego_T_cam[:3, 3]],
                "rotation": [float(v) for v in q.elements],
            })
        return {"format": RIG_FORMAT, "reference_camera": self.reference, "cameras": cams}


def _pose(translation, rotation_wxyz) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Quaternion(np.asarray(rotation_wxyz, np.float64)).rotation_matrix
    m[:3, 3] = np.asarray(translation, np.float64)
    return m  # (4,4) ego_T_cam


def _numbers(value, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RigFileError(f"{where}: {what} must be {n} numbers, got {value!r}") from None
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise RigFileError(f"{where}: {what} must be {n} finite numbers, got {value!r}")
    return arr


def _intrinsics(value, where: str) -> np.ndarray:
    if isinstance(value, Mapping):
        missing = [k for k in ("fx", "fy", "cx", "cy") if k not in value]
        if missing:
            raise RigFileError(f"{where}: intrinsics lack {missing}; give fx, fy, cx, cy (pixels) or a "
                               f"3x3 matrix")
        fx, fy, cx, cy = _numbers([value[k] for k in ("fx", "fy", "cx", "cy")], 4, "intrinsics", where)
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    else:
        K = _numbers(value, 9, "intrinsics (3x3 rows)", where).reshape(3, 3)
        if not np.allclose(K[2], [0, 0, 1]):
            raise RigFileError(f"{where}: the last row of a 3x3 intrinsics matrix is [0, 0, 1], "
                               f"got {K[2].tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise RigFileError(f"{where}: focal lengths must be positive pixels, got fx={K[0, 0]}, fy={K[1, 1]}")
    return K


def _camera(entry: Any, k: int, source: str) -> RigCamera:
    where = f"{source}: camera {k}"
    if not isinstance(entry, Mapping):
        raise RigFileError(f"{where}: expected a mapping with {', '.join(CAMERA_KEYS)}")
    missing = [key for key in CAMERA_KEYS if key not in entry]
    if missing:
        raise RigFileError(f"{where} ({entry.get('name', '?')}): missing {missing}")
    name = str(entry["name"])
    where = f"{source}: camera {name}"
    w, h = _numbers(entry["image_size"], 2, "image_size [width, height]", where)
    if w < 1 or h < 1 or w != int(w) or h != int(h):
        raise RigFileError(f"{where}: image_size must be two positive whole numbers [width, height], "
                           f"got {entry['image_size']!r}")
    t = _numbers(entry["translation"], 3, "translation [x, y, z] (metres, camera -> ego)", where)
    q = _numbers(entry["rotation"], 4, "rotation [w, x, y, z] (camera -> ego)", where)
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > QUAT_NORM_TOL:
        raise RigFileError(f"{where}: rotation {q.tolist()} has length {norm:.4f}, not 1: a quaternion "
                           f"w, x, y, z of the camera -> ego rotation is expected")
    return RigCamera(name, int(w), int(h), _intrinsics(entry["intrinsics"], where), _pose(t, q / norm))


def rig_from_dict(data: Any, source: str = "rig") -> Rig:
    if not isinstance(data, Mapping) or not isinstance(data.get("cameras"), list) or not data["cameras"]:
        raise RigFileError(f"{source}: expected 'cameras:' with a list of cameras (see README "
                           f"'Your own cameras')")
    cams = tuple(_camera(e, k, source) for k, e in enumerate(data["cameras"]))
    names = [c.name for c in cams]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RigFileError(f"{source}: camera names must be unique, {twice} appear twice")
    ref = str(data.get("reference_camera", names[0]))
    if ref not in names:
        raise RigFileError(f"{source}: reference_camera {ref!r} is none of the cameras {names}")
    return Rig(cams, ref)


def read_rig(path) -> Rig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RigFileError(f"cannot read rig file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RigFileError(f"rig file {path} is not valid YAML: {e}") from None
    return rig_from_dict(data, str(path))


def write_rig(rig: Rig, path, comment: str = "") -> None:
    from bevtrain.disk import atomic_write_bytes

    head = "".join(f"# {line}\n" for line in comment.splitlines())
    text = head + yaml.safe_dump(rig.to_dict(), sort_keys=False, default_flow_style=None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode(), what=f"rig file {Path(path).name}")


def rig_from_records(cams: Mapping[str, Mapping[str, Any]], names: Sequence[str], reference: str) -> Rig:
    """A rig from one index record's ``cams`` (name -> width, height, pix_T_cam, ego_T_cam)."""
    out = []
    for name in names:
        c = cams[name]
        out.append(RigCamera(name, int(c["width"]), int(c["height"]),
                             np.asarray(c["pix_T_cam"], np.float64)[:3, :3].copy(),
                             np.asarray(c["ego_T_cam"], np.float64).copy()))
    return Rig(tuple(out), reference)
