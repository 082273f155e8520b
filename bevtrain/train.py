"""Iteration-based training: a loop you can read top to bottom, one ``train_step``, and duties that own
their cadence (bevtrain.duties).

``main(**flags)`` resolves the config (defaults < YAML < flags) and joins the process group when
launched by torchrun; ``train`` sets the run up (``start_run``: config from --resume/--init_dir, data,
model, ``TrainState``, folders, duties), runs ``max_iters`` optimiser steps of ``grad_acc``
micro-batches each, and ends by saying where the checkpoint is and what to run next. Rank 0 writes
TensorBoard events to ``<log_dir>/<run>/t`` and ``/v`` and checkpoints to ``<ckpt_dir>/<run>/``.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from bevtrain import build
from bevtrain.build import forward, to_device
from bevtrain.checkpoint import (
    CheckpointManager,
    capture_rng,
    is_simplebev,
    load_checkpoint,
    remove_stale_temp_files,
    resolve_init,
    resolve_resume,
    restore_rng,
)
from bevtrain.cli import data_error_types, record_traceback, refuse_positional, run_command
from bevtrain.config import SIMPLE_BEV_NWORKERS, Config, ConfigError, override_saved, resolve_config
from bevtrain.convert_simplebev import check_simplebev_settings, convert_weights, simplebev_mode
from bevtrain.data.dataset import BadSampleLog, kill_loader_workers, stop_workers
from bevtrain.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    per_rank_batch,
)
from bevtrain.duties import Checkpointer, MetricLogger, NonFiniteGuard, Pictures, Validator, format_duration
from bevtrain.inference import format_ious
from bevtrain.losses import compute_losses
from bevtrain.metrics import format_table
from bevtrain.model.encoders import ensure_backbone_weights
from bevtrain.run_files import claim_run_name, code_version, next_steps, trim_log, write_run_info
from bevtrain.stopping import StopNow, StoppedBySignal, StopSignals, TestSignal
from bevtrain.train_state import SafePoint, TrainState

__all__ = ["cli", "main", "train", "train_step", "NonFiniteLossError", "StoppedBySignal", "format_duration"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good state was written."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


LOSS_OUTPUTS = ("seg", "center", "offset")


def unused_outputs_term(out: Mapping[str, Any]) -> torch.Tensor:
    """0 x the outputs no loss reads (Simple-BEV's 'feat' head): DDP expects every parameter to get
    a gradient each step, and this keeps those heads in the graph without changing the loss."""
    extra = [
        v.float().sum()
        for k, v in out.items()
        if k not in LOSS_OUTPUTS and torch.is_tensor(v) and v.requires_grad
    ]
    return 0.0 * torch.stack(extra).sum() if extra else torch.zeros((), device=out["seg"].device)


def clip_gradients(parameters, grad_clip: float, grad_acc: int) -> torch.Tensor:
    """Clip as Simple-BEV did, for averaged micro-batches. Simple-BEV summed the gradients of its
    grad_acc micro-batches (loss not divided) and clipped that sum at grad_clip; we average, so the
    same clipping is ``clip(mean, grad_clip / grad_acc)`` = ``clip(sum, grad_clip) / grad_acc``.
    Returns the norm of the averaged gradient before clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, grad_clip / grad_acc)


def main(**flags) -> Dict[str, Any]:
    """Train with Simple-BEV's flags (see bevtrain.config.FLAGS). Returns a summary dict; raises
    StoppedBySignal (a SystemExit with --signal_exit_code) when SIGINT/SIGTERM stopped the run."""
    cfg, _ = resolve_config(flags)
    info = init_distributed(cfg.device, cfg.device_ids)
    try:
        summary = train(cfg, flags, info)
    finally:
        cleanup()
    if summary["status"] == "signalled":
        raise StoppedBySignal(summary)
    return summary


# -- the run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    """A run once set up: its config, model, state and duties, and the safe-point bookkeeping that
    decides what an interruption saves."""

    cfg: Config
    info: DistInfo
    say: Callable[[str], None]
    name: str
    log_run: Path
    ckpt_run: Path
    model: torch.nn.Module  # what runs forward: DDP- and/or compile-wrapped ``state.model``
    state: TrainState
    autocast: Callable[[], Any]
    loaders: tuple  # (train, val or None)
    vox_util: Any
    resumed_from: Path | None = None
    resume_rng: list | None = None  # a resumed run's RNG states, restored once its loaders are open
    stop: StopSignals | None = None
    test_signal: TestSignal | None = None
    bad_log: BadSampleLog | None = None
    logger: MetricLogger | None = None
    validator: Validator | None = None
    pictures: Pictures | None = None
    checkpointer: Checkpointer | None = None
    guard: NonFiniteGuard | None = None
    writers: tuple = (None, None)
    log_file: Any = None
    point: SafePoint | None = None  # the state of the last safe point
    updating: bool = False  # in an optimiser update: no exact state until the step ends
    start_step: int = 0
    t_start: float = 0.0
    threads: str = ""  # the CPU thread choice, said in the first lines
    explicit: set = field(default_factory=set)  # flags given now (command line or preset)
    # Held while the state a checkpoint would hold changes (an optimiser update and the safe point
    # after it, the BatchNorm snapshot at a step's start) and while a checkpoint is written: a second
    # stop signal saves only between those (stop_at_once).
    lock: Any = field(default_factory=threading.RLock)

    def safe_point(self, val_pending: bool = False, buffers=None) -> SafePoint:
        return SafePoint(capture_rng(), *self.state.positions(), val_pending, buffers)

    def check_stop(self) -> None:
        """A safe point: a single process stops here after a signal (DDP ranks agree at step ends,
        as they must all run the same collectives)."""
        self.stop.passed_safe_point()
        if self.stop.requested and not self.info.distributed:
            raise StopNow

    def close(self) -> None:
        """Signals back to their previous handlers, writers closed, loader workers stopped (now, not
        whenever the run object is collected)."""
        self.stop.uninstall()
        for writer in (*self.writers, self.log_file):
            if writer is not None:
                writer.close()
        for loader in self.loaders:
            if loader is not None:
                stop_workers(loader)


def train(cfg: Config, flags: Mapping[str, Any], info: DistInfo) -> Dict[str, Any]:
    run = start_run(cfg, flags, info)
    run.stop = StopSignals(
        on_first=lambda name: acknowledge_stop(run, name), on_second=lambda name: stop_at_once(run, name)
    )
    run.stop.install()  # before loader workers start: from here on a signal is acted on at a safe point
    try:
        open_run(run)
        status = run_loop(run)
    except StopNow:
        status = "signalled"
        save_after_signal(run)
    except BaseException as exc:
        save_after_crash(run, exc)
        if info.is_main and isinstance(exc, data_error_types()):
            record_traceback(exc, run.log_run)  # the message alone is printed (bevtrain.cli)
        raise
    finally:
        run.close()
    return finish(run, status)


def run_loop(run: Run) -> str:
    """Steps until max_iters (a validation interrupted midway is redone first, from its cursor)."""
    cfg, state = run.cfg, run.state
    run.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    while state.step < cfg.max_iters or state.val_pending:
        stop_now = False
        val_due, state.val_pending = state.val_pending, False
        if not val_due:
            with run.lock:
                run.point = run.safe_point(buffers=[b.detach().clone() for b in state.model.buffers()])
            result = train_step(run)
            stop_now = result.stop_requested
            val_due = result.val_due
            after_train_step(run, result)
        if val_due:
            run.point = run.safe_point(val_pending=True)  # after logging: the state validation starts from
            res = run.validator.run(state.step)
            run.point = run.safe_point()
            run.logger.log_val(state.step, res)
            if run.pictures.due(state.step):
                run.pictures.log("val", state.step, run.validator.last.batch, run.validator.last.out)
        if run.guard.tripped:
            path = run.checkpointer.save()
            raise NonFiniteLossError(
                f"{run.guard.in_a_row} non-finite steps in a row at step {state.step}; the last good weights "
                f"are in {path or run.ckpt_run}. Lower --lr, try --amp=none or --amp=bf16, or check the data."
            )
        if not run.info.distributed:
            run.stop.passed_safe_point()
            stop_now = run.stop.requested
        stopping = stop_now or bool(cfg.stop_at and state.step >= cfg.stop_at)
        if run.checkpointer.due(state.step, stopping):
            run.checkpointer.save()
        if stopping:
            return stopped(run, stop_now)
    return "finished"


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over the micro-batches
    parts: Dict[str, torch.Tensor]
    skipped: bool  # non-finite: no update
    stop_requested: bool  # some rank got a stop signal (agreed across ranks)
    data_time: float
    step_time: float
    samples: int
    batch: Dict[str, Any]  # the last micro-batch and its outputs (for pictures)
    out: Dict[str, torch.Tensor]
    val_due: bool = False  # a validation is due at the step just completed


def train_step(run: Run) -> StepResult:
    """``grad_acc`` forward/backward passes, then one optimiser update (or a skip every rank agrees on)."""
    cfg, state = run.cfg, run.state
    t0 = time.perf_counter()
    data_time, finite = 0.0, True
    step_loss = torch.zeros((), device=run.info.device)
    step_parts: Dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_acc):
        run.test_signal("micro", state.step + 1, micro)
        run.check_stop()
        td = time.perf_counter()
        batch = to_device(state.train_cursor.next(), run.info.device)
        run.bad_log.add_batch("train", batch, state.step + 1)
        data_time += time.perf_counter() - td
        run.test_signal("forward", state.step + 1, micro)
        last_micro = micro == cfg.grad_acc - 1
        sync = run.model.no_sync() if run.info.distributed and not last_micro else contextlib.nullcontext()
        with sync:
            with run.autocast():
                out = forward(run.model, batch)
            loss, parts = compute_losses(out, batch, state.model)
            if run.info.distributed and not cfg.find_unused_parameters:
                loss = loss + unused_outputs_term(out)
            state.scaler.scale(loss / cfg.grad_acc).backward()
        finite = finite and bool(torch.isfinite(loss).item())
        step_loss += loss.detach().float() / cfg.grad_acc
        for k, v in parts.items():
            step_parts[k] = step_parts.get(k, 0) + v.detach().float() / cfg.grad_acc
        run.logger.window.iou.update(out["seg"], batch["seg_bev"], batch["valid_bev"])
    run.test_signal("update", state.step + 1)
    with run.lock:  # the update and the safe point after it, as one
        run.updating = True
        skipped, stop_requested = optimizer_update(run, finite)
        state.step += 1
        val_due = run.validator.due(state.step)
        run.point, run.updating = run.safe_point(val_pending=val_due), False
    return StepResult(
        step_loss,
        step_parts,
        skipped,
        stop_requested,
        data_time,
        time.perf_counter() - t0,
        cfg.batch_size * cfg.grad_acc,
        batch,
        out,
        val_due,
    )


def optimizer_update(run: Run, finite: bool):
    """Every rank takes the same decision: non-finite losses and stop requests are agreed first.
    Returns (skipped, stop requested)."""
    cfg, state = run.cfg, run.state
    agreed = all_reduce_sum(
        torch.tensor([0.0 if finite else 1.0, float(run.stop.requested)], device=run.info.device)
    )
    skip, stop_now = agreed[0].item() > 0, agreed[1].item() > 0
    state.scaler.unscale_(state.optimizer)
    if not skip and cfg.grad_clip > 0:
        grad_norm = clip_gradients(state.model.parameters(), cfg.grad_clip, cfg.grad_acc)
        # with fp16 an inf gradient is the scaler's business (it skips and lowers the scale)
        skip = not state.scaler.is_enabled() and not bool(torch.isfinite(grad_norm).item())
    if skip:
        if state.scaler.is_enabled():
            state.scaler.update()
    else:
        state.scaler.step(state.optimizer)
        state.scaler.update()
        scheduler = state.scheduler
        if scheduler is not None and scheduler.last_epoch + 1 < scheduler.total_steps:
            scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return skip, stop_now


def after_train_step(run: Run, result: StepResult) -> None:
    step = run.state.step
    run.guard.record(result.skipped)
    run.logger.add_step(result)
    if result.skipped:
        run.guard.report(step)
    if run.logger.due(step):
        run.logger.log_train(step, run.state.optimizer.param_groups[0]["lr"], run.state.nonfinite_total)
    if run.pictures.due(step):
        run.pictures.log("train", step, result.batch, result.out)


# -- stopping, saving after a signal or a crash, the end ------------------------------------------
def stopped(run: Run, by_signal: bool) -> str:
    if by_signal and run.state.step >= run.cfg.max_iters:
        return "finished"  # the signal came as the last step ended: the run is complete, its checkpoint saved
    how = f"by {run.stop.name}" if by_signal else "as asked (--stop_at)"
    run.say(
        f"[bevtrain] stopped {how} at step {run.state.step} with a checkpoint in {run.ckpt_run}; "
        f"continue with --resume={run.ckpt_run}"
    )
    return "signalled" if by_signal else "stopped"


def acknowledge_stop(run: Run, name: str) -> None:
    """The first stop signal, said at once (from the signal watcher thread), with how long it takes."""
    timing = run.stop.expected_wait()
    if timing is None:
        how_long = "how long: not known before a step has ended"
    elif timing[0] <= timing[1]:
        how_long = f"about {max(1.0, timing[1] - timing[0]):.0f} s"
    else:
        how_long = f"it has run {timing[0]:.0f} s, longer than the {timing[1]:.0f} s of the last ones"
    step = run.state.step
    keeps = f"the last completed step ({step})" if step > 0 else "nothing (no step has completed yet)"
    run.say(
        f"[bevtrain] {name} received: stopping at the end of the current micro-batch or step ({how_long}), "
        f"saving {keeps}; send it again to stop now, without the step in progress"
    )


def stop_at_once(run: Run, name: str) -> None:
    """A second stop signal: save the last completed step and end the process now, from the signal
    watcher thread, whatever the main thread is computing. An optimiser update or a checkpoint write
    in progress ends first (``run.lock``); the step in progress is dropped."""
    run.say(f"[bevtrain] {name} again: stopping now")
    run.lock.acquire()  # held until the process ends: the main thread changes nothing from here on
    code = run.cfg.signal_exit_code
    try:
        ck = run.checkpointer
        if not run.info.is_main or ck is None or ck.manager is None:
            pass
        elif run.point is not None and ck.unsaved:
            path = ck.save_point(run.point)
            run.say(f"[bevtrain] stopped at step {run.state.step}: checkpoint saved to {path}; "
                    f"continue with --resume={run.ckpt_run}")
        elif ck.saved_path is not None:
            run.say(f"[bevtrain] stopped at step {run.state.step}: its checkpoint {ck.saved_path} stands; "
                    f"continue with --resume={run.ckpt_run}")
        else:
            run.say("[bevtrain] stopped before the first step completed: nothing to save")
        for writer in (*run.writers, run.log_file):
            if writer is not None:
                writer.flush()
    except BaseException as exc:  # say so, and still stop: the user asked twice
        run.say(f"[bevtrain] could not save a checkpoint while stopping: {exc}")
    finally:
        kill_loader_workers()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def save_after_signal(run: Run) -> None:
    """A single process stopped at a safe point: save it unless its step is saved already."""
    ck, step, name = run.checkpointer, run.state.step, run.stop.name
    if ck.unsaved:
        path = ck.save_point(run.point)
        run.say(
            f"[bevtrain] stopped by {name} at step {step}"
            + (" (its validation is redone on resume)" if run.point.val_pending else "")
            + f": checkpoint saved to {path}; continue with --resume={run.ckpt_run}"
        )
    elif ck.saved_path is not None:
        run.say(
            f"[bevtrain] stopped by {name} at step {step}: its checkpoint {ck.saved_path} stands; "
            f"continue with --resume={run.ckpt_run}"
        )
    else:
        run.say(f"[bevtrain] stopped by {name} before the first step completed: nothing to save")


def save_after_crash(run: Run, exc: BaseException) -> None:
    """A crash or KeyboardInterrupt: keep the last completed step (rank 0 alone: others may be gone)."""
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
    ck = run.checkpointer
    if not run.info.is_main or ck is None or ck.manager is None or isinstance(exc, NonFiniteLossError):
        return
    try:
        if run.updating:
            newest = f"; the newest checkpoint is {ck.saved_path}" if ck.saved_path else ""
            run.say(
                f"[bevtrain] {status} during the optimiser update of step {run.state.step + 1}: "
                f"no exact state to save{newest}"
            )
        elif ck.unsaved:
            path = ck.save_point(run.point)
            run.say(
                f"[bevtrain] {status} at step {run.state.step}: checkpoint saved to {path}; "
                f"continue with --resume={run.ckpt_run}"
            )
        elif ck.saved_path is None:
            run.say(f"[bevtrain] {status} before the first step completed: nothing to save")
    except Exception as save_exc:  # report, but let the original error surface
        run.say(f"[bevtrain] could not save a checkpoint after the {status} run: {save_exc}")


def finish(run: Run, status: str) -> Dict[str, Any]:
    elapsed = time.perf_counter() - run.t_start
    last_val, saved = run.logger.last_val, run.checkpointer.saved_path
    run.say(
        f"[bevtrain] {status}: {run.state.step - run.start_step} steps in {format_duration(elapsed)}"
        + (f", last val {format_ious(last_val)}" if last_val else "")
    )
    tables = getattr(getattr(run, "validator", None), "last_result", None)
    if last_val and tables and len(tables["classes"]) > 1:
        # Several classes: the last validation's numbers per class under each protocol, as eval prints them.
        run.say(f"[bevtrain] last validation, step {last_val['step']}, {tables['samples']} val samples:\n"
                + format_table(tables, raster=run.cfg.target_raster))
    if saved is not None:
        for line in next_steps(run.cfg, Path(saved), run.log_run):
            run.say(line)
    return {
        "run_name": run.name,
        "step": run.state.step,
        "status": status,
        "log_dir": str(run.log_run),
        "ckpt_dir": str(run.ckpt_run),
        "history": run.logger.history,
        "last_val": last_val,
        "seconds": elapsed,
        "checkpoint": str(saved) if saved is not None else None,
        "exit_code": run.cfg.signal_exit_code if status == "signalled" else 0,
    }


# -- setting a run up ----------------------------------------------------------------------------------
def start_run(cfg: Config, flags: Mapping[str, Any], info: DistInfo) -> Run:
    """Config (from --resume / --init_dir), data, model and TrainState restored; nothing written yet."""
    say = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
    cfg, resume, init = prepare_config(cfg, flags, info, say)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    build.configure_cuda(info.device, cfg.deterministic)
    threads = build.configure_threads(cfg.threads, info.device)
    new_parents = [Path(d) for d in (cfg.log_dir, cfg.ckpt_dir) if not Path(d).exists()]
    claimed = _claim_name(cfg, say) if info.is_main and not resume else None
    name = resume[0]["run_name"] if resume else broadcast_object(claimed)
    log_run, ckpt_run = Path(cfg.log_dir) / name, Path(cfg.ckpt_dir) / name

    try:
        B_rank = per_rank_batch(cfg.batch_size, info.world_size)
        build.prepare_indexes(cfg, ["train", "val"] if cfg.do_val else ["train"], verbose=info.is_main)
        train_ds = build.build_dataset(cfg, split="train", is_train=True)
        loaders = (build.build_loader(cfg, train_ds, True, B_rank, info.rank, info.world_size), None)
        val_ds = None
        if cfg.do_val:
            val_ds = build.build_dataset(cfg, split="val", is_train=False)
            val_loader = build.build_loader(cfg, val_ds, False, B_rank, info.rank, info.world_size)
            loaders = (loaders[0], val_loader)
        # bad_samples=skip: samples left out are listed in <log_dir>/<run>/bad_samples.jsonl
        bad_log = BadSampleLog.for_run(log_run, info.rank, train=train_ds, val=val_ds)

        vox_util = build.build_vox_util(cfg)
        # A resumed run's weights come from its checkpoint and a Simple-BEV one replaces every weight:
        # no ImageNet file then.
        from_simplebev = init is not None and is_simplebev(init[0]) and not cfg.ignore_load
        state, autocast = build_state(cfg, info, say, imagenet=resume is None and not from_simplebev)
        restore(state, cfg, info, say, resume, init)
        run = Run(
            cfg,
            info,
            say,
            name,
            log_run,
            ckpt_run,
            wrap_model(state.model, cfg, info),
            state,
            autocast,
            loaders,
            vox_util,
            resumed_from=resume[1] if resume else None,
            bad_log=bad_log,
        )
        run.resume_rng = resume[0].get("rng") or [] if resume else None
        run.start_step, run.t_start, run.threads = state.step, time.perf_counter(), threads
        run.explicit = resolve_config(flags)[1]
    except BaseException:
        if claimed:  # a start that failed leaves no empty run folders behind
            for folder in (log_run, ckpt_run, *new_parents):
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): keep what is there
                    pass
        raise
    return run


def _claim_name(cfg: Config, say) -> str:
    name, wanted = claim_run_name(cfg)
    if name != wanted:
        say(f"[bevtrain] run name {wanted} is taken (another run started in the same second): this run "
            f"is {name}")
    return name


def prepare_config(cfg: Config, flags: Mapping[str, Any], info: DistInfo, say):
    """The run's config: a resumed run's saved one under today's flags, or an --init_dir checkpoint's
    compat mode; ImageNet weights fetched and data located before anything is built.
    Returns (cfg, (checkpoint, path) to resume or None, (checkpoint, path) to initialise from or None)."""
    if info.is_main:  # before resume looks for checkpoints; other ranks may not be up yet, so rank 0 alone
        for stale in remove_stale_temp_files(cfg.ckpt_dir):
            say(f"[bevtrain] removed {stale}: an unfinished checkpoint whose writer was killed")
    resume = init = None
    if cfg.resume:
        cfg, resume = _resume_config(cfg, flags, say)
    elif cfg.init_dir:
        cfg, init = _init_config(cfg, flags, say)
    build.check_data_dir(cfg)  # a missing data_dir is said at once, not after an ImageNet download
    _check_viz_class(cfg)
    if resume is None and not (init is not None and is_simplebev(init[0]) and not cfg.ignore_load):
        _ensure_encoder_weights(cfg, info.is_main)  # before any data: a missing file stops the run now
    if info.is_main:
        cfg = build.resolve_data_dir(cfg)  # may generate the synthetic set: rank 0 first
    barrier()
    if not info.is_main:
        cfg = build.resolve_data_dir(cfg, announce=False)
    if "device_ids" in flags and info.device.type == "cuda":
        if info.distributed:
            say("[bevtrain] device_ids is ignored under torchrun: rank r uses cuda:LOCAL_RANK")
        elif len(cfg.device_ids) > 1:
            say(
                f"[bevtrain] one process uses one GPU: cuda:{cfg.device_ids[0]}; for several GPUs launch "
                f"with torchrun --nproc_per_node={len(cfg.device_ids)}"
            )
    return cfg, resume, init


def _check_viz_class(cfg: Config) -> None:
    from bevtrain.viz import class_index

    try:
        class_index(cfg.model.outputs, cfg.viz_class)
    except ValueError as e:
        raise ConfigError(f"flag {e}") from None


def _resume_config(cfg: Config, flags: Mapping[str, Any], say):
    path = resolve_resume(cfg.resume, cfg.ckpt_dir)
    ckpt = load_checkpoint(path)
    # per-launch flags are not inherited from the interrupted launch
    new_cfg, legacy, changed = override_saved(
        ckpt.get("config") or {}, flags, drop=("stop_at", "resume", "config", "debug", "threads")
    )
    say(f"[bevtrain] resuming {ckpt.get('run_name')} from {path} (step {ckpt['step']})")
    for k, v in legacy.items():
        say(f"[bevtrain]   {k}: the checkpoint predates this flag; using {v!r}, what it was trained with")
    for k, (old, new) in changed.items():
        why = "" if k in flags else " (this machine's CPUs)" if k == "nworkers" else ""
        say(f"[bevtrain]   overriding {k}: {old!r} -> {new!r}{why}")
    return new_cfg, (ckpt, path)


def _init_config(cfg: Config, flags: Mapping[str, Any], say):
    """Read --init_dir's checkpoint; a Simple-BEV one switches on its compat mode (flags given
    explicitly win) and must fit the model flags."""
    path = resolve_init(cfg.init_dir, cfg.ckpt_dir)
    init = load_checkpoint(path, pick="--init_dir=<file.pth>")
    if is_simplebev(init):
        _, explicit = resolve_config(flags)
        mode = simplebev_mode(explicit)
        if mode:
            cfg = cfg.replace(**mode)
            say(
                f"[bevtrain] {path} is a Simple-BEV checkpoint: "
                + ", ".join(f"{k}={v}" for k, v in mode.items())
                + " (its forward pass and inputs)"
            )
        if cfg.compat != "simplebev":
            raise ConfigError(
                f"--init_dir={cfg.init_dir} is a Simple-BEV checkpoint: its weights need --compat=simplebev "
                f"(Simple-BEV's forward pass), not --compat={cfg.compat}"
            )
        check_simplebev_settings(init, cfg, path)
    return cfg, (init, path)


def _ensure_encoder_weights(cfg: Config, is_main: bool) -> None:
    """Have the encoder's ImageNet file in the torch hub cache (downloading it if needed) or stop with
    the error naming the URL and cache path. Rank 0 first; its failure stops every rank."""
    error = None
    if is_main:
        try:
            ensure_backbone_weights(cfg.encoder_type, cfg.encoder_weights)
        except (OSError, ValueError) as exc:
            error = exc
    message = broadcast_object(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not get the encoder weights: {message}")
    if not is_main:  # another machine may have its own cache: get the file there too
        ensure_backbone_weights(cfg.encoder_type, cfg.encoder_weights, progress=False)


def build_state(cfg: Config, info: DistInfo, say, imagenet: bool):
    """The model (ImageNet encoder weights only when ``imagenet``), optimiser, schedule and scaler as a
    fresh TrainState, and the autocast context factory."""
    model = build.build_model(cfg if imagenet else cfg.replace(encoder_weights="none")).to(info.device)
    if info.distributed:
        seed_everything(cfg.seed + info.rank)  # same init everywhere (DDP broadcasts), own augment RNG
    if info.distributed and cfg.sync_bn:
        if info.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            say("[bevtrain] sync_bn needs CUDA (torch's SyncBatchNorm); ignored on CPU")
    optimizer = build.build_optimizer(cfg, model)
    autocast, scaler, _ = build.build_precision(cfg.amp, info.device)
    return TrainState(model, optimizer, build.build_scheduler(cfg, optimizer), scaler), autocast


def restore(state: TrainState, cfg: Config, info: DistInfo, say, resume, init) -> None:
    """The one restore path: a resumed run takes everything back; --init_dir the weights, and with
    --load_optimizer / --load_step the optimiser state / step."""
    if resume is not None:
        ckpt, path = resume
        state.load_state_dict(ckpt, path)
        rebuild_schedule(state, cfg, ckpt, say)
        same_layout = (
            ckpt.get("world_size") == info.world_size
            and ckpt.get("config", {}).get("batch_size") == cfg.batch_size
        )
        if not same_layout:
            say("[bevtrain] world size or batch size changed since the checkpoint: "
                "data restarts at the next epoch")
            state.restart_data_at_next_epoch()
    elif init is not None:
        ckpt, path = init
        skipped = state.load_state_dict(
            ckpt,
            path,
            weights=convert_weights(state.model, ckpt, path),
            ignore_load=cfg.ignore_load,
            optimizer=cfg.load_optimizer,
            step=cfg.load_step,
            progress=False,
        )
        say(
            f"[bevtrain] initialised from {path}"
            + (f" (skipped {len(skipped)} ignored keys)" if skipped else "")
        )


# Flags the optimiser and schedule are built from: the checkpoint holds their state as built from the
# saved values, so a resume that changes one rebuilds them (rebuild_schedule).
SCHEDULE_FLAGS = ("max_iters", "lr", "use_scheduler", "pct_start", "weight_decay")


def rebuild_schedule(state: TrainState, cfg: Config, ckpt: Mapping[str, Any], say) -> None:
    """A resumed run whose schedule flags changed continues as a run launched with the new values
    would at this step: the one-cycle schedule is built afresh from them and moved to the position the
    checkpoint's schedule had reached (its steps taken: non-finite steps skip it), the optimiser gets
    the new learning rate and weight decay. The steps before followed the old values."""
    saved = ckpt.get("config") or {}
    changed = {k: (saved[k], cfg[k]) for k in SCHEDULE_FLAGS if k in saved and saved[k] != cfg[k]}
    if not changed:
        return
    old = ckpt.get("scheduler")
    position = int(old["last_epoch"]) if old else state.step
    for group in state.optimizer.param_groups:
        group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        for key in ("initial_lr", "max_lr", "min_lr"):  # the old schedule's, rebuilt below
            group.pop(key, None)
    state.scheduler = build.build_scheduler(cfg, state.optimizer)
    if state.scheduler is not None:
        with warnings.catch_warnings():  # stepping a schedule without optimiser steps is what we mean
            warnings.simplefilter("ignore")
            for _ in range(min(position, state.scheduler.total_steps - 1)):
                state.scheduler.step()
    lr = state.optimizer.param_groups[0]["lr"]
    what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    shape = (
        f"one-cycle over max_iters + 100 = {state.scheduler.total_steps} steps, at position {position}"
        if state.scheduler is not None else "constant learning rate"
    )
    say(
        f"[bevtrain]   schedule rebuilt for {what}: {shape}, lr now {lr:.2e}: from here on as a run "
        f"launched with these values (the {state.step} steps before followed the old ones)"
    )


def wrap_model(model: torch.nn.Module, cfg: Config, info: DistInfo) -> torch.nn.Module:
    if info.distributed:
        ddp_ids = [info.device.index] if info.device.type == "cuda" else None
        model = DDP(model, device_ids=ddp_ids, find_unused_parameters=cfg.find_unused_parameters)
    if cfg.compile:  # after DDP, so that DDP's bucket hooks are compiled around (torch's advice)
        model = build.compile_model(model, cfg.compile_backend)
    return model


def open_run(run: Run) -> None:
    """Loader positions, then RNG (the resumed run continues the same random streams); run folders,
    writers and the duties."""
    cfg, info, state = run.cfg, run.info, run.state
    state.open_cursors(*run.loaders)
    if run.resume_rng is not None:
        if len(run.resume_rng) == info.world_size:
            restore_rng(run.resume_rng[info.rank])
        else:
            seed_everything(cfg.seed + info.rank + 1000003 * state.step)
            run.say("[bevtrain] RNG states for this world size not in the checkpoint: reseeded")
    run.resume_rng = None
    version = code_version()
    manager = None
    if info.is_main:
        manager = _open_folders(run, version)
    run.test_signal = TestSignal()
    run.logger = MetricLogger(cfg, info.device, info.world_size, run.writers, run.log_file, run.say)
    run.validator = Validator(cfg, state, run.model, run.autocast, info.device, info.world_size, run)
    run.pictures = Pictures(cfg.viz_freq, run.vox_util, run.writers, cfg.model.outputs, cfg.viz_class)
    meta = {"config": cfg.to_dict(), "run_name": run.name, "version": version, "world_size": info.world_size}
    run.checkpointer = Checkpointer(cfg, state, manager, meta, run, saved_path=run.resumed_from)
    run.guard = NonFiniteGuard(cfg.max_nonfinite, state, run.say)


def _open_folders(run: Run, version: str) -> CheckpointManager:
    """Rank 0: config/version/command files, TensorBoard writers and train_log.jsonl, trimmed of what a
    killed launch logged after its last checkpoint (a pending validation is redone)."""
    from torch.utils.tensorboard import SummaryWriter

    cfg, step, val_pending = run.cfg, run.state.step, run.state.val_pending
    write_run_info([run.log_run, run.ckpt_run], cfg, version, step)
    purge = step + 1 if step > 0 else None
    writer_t = SummaryWriter(str(run.log_run / "t"), purge_step=purge)
    writer_v = None
    if run.state.val_cursor:
        writer_v = SummaryWriter(str(run.log_run / "v"), purge_step=step if val_pending else purge)
    run.writers = (writer_t, writer_v)
    manager = CheckpointManager(run.ckpt_run, cfg.keep_latest)
    if step > 0:
        trim_log(run.log_run / "train_log.jsonl", step, val_pending)
    run.log_file = open(run.log_run / "train_log.jsonl", "a")
    workers = f"{cfg.nworkers} loader worker{'s' if cfg.nworkers != 1 else ''}" + (
        f" (the CPUs here; Simple-BEV's default is {SIMPLE_BEV_NWORKERS})"
        if cfg.nworkers < SIMPLE_BEV_NWORKERS and "nworkers" not in run.explicit else ""
    )
    run.say(
        f"[bevtrain] run {run.name}: {run.info.world_size} process(es) on {run.info.device}, "
        f"batch {cfg.batch_size} ({per_rank_batch(cfg.batch_size, run.info.world_size)}/rank) x "
        f"grad_acc {cfg.grad_acc}, precision {build.precision_note(cfg.amp, run.info.device)}; "
        f"{cfg.target_raster} target raster (iou below: Simple-BEV protocol under it); {workers}, "
        f"{run.threads}; logs {run.log_run}, checkpoints {run.ckpt_run}"
    )
    return manager


# -- command line ----------------------------------------------------------------------------------------
def cli(*args, **flags) -> None:
    """``train_nuscenes.py``: fire parses the flags; every flag is checked before any work, and errors a
    user can fix print as one ``error:`` line (bevtrain.cli: exit 2 for flags and checkpoints, 65 for
    data, 75 stopped by a signal)."""
    from bevtrain.checkpoint import CheckpointError
    from bevtrain.config import flags_help
    from bevtrain.model.encoders import WeightsUnavailableError

    if flags.pop("help", False) or flags.pop("h", False):  # fire hands --help on as a flag
        print(CLI_USAGE + "\n" + flags_help())
        return
    debug = str(flags.get("debug", False)).lower() == "true"

    def command():
        refuse_positional(args, flag_for_path="config")
        return main(**flags)

    run_command(command, debug=debug, usage_errors=(CheckpointError, WeightsUnavailableError))


CLI_USAGE = """Train BEV vehicle segmentation on nuScenes (Simple-BEV flags).

    python train_nuscenes.py --config=quickstart                # CPU, the synthetic set, minutes
    python train_nuscenes.py --config=rgb --data_dir=../nuscenes  # Simple-BEV's RGB recipe
    torchrun --nproc_per_node=4 train_nuscenes.py --config=rgb --data_dir=../nuscenes
    python train_nuscenes.py --resume=True                      # continue the newest run

Presets (--config=NAME): quickstart, rgb, radar, lidar (configs/ of bevtrain). Only the quickstart trains
on the bundled synthetic set when there is no data (--synthetic=True); anything else needs --data_dir.
Exit codes: 0 done, 2 a flag or checkpoint to fix, 65 a data file to fix, 75 stopped early (resumable).
"""
