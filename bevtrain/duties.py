"""The training loop's periodic duties, each owning its cadence (``due(step)``) and its output.

- ``MetricLogger``: train scalars every ``log_freq`` steps (and at the first and last): TensorBoard
  ``<run>/t``, ``train_log.jsonl``, the console line with its ETA; validation results to ``<run>/v``;
- ``Validator``: every ``val_freq`` steps, ``val_batches`` batches through the one evaluation loop
  (bevtrain.inference), which eval_nuscenes.py also runs;
- ``Pictures``: BEV composites to TensorBoard every ``viz_freq`` steps;
- ``Checkpointer``: every ``save_freq`` steps, at the end and on a stop; the emergency save of the
  last safe point after a signal or a crash;
- ``NonFiniteGuard``: counts skipped non-finite steps and says when too many came in a row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch

from bevtrain.build import forward
from bevtrain.checkpoint import capture_rng
from bevtrain.distributed import all_gather_object, all_reduce_sum
from bevtrain.inference import IoU, LastBatch, LossMeans, format_ious, iou_scalars, run_batches
from bevtrain.metrics import BevIoUEvaluator


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def log_bev_images(
    writer, tag: str, batch: Mapping[str, Any], out: Mapping[str, Any], step: int, vox_util,
    classes=None, viz_class: str = "",
) -> None:
    """The composite of bevtrain.viz (cameras, GT, prediction) for the batch's first sample."""
    from bevtrain.viz import render_composite

    image = render_composite(batch, out, 0, vox_util, cell_width=200, classes=classes, viz_class=viz_class)
    writer.add_image(f"{tag}/composite", image, step, dataformats="HWC")


class Window:
    """Sums between two log lines; reduced across ranks when logged."""

    def __init__(self, device: torch.device, classes=None):
        self.device, self.classes = device, classes
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.parts: Dict[str, torch.Tensor] = {}
        # whole grid, per class, Simple-BEV protocol (valid_bev mask); no threshold sweep in training
        self.iou = BevIoUEvaluator(classes=self.classes, map_thresholds=())
        self.finite_steps = self.steps = 0
        self.data_time = self.step_time = 0.0
        self.samples = 0

    def add_step(self, loss, parts, finite: bool, data_time: float, step_time: float, samples: int) -> None:
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time
        self.samples += samples
        if finite:
            self.finite_steps += 1
            self.loss += loss
            for k, v in parts.items():
                self.parts[k] = self.parts.get(k, 0) + v

    def reduce(self, world_size: int) -> Dict[str, Any]:
        keys = sorted(self.parts)
        packed = torch.stack(
            [self.loss.float()]
            + [self.parts[k].float() for k in keys]
            + [torch.tensor(float(self.finite_steps), device=self.device)]
        )
        packed = all_reduce_sum(packed)
        n = max(packed[-1].item(), 1.0)  # finite steps summed over ranks
        rec = {
            "loss": packed[0].item() / n if self.finite_steps else math.nan,
            "parts": {k: packed[1 + i].item() / n for i, k in enumerate(keys)},
            **iou_scalars(self.iou.compute()),  # collective
            "data_time": self.data_time / max(self.steps, 1),
            "step_time": self.step_time / max(self.steps, 1),
            "samples_per_s": self.samples / max(self.step_time, 1e-9),
        }
        self.reset()
        return rec


class MetricLogger:
    """Train and val records: TensorBoard (rank 0), ``train_log.jsonl`` (rank 0), the console, and
    ``history`` (every rank, returned by train.main)."""

    def __init__(self, cfg, device, world_size: int, writers, log_file, say):
        self.cfg, self.world_size, self.say = cfg, world_size, say
        self.writer_t, self.writer_v = writers
        self.log_file = log_file
        self.window = Window(device, cfg.model.outputs)
        self.history: List[Dict[str, Any]] = []
        self.last_val: Dict[str, Any] | None = None
        self.ema_step_time: float | None = None

    def add_step(self, step_result) -> None:
        r = step_result
        t = r.step_time
        self.ema_step_time = t if self.ema_step_time is None else 0.9 * self.ema_step_time + 0.1 * t
        self.window.add_step(r.loss, r.parts, not r.skipped, r.data_time, t, r.samples)

    def due(self, step: int) -> bool:
        return step % self.cfg.log_freq == 0 or step == 1 or step == self.cfg.max_iters

    def _record(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def log_train(self, step: int, lr: float, nonfinite_total: int) -> None:
        rec = self.window.reduce(self.world_size)  # collective
        rec.update(step=step, lr=lr, nonfinite_total=nonfinite_total)
        eta = self.ema_step_time * (self.cfg.max_iters - step)
        w = self.writer_t
        if w is not None:
            w.add_scalar("loss", rec["loss"], step)
            for k, v in rec["parts"].items():
                w.add_scalar(f"loss/{k}", v, step)
            for k in ("lr", "nonfinite_total", *(k for k in rec if "iou" in k)):
                w.add_scalar(k, rec[k], step)
            w.add_scalar("time/data", rec["data_time"], step)
            w.add_scalar("time/step", rec["step_time"], step)
            w.add_scalar("samples_per_s", rec["samples_per_s"], step)
        parts_s = " ".join(f"{k} {v:.4f}" for k, v in rec["parts"].items())
        self.say(
            f"step {step:>7d}/{self.cfg.max_iters} | loss {rec['loss']:.4f} ({parts_s}) | "
            f"{format_ious(rec)} | lr {rec['lr']:.2e} | data {rec['data_time']:.3f}s "
            f"step {rec['step_time']:.3f}s | {rec['samples_per_s']:.2f} samples/s | "
            f"eta {format_duration(eta)}"
        )
        self._record(
            {
                "split": "train",
                **{k: v for k, v in rec.items() if k != "parts"},
                **{f"loss/{k}": v for k, v in rec["parts"].items()},
            }
        )

    def log_val(self, step: int, res: Dict[str, float]) -> None:
        self.last_val = {"split": "val", "step": step, **res}
        self._record(self.last_val)
        if self.writer_v is not None:
            for k, v in res.items():
                self.writer_v.add_scalar(k if k == "loss" or "iou" in k else f"loss/{k}", v, step)
        self.say(f"val  {step:>7d}/{self.cfg.max_iters} | loss {res['loss']:.4f} | {format_ious(res)}")


class Validator:
    """``val_batches`` batches from the val cursor every ``val_freq`` steps: mean losses and the
    whole-grid IoU per class (Simple-BEV protocol; map layers also BEVFusion's iou@max) over those
    batches and all ranks."""

    def __init__(self, cfg, state, model: torch.nn.Module, autocast, device, world_size: int, safe):
        self.cfg, self.state, self.model = cfg, state, model
        self.autocast, self.device, self.world_size = autocast, device, world_size
        self.safe = safe  # the run's safe points: test signals, stop checks, bad-sample log
        self.last = LastBatch()
        self.last_result: Dict[str, Any] | None = None  # the last validation's BevIoUEvaluator.compute()

    def due(self, step: int) -> bool:
        """Every val_freq steps, and at the last step (a run, resumed or not, ends validated)."""
        every = step % self.cfg.val_freq == 0 or step == self.cfg.max_iters
        return self.state.val_cursor is not None and every

    def _batches(self, step: int):
        for i in range(self.cfg.val_batches):
            self.safe.test_signal("val", step, i)
            self.safe.check_stop()
            batch = self.state.val_cursor.next()
            self.safe.bad_log.add_batch("val", batch, step)
            yield batch

    def run(self, step: int) -> Dict[str, float]:
        raw_model = self.state.model

        def predict(batch):
            with self.autocast():
                return forward(raw_model, batch)

        losses, iou = LossMeans(raw_model), IoU(classes=self.cfg.model.outputs)
        self.model.eval()
        run_batches(predict, self._batches(step), [losses, iou, self.last], self.device)
        self.model.train()
        result = losses.compute(self.cfg.val_batches * self.world_size)  # collective
        self.last_result = iou.compute()  # collective: counts summed over ranks
        result.update(iou_scalars(self.last_result))
        return result


class Pictures:
    """BEV composites (cameras, ground truth, prediction) to TensorBoard every ``viz_freq`` steps."""

    def __init__(self, viz_freq: int, vox_util, writers, classes=None, viz_class: str = ""):
        self.viz_freq, self.vox_util = viz_freq, vox_util
        self.writer_t, self.writer_v = writers
        self.classes, self.viz_class = classes, viz_class

    def due(self, step: int) -> bool:
        return bool(self.viz_freq) and step % self.viz_freq == 0 and self.writer_t is not None

    def log(self, split: str, step: int, batch, out) -> None:
        writer = self.writer_t if split == "train" else self.writer_v
        log_bev_images(writer, "bev", batch, out, step, self.vox_util, self.classes, self.viz_class)


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; ``tripped`` after ``max_nonfinite`` in a row (0 = never)."""

    def __init__(self, max_nonfinite: int, state, say):
        self.max_nonfinite, self.state, self.say = max_nonfinite, state, say
        self.in_a_row = 0

    def record(self, skipped: bool) -> None:
        if skipped:
            self.in_a_row += 1
            self.state.nonfinite_total += 1
        else:
            self.in_a_row = 0

    def report(self, step: int) -> None:
        self.say(
            f"[bevtrain] step {step}: non-finite loss or gradient, step skipped "
            f"({self.in_a_row} in a row, {self.state.nonfinite_total} in total)"
        )

    @property
    def tripped(self) -> bool:
        return bool(self.max_nonfinite) and self.in_a_row >= self.max_nonfinite


class Checkpointer:
    """Writes ``<ckpt_dir>/<run>/model-<step>.pth`` (rank 0) every ``save_freq`` steps, at the last
    step and when the run stops; after a signal or crash, the state of the last safe point."""

    def __init__(self, cfg, state, manager, meta: Dict[str, Any], safe, saved_path: Path | None = None):
        self.cfg, self.state, self.manager, self.meta, self.safe = cfg, state, manager, meta, safe
        self.last_saved, self.saved_path = state.step, saved_path  # a resumed run's checkpoint holds its step

    def due(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.save_freq == 0 or step == self.cfg.max_iters or bool(stopping)

    def _write(self, rng_states, train_pos, val_pos, val_pending: bool, buffers=None) -> Path:
        with self.safe.lock:  # no second stop signal saves meanwhile (train.stop_at_once)
            self.safe.test_signal("save", self.state.step)
            body = self.state.state_dict(rng_states, train_pos, val_pos, val_pending)
            if buffers is not None:  # the completed step's BatchNorm statistics, not the live ones
                body["model"] = dict(body["model"])
                names = [name for name, _ in self.state.model.named_buffers()]
                body["model"].update({n: b for n, b in zip(names, buffers) if n in body["model"]})
            path = self.manager.save({**body, **self.meta}, self.state.step)
            self.last_saved, self.saved_path = self.state.step, path
            return path

    def save(self) -> Path | None:
        """At a step end, of the live state. Collective (all ranks at the same step); rank 0 writes."""
        rng_states = all_gather_object(capture_rng())
        if self.manager is None:
            self.last_saved = self.state.step
            return None
        return self._write(rng_states, *self.state.positions(), False)

    def save_point(self, point) -> Path:
        """Rank 0 alone (other ranks may be gone): the state of the last safe point. The live model is
        left alone (a second stop signal saves from another thread while a step runs)."""
        return self._write([point.rng], point.train_pos, point.val_pos, point.val_pending, point.buffers)

    @property
    def unsaved(self) -> bool:
        return self.state.step > self.last_saved
