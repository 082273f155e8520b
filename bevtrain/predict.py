"""Predict BEV maps from your own cameras' frames (README "Your own cameras").

    python -m bevtrain.predict --rig_from=<nuScenes dataroot> --rig=rig.yaml      # write a rig file
    python -m bevtrain.predict --init_dir=checkpoints/<run> --rig=rig.yaml --frames=<folder> --out_dir=<out>

``--frames`` holds one subfolder per rig camera (named as in the rig file) with JPEG frames, matched
across cameras by file name (or, when the names differ, by the number they end with, a timestamp:
each reference-camera frame takes every other camera's nearest one within ``--max_dt``); or it holds
one such folder per sequence. Per frame: ``<out_dir>/<sequence>/<frame>.npy`` (float32 (C, Z, X)
probabilities of the checkpoint's classes, rows forward, in the reference camera's frame) and, with
``--pictures``, ``<frame>.png`` (cameras + BEV); per sequence ``<out_dir>/<sequence>.gif``;
``<out_dir>/predict.json`` records checkpoint, classes, grid and rig.

Images get evaluation's resize (bevtrain.data.augment, no random augmentation) with intrinsics scaled
exactly. A rig has no per-camera ego poses, so the cameras sit on one ego pose (the static rig of
compat='simplebev'); on nuScenes data evaluation also moves each camera by the ego motion between
the cameras' capture times (up to ~45 ms).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from bevtrain.data import augment
from bevtrain.rig import Rig, RigFileError, read_rig, rig_from_records, write_rig

JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


class PredictError(ValueError):
    """A flag, folder, rig or checkpoint that does not fit; the message says what to do (exit 2)."""


# -- the rig from a dataroot -------------------------------------------------------------------------
def rig_from_dataroot(dataroot: str, dset: str = "", split: str = "val", reference: str = "CAM_FRONT",
                      cache_dir: str | None = None) -> Tuple[Rig, str]:
    """The rig of a nuScenes-format dataroot (its first sample of ``split``); and a note of where from."""
    from bevtrain.data.index import CAMERA_NAMES, load_index

    root = Path(dataroot)
    if not dset:
        found = sorted(p.name[5:] for p in root.glob("v1.0-*") if p.is_dir())
        if not found:
            raise PredictError(f"--rig_from={dataroot} has no v1.0-*/ tables: give a nuScenes-format "
                               f"dataroot")
        dset = found[0]
    records, info = load_index(root, dset, split, nsweeps=1, cache_dir=cache_dir, verbose=False)
    if len(records) == 0:
        raise PredictError(f"--rig_from={dataroot}: split {split!r} of v1.0-{dset} has no samples")
    rec = records[0]
    names = [n for n in CAMERA_NAMES if n in rec["cams"]]
    if reference not in names:
        raise PredictError(f"--reference_camera={reference} is not a camera of {dataroot}: {names}")
    rig = rig_from_records(rec["cams"], names, reference)
    def same_calibration(r) -> bool:
        return all(np.array_equal(r["cams"][n][k], rec["cams"][n][k])
                   for n in names for k in ("ego_T_cam", "pix_T_cam"))

    same = sum(1 for r in records if same_calibration(r))
    note = (f"from {info['dataroot']} v1.0-{dset} split {split}, sample {rec['token']} (scene "
            f"{rec['scene_name']}); {same} of {len(records)} samples of the split share this calibration")
    return rig, note


# -- frames ------------------------------------------------------------------------------------------
@dataclass
class Frame:
    sequence: str
    name: str  # the reference camera's file stem
    paths: List[str]  # one JPEG per camera, in the rig's model order


def _jpegs(folder: Path) -> Dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in JPEG_SUFFIXES and p.is_file()}


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _match(seq: str, per_cam: List[Dict[str, Path]], names: List[str], max_dt: float) -> List[Frame]:
    """Frames of one sequence: by file stem; else by the number the stems end with (a timestamp)."""
    ref = per_cam[0]
    if all(set(c) == set(ref) for c in per_cam):
        return [Frame(seq, stem, [str(c[stem]) for c in per_cam]) for stem in sorted(ref)]
    stamps = []
    for name, files in zip(names, per_cam):
        nums = {stem: _TRAILING_NUMBER.search(stem) for stem in files}
        if not all(nums.values()):
            first = set(ref) ^ set(files)
            raise PredictError(
                f"--frames: sequence {seq!r}: the file names of {names[0]} and {name} differ (e.g. "
                f"{sorted(first)[:3]}) and do not all end in a timestamp: name a frame's images alike in "
                f"every camera folder, or end each name with its capture time")
        stamps.append(sorted((int(m.group(1)), files[s]) for s, m in nums.items()))
    t_ref = np.array([t for t, _ in stamps[0]], np.float64)
    if max_dt <= 0:
        max_dt = 0.5 * float(np.median(np.diff(t_ref))) if len(t_ref) > 1 else math.inf
    frames = []
    for t, path in stamps[0]:
        paths = [str(path)]
        for name, cam in zip(names[1:], stamps[1:]):
            ts = np.array([c for c, _ in cam], np.float64)
            j = int(np.argmin(np.abs(ts - t)))
            if abs(ts[j] - t) > max_dt:
                raise PredictError(
                    f"--frames: sequence {seq!r}: {names[0]} frame {path.name} has no {name} frame within "
                    f"--max_dt={max_dt:g} (nearest {cam[j][1].name}, {ts[j] - t:+g}); widen --max_dt or "
                    f"add it")
            paths.append(str(cam[j][1]))
        frames.append(Frame(seq, path.stem, paths))
    return frames


def find_frames(folder: str, rig: Rig, max_dt: float = 0.0) -> List[Frame]:
    """The frames of ``folder``: camera subfolders, or sequence subfolders holding camera subfolders."""
    root = Path(folder)
    if not root.is_dir():
        raise PredictError(f"--frames={folder} is not a folder: give a folder with one subfolder per camera")
    names = [c.name for c in rig.model_order()]
    if any((root / n).is_dir() for n in names):
        sequences = [root]
    else:
        sequences = sorted(p for p in root.iterdir() if p.is_dir() and any((p / n).is_dir() for n in names))
        if not sequences:
            subs = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
            raise PredictError(f"--frames={folder} has no folder named after a rig camera {names} (it "
                               f"holds {subs or 'no folders'}): put each camera's frames in "
                               f"<frames>/<camera name>/")
    frames: List[Frame] = []
    for seq in sequences:
        missing = [n for n in names if not (seq / n).is_dir()]
        if missing:
            raise PredictError(f"--frames: {seq} has no folder for the rig camera(s) {missing}: every "
                               f"camera of the rig needs <{seq}>/<camera name>/ with its frames (or drop it "
                               f"from the rig and use a checkpoint trained with that many cameras)")
        per_cam = [_jpegs(seq / n) for n in names]
        empty = [n for n, files in zip(names, per_cam) if not files]
        if empty:
            raise PredictError(f"--frames: {seq}: no JPEG frames in the folder(s) of {empty}")
        frames += _match(seq.name, per_cam, names, max_dt)
    return frames


def check_sizes(frames: Sequence[Frame], rig: Rig, rig_path: str) -> None:
    """Every image has its camera's size in the rig (the intrinsics are for that size): ImageReadError."""
    cams = rig.model_order()
    for frame in frames:
        for path, cam in zip(frame.paths, cams):
            wh = augment.jpeg_size(augment.read_jpeg_bytes(path))
            if wh != (cam.width, cam.height):
                raise augment.ImageReadError(
                    f"image {path} is {wh[0]}x{wh[1]} but the rig {rig_path} says {cam.name} takes "
                    f"{cam.width}x{cam.height}: its intrinsics hold for that size only. Give the frames at "
                    f"that size, or a rig whose image_size and intrinsics are those of these frames", "size")


def load_frame_images(paths: Sequence[str], rig: Rig, final_dim: Tuple[int, int], compat: str = "none"
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Evaluation's input of one frame: RGB uint8 (S, 3, H, W) and pix_T_cams (S, 4, 4) float64."""
    images = np.empty((len(paths), 3) + tuple(final_dim), np.uint8)  # (S,3,H,W)
    aug = augment.sample_image_aug(None, final_dim, is_train=False, rand_crop_and_resize=False)
    pix = []
    for s, (path, cam) in enumerate(zip(paths, rig.model_order())):
        src_wh = (cam.width, cam.height)
        if compat == "simplebev":
            _, k = augment.load_simplebev_val_image(path, cam.pix_T_cam, src_wh, aug.final_hw, out=images[s])
        else:
            _, k = augment.load_augmented_image(path, cam.pix_T_cam, src_wh, aug, True, out=images[s])
        pix.append(k)
    return images, np.stack(pix)  # (S,3,H,W), (S,4,4)


class FrameSet(torch.utils.data.Dataset):
    def __init__(self, frames: Sequence[Frame], rig: Rig, final_dim, compat: str):
        self.frames, self.rig, self.final_dim, self.compat = list(frames), rig, final_dim, compat
        self.cams_T_ref = torch.from_numpy(rig.cams_T_ref().astype(np.float32))  # (S,4,4)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        images, pix = load_frame_images(self.frames[i].paths, self.rig, self.final_dim, self.compat)
        return {"images": torch.from_numpy(images), "pix_T_cams": torch.from_numpy(pix.astype(np.float32)),
                "cams_T_ref": self.cams_T_ref, "index": torch.tensor(i)}


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: torch.nn.Module
    cfg: Any
    file: Path
    step: int


def load_model(init_dir: str, load_step: Any, device: torch.device) -> Loaded:
    """The checkpoint's network in eval mode, built with the config it was trained with."""
    from bevtrain.build import build_model
    from bevtrain.checkpoint import load_weights
    from bevtrain.convert_simplebev import convert_weights
    from bevtrain.evaluate import eval_config, open_run

    run = open_run(init_dir, load_step)
    cfg, _ = eval_config(run.trained, {})
    model = build_model(cfg.replace(encoder_weights="none"))
    load_weights(model, convert_weights(model, run.weights, run.file), ignore_load=None, source=run.file)
    return Loaded(model.to(device).eval(), cfg, run.file, run.step)


def check_rig_fits(rig: Rig, cfg, ckpt: Path, rig_path: str) -> None:
    if len(rig.cameras) != cfg.ncams:
        raise PredictError(
            f"the rig {rig_path} has {len(rig.cameras)} cameras {rig.names} but the checkpoint {ckpt} was "
            f"trained with ncams={cfg.ncams}: its network takes exactly that many. List {cfg.ncams} cameras "
            f"in the rig, or use a checkpoint trained with --ncams={len(rig.cameras)}")
    if cfg.use_radar or cfg.use_lidar:
        raise PredictError(f"the checkpoint {ckpt} takes radar or lidar as well: predict feeds cameras only")


def grid_record(cfg) -> Dict[str, Any]:
    from bevtrain.build import build_vox_util

    vox = build_vox_util(cfg)
    return {
        "frame": "reference camera (x right, z forward); .npy rows run along z (row 0 = zmin), "
                 "columns along x",
        "Z": int(cfg.Z), "X": int(cfg.X), "Y": int(cfg.Y),
        "xmin": float(vox.xmin), "xmax": float(vox.xmax), "zmin": float(vox.zmin), "zmax": float(vox.zmax),
        "bounds": [float(b) for b in cfg.bounds], "scene_centroid": [float(v) for v in cfg.scene_centroid],
    }


# -- pictures ----------------------------------------------------------------------------------------
def render_prediction(batch: Dict[str, Any], prob: np.ndarray, i: int, vox_util, classes, title: str,
                      cell_width: int = 400) -> np.ndarray:
    """Cameras over the predicted BEV (eval's composite without ground truth): (H, W, 3) uint8 RGB."""
    import cv2

    from bevtrain import viz

    cams = viz.render_cameras(batch, i, cell_width)
    width = cams.shape[1]
    canvas = viz.BevCanvas(vox_util, cell_width)
    if len(classes) == 1:
        heat = cv2.applyColorMap(np.clip(prob[0] * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        panel = canvas.to_panel(cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), nearest=False)
        label = f"prediction p({classes[0].name})"
    else:
        none = np.zeros(prob.shape, bool)
        panel = viz._class_panels(canvas, classes, none, ~none, prob)[1]
        label = "prediction (colour strength = p): " + ", ".join(c.name for c in classes)
    ref_T_ego = np.linalg.inv(batch["ego_T_ref"][i].numpy())
    canvas.draw_rings(panel, ref_T_ego)
    canvas.draw_ego(panel, ref_T_ego)
    canvas.draw_scale(panel)
    row = np.full((panel.shape[0], width, 3), viz.BACKGROUND, np.uint8)
    x0 = (width - panel.shape[1]) // 2
    row[:, x0:x0 + panel.shape[1]] = panel
    bars = [viz._label_bar(width, viz.HEADER_H, text) for text in (title, label)]
    parts = [bars[0], cams, bars[1], row]
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


# -- the command -------------------------------------------------------------------------------------
def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"--device={device}: this machine has no CUDA device; use --device=cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PredictError(f"--device={device}: expected auto, cpu, cuda or cuda:N") from None


def predict(init_dir: str = "", rig: str = "", frames: str = "", out_dir: str = "", rig_from: str = "",
            dset: str = "", split: str = "val", reference_camera: str = "CAM_FRONT", load_step: Any = None,
            batch_size: int = 4, nworkers: int = 0, device: str = "auto", pictures: bool = True,
            viz_width: int = 400, gif_fps: float = 2.0, gif_scale: float = 0.5, max_dt: float = 0.0,
            progress: bool = True, cache_dir: str = "") -> Dict[str, Any]:
    from bevtrain.build import build_precision, build_vox_util, forward
    from bevtrain.disk import atomic_write_bytes
    from bevtrain.progress import Progress
    from bevtrain.viz import write_gif, write_png

    if not rig:
        raise PredictError("--rig=<rig.yaml> is required (write one from a dataroot with "
                           "--rig_from=<dataroot>)")
    if rig_from:
        made, note = rig_from_dataroot(rig_from, dset, split, reference_camera, cache_dir or None)
        write_rig(made, rig, comment=f"bevtrain camera rig, {note}")
        print(f"[predict] rig of {len(made.cameras)} cameras written to {rig} ({note})")
        if not frames:
            return {"rig": rig}
    if not (init_dir and frames and out_dir):
        raise PredictError("--init_dir=<run or model-*.pth>, --frames=<folder> and --out_dir=<folder> "
                           "are required")
    the_rig = read_rig(rig)
    dev = pick_device(str(device))
    loaded = load_model(init_dir, load_step, dev)
    cfg = loaded.cfg
    check_rig_fits(the_rig, cfg, loaded.file, rig)
    found = find_frames(frames, the_rig, float(max_dt))
    check_sizes(found, the_rig, rig)
    classes = cfg.model.outputs
    final_dim = augment.final_dim_for(cfg.res_scale)
    ds = FrameSet(found, the_rig, final_dim, cfg.compat)
    loader = torch.utils.data.DataLoader(ds, batch_size=int(batch_size), shuffle=False,
                                         num_workers=int(nworkers))
    out = Path(out_dir)
    vox = build_vox_util(cfg)
    autocast, _, _ = build_precision(cfg.amp, dev)
    ego_T_ref = torch.from_numpy(the_rig.model_order()[0].ego_T_cam)
    sequences = len({f.sequence for f in found})
    print(f"[predict] {loaded.file} (step {loaded.step}); {len(found)} frames of {sequences} sequence(s), "
          f"{len(the_rig.cameras)} cameras, {final_dim[1]}x{final_dim[0]} inputs, device {dev}, "
          f"batch {batch_size}; classes {[c.name for c in classes]}")
    bar = Progress(len(ds), progress, label="predict", unit="frames")
    pngs: Dict[str, List[Path]] = {}
    t0, forward_s, done = time.perf_counter(), 0.0, 0
    with torch.no_grad():
        for batch in loader:
            on_dev = {k: batch[k].to(dev) for k in ("images", "pix_T_cams", "cams_T_ref")}
            tf = time.perf_counter()
            with autocast():
                seg = forward(loaded.model, on_dev)["seg"].float()
            prob = torch.sigmoid(seg).cpu().numpy()  # (B,C,Z,X)
            forward_s += time.perf_counter() - tf
            host = {**batch, "cam_names": the_rig.names_in_model_order(),
                    "ego_T_ref": ego_T_ref.expand(len(prob), 4, 4)}
            for b, i in enumerate(batch["index"].tolist()):
                frame = found[i]
                folder = out / frame.sequence
                npy = folder / f"{frame.name}.npy"
                atomic_write_bytes(npy, _npy_bytes(prob[b]), what=npy.name)
                if pictures:
                    image = render_prediction(host, prob[b], b, vox, classes,
                                              f"{frame.sequence}   {frame.name}", int(viz_width))
                    png = folder / f"{frame.name}.png"
                    write_png(png, image)
                    pngs.setdefault(frame.sequence, []).append(png)
            done += len(prob)
            bar.update(done)
    bar.close(done)
    seconds = time.perf_counter() - t0
    gifs = []
    for seq, files in pngs.items():
        from bevtrain.viz import read_png

        gif = out / f"{seq}.gif"
        write_gif(gif, [read_png(p) for p in files], fps=gif_fps, scale=gif_scale)
        gifs.append(str(gif))
    summary = {
        "checkpoint": str(loaded.file.resolve()), "step": loaded.step, "rig": str(Path(rig).resolve()),
        "rig_cameras": the_rig.names_in_model_order(), "reference_camera": the_rig.reference,
        "classes": [c.name for c in classes], "grid": grid_record(cfg), "compat": cfg.compat,
        "input_hw": list(final_dim), "frames": len(found), "device": str(dev), "batch_size": int(batch_size),
        "seconds": seconds, "frames_per_s": len(found) / seconds if seconds > 0 else None,
        "model_frames_per_s": len(found) / forward_s if forward_s > 0 else None, "gifs": gifs,
    }
    atomic_write_bytes(out / "predict.json", json.dumps(summary, indent=2).encode(), what="predict.json")
    print(f"[predict] {len(found)} frames in {seconds:.1f} s ({summary['frames_per_s']:.2f} frames/s, model "
          f"alone {summary['model_frames_per_s']:.2f}); probabilities (.npy)"
          f"{', pictures' if pictures else ''} in {out}/<sequence>/, {len(gifs)} GIF(s), predict.json")
    return summary


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32))
    return buf.getvalue()


def check_flags(command, flags) -> None:
    """PredictError for a flag ``command`` does not take (fire would raise a TypeError after parsing)."""
    import inspect

    from bevtrain.suggest import closest_name

    known = list(inspect.signature(command).parameters)
    for name in flags:
        if name not in known:
            close = closest_name(name, known)
            raise PredictError(f"unknown flag '--{name}'" + (f"; did you mean '--{close}'?" if close else "")
                               + f" (flags: {', '.join('--' + k for k in known)})")


def run_tool(
    command, args, flags: Dict[str, Any], *, doc: str, prog: str, flag_for_path: str
) -> Dict[str, Any]:
    """The front door of predict and export: --help, flags checked against ``command``'s, the errors a
    user fixes as one ``error:`` line (bevtrain.cli.run_command)."""
    from bevtrain.checkpoint import CheckpointError
    from bevtrain.cli import refuse_positional, run_command
    from bevtrain.evaluate import EvalError

    if flags.pop("help", False) or flags.pop("h", False):
        print(doc)
        return {}
    debug = bool(flags.pop("debug", False))

    def checked():
        refuse_positional(args, flag_for_path=flag_for_path)
        check_flags(command, flags)
        return command(**flags)

    usage = (PredictError, RigFileError, EvalError, CheckpointError)
    return run_command(checked, debug=debug, usage_errors=usage, prog=prog)


def main(*args: Any, **flags: Any) -> Dict[str, Any]:
    return run_tool(predict, args, flags, doc=__doc__, prog="predict", flag_for_path="frames")


def cli(*args: Any, **flags: Any) -> None:
    main(*args, **flags)


if __name__ == "__main__":
    from bevtrain.cli import fire_main

    fire_main(cli)
