"""What an evaluation leaves behind: metrics.json, PNG composites and scene GIFs, TensorBoard.

Folders are named after what was evaluated (README "Evaluation and visualisation"):
``viz-<step>-<dataroot name>-<hash6>-<dset>-<split>/`` beside the checkpoint and TensorBoard
``<log_dir>/<run>/eval-<dataroot name>-<hash6>-<dset>-<split>``, so two dataroots or splits never
share one.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from bevtrain import viz
from bevtrain.disk import atomic_write_text
from bevtrain.metrics import MAP_PROTOCOL, MAP_PROTOCOL_LABEL, PROTOCOLS, protocol_label


def dataset_tag(data_dir: str | Path, dset: str) -> str:
    """A readable name for a dataset that differs between dataroots: the dataroot's folder name,
    a short hash of its absolute path (two folders may share a name) and the nuScenes version."""
    root = Path(data_dir).expanduser().resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:6]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "root"
    return f"{name}-{digest}-{dset}"


def evaluated_name(data_dir: str | Path, dset: str, split: str) -> str:
    """``<dataset tag>-<split>``, e.g. ``synthetic-1a2b3c-mini-val``: names the folders of an
    evaluation (``viz-<step>-...``, TensorBoard ``eval-...``), so other data or splits never share them."""
    return f"{dataset_tag(data_dir, dset)}-{split}"


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


PROTOCOL_MEANINGS = {
    "simplebev": "pixels of visibility-1 boxes (0-40% visible) ignored",
    "lss": "every box counts, no mask",
}


def protocol_entries(result: Mapping[str, Any], raster: str) -> Dict[str, Any]:
    """metrics.json's ``protocols``: each protocol's counts, bands, label and what it means, for the
    first class (named in ``class``; every class is under ``per_class``)."""
    first = (result.get("classes") or ["vehicle"])[0]
    return {
        p: dict(
            result[p],
            label=protocol_label(p, raster),
            description=f"{PROTOCOL_MEANINGS[p]}; ground truth from the {raster} target raster",
            **{"class": first},
        )
        for p in PROTOCOLS
    }


def protocol_labels(result: Mapping[str, Any], raster: str) -> Dict[str, str]:
    """What each protocol key under ``per_class`` means."""
    labels = {p: f"{protocol_label(p, raster)}: {PROTOCOL_MEANINGS[p]}, sigmoid > {result['threshold']}"
              for p in PROTOCOLS}
    if MAP_PROTOCOL in result:
        labels[MAP_PROTOCOL] = MAP_PROTOCOL_LABEL
    return labels


def write_metrics(summary: Mapping[str, Any], paths: Sequence[Path]) -> None:
    """Each file atomically: a full disk leaves the earlier metrics.json whole (DiskFullError)."""
    text = json.dumps(json_safe(summary), indent=2) + "\n"
    for path in paths:
        atomic_write_text(path, text, what="metrics.json")


def write_scene_gifs(pngs: Sequence[Path], fps: float = 2.0, scale: float = 0.5) -> List[Path]:
    """One animated GIF per scene (``<folder>/<scene>.gif``) from composites named
    ``<scene>__<index>.png`` (inference.png_name)."""
    by_scene: Dict[Tuple[Path, str], List[Path]] = {}
    for png in sorted(pngs):
        by_scene.setdefault((png.parent, png.name.rsplit("__", 1)[0]), []).append(png)
    gifs = []
    for (folder, scene), files in sorted(by_scene.items()):
        frames = [viz.read_png(p) for p in files]
        frames = [f for f in frames if f.shape == frames[0].shape]
        gif = folder / f"{scene}.gif"
        viz.write_gif(gif, frames, fps=fps, scale=scale)
        gifs.append(gif)
    return gifs


def write_tensorboard(
    tb_dir: Path,
    step: int,
    raster: str,
    result: Mapping[str, Any],
    samples_per_s: float | None,
    pngs: Sequence[str],
) -> str:
    """The numbers and the composites at the checkpoint's step, into ``tb_dir``; returns it."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        # The raster is in the tag: numbers scored against different ground truths are separate curves.
        tag = f"raster_{raster}"
        for protocol in PROTOCOLS if result else ():
            writer.add_scalar(f"eval/iou_{protocol}_{tag}", result[protocol]["iou"], step)
            for band, r in result[protocol]["bands"].items():
                if math.isfinite(r["iou"]):  # an empty band (no cell with vehicles or predictions) has none
                    writer.add_scalar(f"eval/iou_{protocol}_{tag}_{band}", r["iou"], step)
        # Per class: iou/<class> (Simple-BEV protocol at 0.5, as in training's curves), the LSS protocol,
        # and for map layers BEVFusion's iou@max and mIoU; an empty union has no IoU and no point.
        for name, r in (result or {}).get("per_class", {}).items():
            scalars = {f"iou/{name}": r["simplebev"]["iou"], f"iou_lss/{name}": r["lss"]["iou"]}
            if MAP_PROTOCOL in r:
                scalars[f"iou@max/{name}"] = r[MAP_PROTOCOL]["iou@max"]
            for key, value in scalars.items():
                if math.isfinite(value):
                    writer.add_scalar(key, value, step)
        if result and MAP_PROTOCOL in result and math.isfinite(result[MAP_PROTOCOL]["miou"]):
            writer.add_scalar("miou@max", result[MAP_PROTOCOL]["miou"], step)
        if samples_per_s:
            writer.add_scalar("eval/samples_per_s", samples_per_s, step)
        for png in map(Path, pngs):
            writer.add_image(f"eval_viz/{png.stem}", viz.read_png(png), step, dataformats="HWC")
    finally:
        writer.close()
    return str(tb_dir)
