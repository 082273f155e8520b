"""What a training run is, in the state a checkpoint holds, and the one way to restore it.

``TrainState`` gathers the weights, the optimiser, schedule and scaler, the step, the non-finite
count, the pending validation and the loaders' positions; ``state_dict``/``load_state_dict`` write
and read a checkpoint's training part. Resume (``--resume``) and initialisation (``--init_dir``
with ``--load_optimizer``/``--load_step``) both go through ``load_state_dict``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

import torch

from bevtrain.checkpoint import CheckpointError, load_weights
from bevtrain.data.dataset import worker_signals_held


class LoaderCursor:
    """Endless batches from a DataLoader with its position (epoch, batches consumed this epoch).

    A resumed cursor skips exactly the consumed batches without loading them: the epoch's order
    comes from the loader's EpochSampler, seeded by epoch, which skips them in place.
    Iterators open eagerly, so anything a DataLoader draws when it starts is drawn before a resume
    restores the RNG states.
    """

    def __init__(self, loader, epoch: int = 0, consumed: int = 0):
        self.loader, self.epoch, self.consumed = loader, int(epoch), int(consumed)
        self.epoch_batches = len(loader)
        if self.epoch_batches == 0:
            raise ValueError(
                "the data loader yields no batches (fewer samples than the per-rank batch size with "
                "drop_last); lower --batch_size or use more data"
            )
        self._it = self._open()

    def _open(self):
        sampler = self.loader.sampler  # an EpochSampler (data.dataset.make_loader)
        if self.consumed >= self.epoch_batches:
            sampler.set_epoch(self.epoch)
            return iter(())  # the epoch was used up: roll over on the next call, as the run did
        sampler.set_epoch(self.epoch, skip=self.consumed * self.loader.batch_size)
        with worker_signals_held():  # workers start here (persistent: the first time only)
            return iter(self.loader)

    def next(self):
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._it = self._open()
            batch = next(self._it)
        self.consumed += 1
        return batch

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}


@dataclass
class SafePoint:
    """What a checkpoint written now holds besides weights, optimiser, schedule and scaler (which only
    the optimiser update changes): RNG states and loader positions as of the last completed step, and
    whether the validation due at that step is still to do. ``buffers``: the model's buffers
    (BatchNorm statistics) at the start of the step in progress, whose forwards change them; None
    when the live buffers are the completed step's."""

    rng: Dict[str, Any]
    train_pos: Dict[str, int]
    val_pos: Dict[str, int] | None
    val_pending: bool = False
    buffers: List[torch.Tensor] | None = None


@dataclass
class TrainState:
    model: torch.nn.Module  # the bare model (not DDP- or compile-wrapped): its state_dict is saved
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler or None
    scaler: torch.amp.GradScaler
    step: int = 0
    nonfinite_total: int = 0
    val_pending: bool = False  # the validation due at ``step`` was interrupted: redo it first
    data_pos: Dict[str, Dict[str, int]] = field(default_factory=dict)  # where the cursors open
    train_cursor: LoaderCursor | None = None
    val_cursor: LoaderCursor | None = None

    def open_cursors(self, train_loader, val_loader) -> None:
        self.train_cursor = LoaderCursor(train_loader, **self.data_pos.get("train", {}))
        self.val_cursor = (
            LoaderCursor(val_loader, **self.data_pos.get("val", {})) if val_loader is not None else None
        )
        self.val_pending = self.val_pending and self.val_cursor is not None

    def positions(self):
        return self.train_cursor.state(), self.val_cursor.state() if self.val_cursor else None

    def state_dict(self, rng_states: List[Any], train_pos, val_pos, val_pending: bool) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "rng": rng_states,
            "data": {"train": train_pos, **({"val": val_pos} if val_pos is not None else {})},
            "val_pending": val_pending,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(
        self,
        ckpt: Mapping[str, Any],
        source,
        *,
        weights=None,
        ignore_load=None,
        optimizer: bool = True,
        step: bool = True,
        progress: bool = True,
    ) -> List[str]:
        """Restore from a checkpoint: the weights (``weights``, default ``ckpt['model']``, minus
        ``ignore_load``), with ``optimizer`` the optimiser, schedule and scaler, with ``step`` the step
        (the schedule fast-forwarded when its own state is not loaded), with ``progress`` the run's
        progress (non-finite count, pending validation, loader positions; resume only). Returns the
        weight names left out by ignore_load."""
        skipped = load_weights(
            self.model, ckpt["model"] if weights is None else weights, ignore_load=ignore_load, source=source
        )
        if optimizer:
            if ckpt.get("optimizer") is None:
                raise CheckpointError(
                    f"--load_optimizer=True: {source} holds no bevtrain optimiser state (a Simple-BEV or "
                    "converted checkpoint: Simple-BEV's optimiser state does not map onto ours); drop it"
                )
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler.is_enabled() and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        if step:
            self.step = int(ckpt["step"])
            if self.scheduler is not None and not (optimizer and ckpt.get("scheduler") is not None):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(min(self.step, self.scheduler.total_steps - 1)):
                        self.scheduler.step()
        if progress:
            self.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
            self.val_pending = bool(ckpt.get("val_pending", False))
            self.data_pos = dict(ckpt.get("data") or {})
        return skipped

    def restart_data_at_next_epoch(self) -> None:
        """After a change of world size or batch size the saved positions mean other samples."""
        self.data_pos = {k: {"epoch": v["epoch"] + 1, "consumed": 0} for k, v in self.data_pos.items()}
