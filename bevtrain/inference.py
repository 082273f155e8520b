"""The one evaluation loop, shared by validation during training and by ``eval_nuscenes.py``.

``run_batches(predict, batches, evaluators, device)`` has detectron2's ``inference_on_dataset``
shape: each batch goes to the device, ``predict`` runs the model once, and every evaluator sees the
batch and the outputs. What is measured or written is the evaluators' business:

- ``ExactlyOnce``: every dataset position enters the metric exactly once across ranks (a sample a
  sampler pads in twice counts once; marks the batch's ``keep``), or an EvalError;
- ``IoU``: ``metrics.BevIoUEvaluator`` counts per class (with distance bands when built with a grid,
  and BEVFusion's threshold sweep for map layers);
- ``LossMeans``: the training losses, averaged over batches and ranks (validation);
- ``Pictures``: PNG composites of chosen samples; ``LastBatch``: the last batch, for TensorBoard;
- ``ProgressBar``: the one progress line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence

import torch

from bevtrain import viz
from bevtrain.build import to_device
from bevtrain.disk import DiskFullError
from bevtrain.distributed import all_reduce_, all_reduce_sum
from bevtrain.losses import compute_losses
from bevtrain.metrics import BEVFUSION_THRESHOLDS, BevIoUEvaluator
from bevtrain.progress import Progress

# What the model and the metric read; the rest of a batch (names, strings) stays on the host.
BATCH_KEYS_ON_DEVICE = (
    "images",
    "pix_T_cams",
    "cams_T_ref",
    "ref_T_ego",
    "seg_bev",
    "valid_bev",
    "radar",
    "radar_count",
    "lidar",
    "lidar_count",
)


class EvalError(RuntimeError):
    """Evaluation cannot start or its numbers would be wrong; the message says which and what to do."""


def run_batches(
    predict,
    batches: Iterable[Mapping[str, Any]],
    evaluators: Sequence[Any],
    device: torch.device,
    keys: Sequence[str] | None = None,
) -> Dict[str, float]:
    """``predict(batch on device) -> outputs dict``; then ``evaluator.process(batch, outputs)`` for
    each evaluator, in order (on the device batch; ``keys`` limits what moves there). Returns the
    loop's wall seconds and the seconds spent in ``predict``."""
    forward_s = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            on_dev = to_device(batch, device, keys)
            tf = time.perf_counter()
            out = predict(on_dev)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward_s += time.perf_counter() - tf
            for evaluator in evaluators:
                evaluator.process(on_dev, out)
    return {"seconds": time.perf_counter() - t0, "forward_seconds": forward_s}


def slowest_rank(timing: Mapping[str, float]) -> Dict[str, float]:
    packed = torch.tensor([timing["seconds"], timing["forward_seconds"]], dtype=torch.float64)
    packed = all_reduce_(packed, torch.distributed.ReduceOp.MAX)
    return {"seconds": float(packed[0]), "forward_seconds": float(packed[1])}


class ExactlyOnce:
    """Tallies dataset positions (``batch["index"]``); sets ``batch["keep"]`` so a position loaded twice
    on a rank counts once. ``check()`` (collective) raises EvalError unless every position in
    ``expected`` (default all ``n``) was counted exactly once across ranks."""

    def __init__(self, n: int, expected: Sequence[int] | None = None):
        self.seen = torch.zeros(n, dtype=torch.int64)  # times each sample was loaded (this rank)
        self.counted = torch.zeros(n, dtype=torch.int64)  # times it entered the metric (this rank)
        self.want = torch.zeros(n, dtype=torch.int64)
        self.want[list(expected) if expected is not None else slice(None)] = 1

    @property
    def samples(self) -> int:
        return int(self.want.sum())

    def process(self, batch: Dict[str, Any], out) -> None:
        index = batch["index"].cpu()
        keep = torch.zeros(len(index), dtype=torch.bool)
        for b, idx in enumerate(index.tolist()):
            keep[b] = bool(self.seen[idx] == 0)
            self.seen[idx] += 1
        self.counted[index[keep]] += 1
        batch["keep"] = keep

    def check(self) -> None:
        counted = all_reduce_sum(self.counted)
        if not torch.equal(counted, self.want):
            missing = int(((self.want > 0) & (counted == 0)).sum())
            twice = int((counted > 1).sum())
            extra = int(((self.want == 0) & (counted > 0)).sum())
            raise EvalError(
                f"of {self.samples} samples the loader gave {missing} no turn, {twice} more than one "
                f"(across ranks) and {extra} were not asked for: the numbers would not be the split's"
            )


class IoU:
    """Per-class IoU counts (``BevIoUEvaluator``: both protocols; distance bands with ``vox_util``;
    BEVFusion's sweep over ``map_thresholds`` for map layers). ``classes``: the model's outputs."""

    def __init__(self, vox_util=None, classes=None, map_thresholds=BEVFUSION_THRESHOLDS):
        self.metric = BevIoUEvaluator(vox_util, classes=classes, map_thresholds=map_thresholds)

    def process(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> None:
        self.metric.update(
            out["seg"], batch["seg_bev"], batch["valid_bev"], batch.get("ref_T_ego"), batch.get("keep")
        )

    def compute(self) -> Dict[str, Any]:
        return self.metric.compute()  # collective


def iou_scalars(result: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers a training log keeps of ``BevIoUEvaluator.compute()``: 'iou' (Simple-BEV protocol at 0.5;
    with several classes their mean) and, for several classes or map layers, 'iou/<class>' per class and
    for map layers 'iou@max/<layer>' and 'miou@max' (BEVFusion's protocol, threshold picked on the data)."""
    out = {"iou": result["mean_iou"]["simplebev"]}
    per_class = result["per_class"]
    if len(per_class) > 1 or "bevfusion" in result:
        out.update({f"iou/{name}": r["simplebev"]["iou"] for name, r in per_class.items()})
    if "bevfusion" in result:
        out.update({f"iou@max/{name}": per_class[name]["bevfusion"]["iou@max"]
                    for name in result["bevfusion"]["layers"]})
        out["miou@max"] = result["bevfusion"]["miou"]
    return out


def format_ious(scalars: Mapping[str, float]) -> str:
    """'iou 61.20' or, per class, 'iou 61.20 (vehicle 55.10, drivable_area 82.30, ...)' in percent."""
    def pct(v: float) -> str:
        return "n/a" if v != v else f"{100 * v:.2f}"

    per_class = [f"{k[4:]} {pct(v)}" for k, v in scalars.items() if k.startswith("iou/")]
    return f"iou {pct(scalars['iou'])}" + (f" ({', '.join(per_class)})" if per_class else "")


class LossMeans:
    """The training losses of each batch; ``compute(batches)`` averages them over batches and ranks."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.sums: Dict[str, torch.Tensor] = {}

    def process(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> None:
        loss, parts = compute_losses(out, batch, self.model)
        for k, v in {"loss": loss, **parts}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def compute(self, batches: int) -> Dict[str, float]:
        keys = sorted(self.sums)
        packed = all_reduce_sum(torch.stack([self.sums[k] for k in keys]))  # collective
        return {k: (packed[i] / batches).item() for i, k in enumerate(keys)}


class LastBatch:
    def __init__(self):
        self.batch = self.out = None

    def process(self, batch, out) -> None:
        self.batch, self.out = batch, out


def png_name(scene: str, index: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in scene) or "scene"
    return f"{safe}__{index:06d}.png"


class Pictures:
    """A PNG composite (cameras, ground truth, prediction) per sample whose position is in ``draw``
    (counted ones only), named ``<scene>__<index>.png`` in ``folder``. ``classes``: the model's outputs
    (default vehicle); ``viz_class``: the class of the error panel ('' = the first)."""

    def __init__(self, draw: Sequence[int], folder: Path | None, vox_util, width: int = 400,
                 classes=None, viz_class: str = ""):
        self.draw = set(int(i) for i in draw)
        self.folder, self.vox_util, self.width = folder, vox_util, width
        self.classes, self.viz_class = classes, viz_class
        self.pngs: List[str] = []
        self.disk_full: str = ""  # why drawing stopped: the scores go on without pictures

    def process(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> None:
        index = batch["index"].tolist()
        keep = batch.get("keep")
        chosen = [b for b, idx in enumerate(index) if idx in self.draw and (keep is None or bool(keep[b]))]
        if not chosen or self.folder is None:
            return
        host = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in batch.items()}
        seg = {"seg": out["seg"].detach().float().cpu()}
        for b in chosen:
            image = viz.render_composite(host, seg, b, self.vox_util, cell_width=self.width,
                                         classes=self.classes, viz_class=self.viz_class)
            png = Path(self.folder) / png_name(str(batch["scene_name"][b]), int(index[b]))
            try:
                viz.write_png(png, image)
            except DiskFullError as e:
                self.disk_full, self.folder = str(e), None
                return
            self.pngs.append(str(png))


class ProgressBar:
    """The one progress line (bevtrain.progress) over ``total`` samples of this rank."""

    def __init__(self, total: int, enabled: bool, label: str = "eval"):
        self.bar = Progress(total, enabled, label=label, unit="samples")
        self.done = 0

    def process(self, batch: Mapping[str, Any], out) -> None:
        self.done += len(batch["index"])
        self.bar.update(self.done)

    def close(self) -> None:
        self.bar.close(self.done)
