"""Iteration-based training: one loop you can read top to bottom (nanoGPT style).

``main(**flags)`` resolves the config (defaults < YAML < flags), joins the process group when
launched by torchrun, builds data/model/optimiser, optionally resumes, then runs ``max_iters``
optimiser steps of ``grad_acc`` micro-batches each. Rank 0 writes TensorBoard events to
``<log_dir>/<run>/t`` and ``/v`` and checkpoints to ``<ckpt_dir>/<run>/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import bevtrain
from bevtrain import build
from bevtrain.build import amp_dtype, forward, to_device
from bevtrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng,
    is_simplebev,
    load_checkpoint,
    load_weights,
    remove_stale_temp_files,
    resolve_init,
    resolve_resume,
    restore_rng,
)
from bevtrain.config import DEFAULTS, Config, ConfigError, dump_yaml, fill_legacy, resolve_config, run_name
from bevtrain.convert_simplebev import check_simplebev_settings, convert_weights, simplebev_mode
from bevtrain.data.dataset import BadSampleLog, worker_signals_held
from bevtrain.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    per_rank_batch,
)
from bevtrain.losses import compute_losses
from bevtrain.metrics import BevIoUEvaluator
from bevtrain.model.encoders import ensure_backbone_weights


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good state was written."""


class StoppedBySignal(SystemExit):
    """SIGINT (Ctrl-C) or SIGTERM (pre-emption) stopped the run after it saved the last completed
    step (nothing is saved when no step completed). Its exit code, ``--signal_exit_code`` (default
    75, EX_TEMPFAIL), means "stopped early, resumable"; ``summary`` is what main() returns otherwise."""

    def __init__(self, summary: Dict[str, Any]):
        super().__init__(summary["exit_code"])
        self.summary = summary


# -- small helpers ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def code_version() -> str:
    """``bevtrain <version>`` plus ``git describe`` when the code lives in a git checkout."""
    version = f"bevtrain {bevtrain.__version__}"
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            desc = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"], cwd=repo, capture_output=True,
                text=True, timeout=10,
            ).stdout.strip()
            if desc:
                version += f", git {desc}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


LOSS_OUTPUTS = ("seg", "center", "offset")


def unused_outputs_term(out: Mapping[str, Any]) -> torch.Tensor:
    """0 x the outputs no loss reads (Simple-BEV's 'feat' head): DDP expects every parameter to get
    a gradient each step, and this keeps those heads in the graph without changing the loss."""
    extra = [v.float().sum() for k, v in out.items()
             if k not in LOSS_OUTPUTS and torch.is_tensor(v) and v.requires_grad]
    return 0.0 * torch.stack(extra).sum() if extra else torch.zeros((), device=out["seg"].device)


def log_bev_images(writer, tag: str, batch: Mapping[str, Any], out: Mapping[str, Any], step: int,
                   vox_util) -> None:
    """The composite of bevtrain.viz (cameras, GT, prediction) for the batch's first sample."""
    from bevtrain.viz import render_composite

    image = render_composite(batch, out, 0, vox_util, cell_width=200)
    writer.add_image(f"{tag}/composite", image, step, dataformats="HWC")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (pre-emption; both sent to the whole process group) ask the run to
    stop. The handler only records the first signal and never raises, so nothing is cut midway:
    not a checkpoint being written (a second signal then changes nothing), not an optimiser update.
    The loop acts on it at safe points. Loader workers ignore both (data.dataset._worker_init)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns it
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class _StopNow(Exception):
    """A single-process run reached a safe point after a stop signal."""


@dataclass
class _SafePoint:
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


class _TestSignal:
    """``BEVTRAIN_TEST_SIGNAL=point:step:index:SIGNAME`` sends SIGNAME once, at an exact point of the
    loop, to this process's group (this process alone unless it leads its group), so tests can
    interrupt where they mean to. Points: ``micro`` (before micro-batch ``index`` of step ``step``,
    steps counted from 1 as logged), ``update`` (before the optimiser update of ``step``), ``val``
    (before val batch ``index`` of the validation at ``step``), ``save`` (as the checkpoint of
    ``step`` starts being written)."""

    def __init__(self, spec: str):
        self.when = self.sig = None
        if spec:
            try:
                point, step, index, name = spec.split(":")
                self.when, self.sig = (point, int(step), int(index)), signal.Signals[name]
            except (ValueError, KeyError):
                raise ValueError(f"BEVTRAIN_TEST_SIGNAL={spec!r}: expected point:step:index:SIGNAME, "
                                 f"e.g. micro:3:1:SIGTERM") from None

    def __call__(self, point: str, step: int, index: int = 0) -> None:
        if self.when == (point, step, index):
            self.when = None
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), self.sig)
            else:
                os.kill(os.getpid(), self.sig)


def _trim_log(path: Path, step: int, val_pending: bool) -> None:
    """Drop the records a launch killed after its last checkpoint wrote past it (what TensorBoard's
    purge_step does for events), so a resumed run's log reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        s = rec.get("step", 0)
        if s < step or (s == step and not (val_pending and rec.get("split") == "val")):
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def next_steps(cfg: Mapping[str, Any], checkpoint: Path, log_run: Path) -> List[str]:
    """What to do with a finished run: its checkpoint, the eval command, the TensorBoard command.

    The eval command names data_dir / dset when they are not the defaults, so that pasting it
    (from the same folder) evaluates on the data the run was trained on, whatever eval's defaults.
    """
    eval_cmd = ["python", "eval_nuscenes.py", f"--init_dir={checkpoint.parent}"]
    if str(cfg["data_dir"]).rstrip("/") != DEFAULTS["data_dir"].rstrip("/"):
        eval_cmd.append(f"--data_dir={cfg['data_dir']}")
    if cfg["dset"] != DEFAULTS["dset"]:
        eval_cmd.append(f"--dset={cfg['dset']}")
    return [
        f"[bevtrain] checkpoint: {checkpoint}",
        "[bevtrain] evaluate it on the whole val split (IoU, PNG/GIF pictures, metrics.json):",
        f"    {shlex.join(eval_cmd)}",
        "[bevtrain] watch the curves and BEV pictures in TensorBoard:",
        f"    {shlex.join(['tensorboard', f'--logdir={log_run}'])}",
    ]


# -- run folders -----------------------------------------------------------------------------------
def unique_run_name(cfg: Mapping[str, Any]) -> str:
    base = run_name(cfg, time.strftime("%H:%M:%S"))
    name, n = base, 1
    while (Path(cfg["log_dir"]) / name).exists() or (Path(cfg["ckpt_dir"]) / name).exists():
        n += 1
        name = f"{base}_{n}"
    return name


def write_run_info(folders: List[Path], cfg: Config, version: str, step: int) -> None:
    command = shlex.join([sys.executable, *sys.argv])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(dump_yaml(cfg))
        (folder / "version.txt").write_text(version + "\n")
        with open(folder / "command.txt", "a") as f:  # one line per launch (resumes append)
            f.write(f"[step {step}] {command}\n")


# -- the run -----------------------------------------------------------------------------------------
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


def _resume_config(cfg: Config, flags: Mapping[str, Any], is_main: bool):
    """The checkpoint's config, overridden by flags given now; returns (cfg, ckpt, path)."""
    path = resolve_resume(cfg.resume, cfg.ckpt_dir)
    ckpt = load_checkpoint(path)
    # per-launch flags are not inherited from the interrupted launch
    base = {k: v for k, v in (ckpt.get("config") or {}).items() if k not in ("stop_at", "resume", "config")}
    base, legacy = fill_legacy(base)  # a run saved before a flag existed keeps what it trained with
    new_cfg, _ = resolve_config(flags, base=base)
    changed = {k: (base[k], new_cfg[k]) for k in new_cfg if k in base and base[k] != new_cfg[k]}
    if is_main:
        print(f"[bevtrain] resuming {ckpt.get('run_name')} from {path} (step {ckpt['step']})", flush=True)
        for k, v in legacy.items():
            if k not in flags:
                print(f"[bevtrain]   {k}: the checkpoint predates this flag; using {v!r}, "
                      f"what it was trained with", flush=True)
        for k, (old, new) in changed.items():
            print(f"[bevtrain]   overriding {k}: {old!r} -> {new!r}", flush=True)
    return new_cfg, ckpt, path


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


def clip_gradients(parameters, grad_clip: float, grad_acc: int) -> torch.Tensor:
    """Clip as Simple-BEV did, for averaged micro-batches. Simple-BEV summed the gradients of its
    grad_acc micro-batches (loss not divided) and clipped that sum at grad_clip; we average, so the
    same clipping is ``clip(mean, grad_clip / grad_acc)`` = ``clip(sum, grad_clip) / grad_acc``.
    Returns the norm of the averaged gradient before clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, grad_clip / grad_acc)


def _init_config(cfg: Config, flags: Mapping[str, Any], say):
    """Read --init_dir's checkpoint; a Simple-BEV one switches on its compat mode (flags given
    explicitly win) and must fit the model flags. Returns (cfg, checkpoint, path)."""
    path = resolve_init(cfg.init_dir)
    init = load_checkpoint(path)
    if is_simplebev(init):
        _, explicit = resolve_config(flags)
        mode = simplebev_mode(explicit)
        if mode:
            cfg = cfg.replace(**mode)
            say(f"[bevtrain] {path} is a Simple-BEV checkpoint: "
                + ", ".join(f"{k}={v}" for k, v in mode.items()) + " (its forward pass and inputs)")
        if cfg.compat != "simplebev":
            raise ConfigError(
                f"--init_dir={cfg.init_dir} is a Simple-BEV checkpoint: its weights need --compat=simplebev "
                f"(Simple-BEV's forward pass), not --compat={cfg.compat}"
            )
        check_simplebev_settings(init, cfg, path)
    return cfg, init, path


def train(cfg: Config, flags: Mapping[str, Any], info: DistInfo) -> Dict[str, Any]:
    is_main, device = info.is_main, info.device
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)

    # ---- config, resume, data location -----------------------------------------------------------
    if is_main:  # before resume looks for checkpoints; other ranks may not be up yet, so rank 0 alone
        for stale in remove_stale_temp_files(cfg.ckpt_dir):
            say(f"[bevtrain] removed {stale}: an unfinished checkpoint whose writer was killed")
    ckpt = init = None
    if cfg.resume:
        cfg, ckpt, ckpt_file = _resume_config(cfg, flags, is_main)
    elif cfg.init_dir:
        cfg, init, init_file = _init_config(cfg, flags, say)
    # A Simple-BEV checkpoint replaces every weight (strictly), so ImageNet weights would go unused.
    from_simplebev = init is not None and is_simplebev(init) and not cfg.ignore_load
    if ckpt is None and not from_simplebev:
        _ensure_encoder_weights(cfg, is_main)  # before any data: a missing file stops the run now
    if is_main:
        cfg = build.resolve_data_dir(cfg)  # may generate the synthetic set: rank 0 first
    barrier()
    if not is_main:
        cfg = build.resolve_data_dir(cfg, announce=False)
    B_rank = per_rank_batch(cfg.batch_size, info.world_size)
    if "device_ids" in flags and device.type == "cuda":
        if info.distributed:
            say("[bevtrain] device_ids is ignored under torchrun: rank r uses cuda:LOCAL_RANK")
        elif len(cfg.device_ids) > 1:
            say(f"[bevtrain] one process uses one GPU: cuda:{cfg.device_ids[0]}; for several GPUs launch "
                f"with torchrun --nproc_per_node={len(cfg.device_ids)}")

    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    build.configure_cuda(device, cfg.deterministic)

    if ckpt is not None:
        name = ckpt["run_name"]
    else:
        name = broadcast_object(unique_run_name(cfg) if is_main else None)
    log_run, ckpt_run = Path(cfg.log_dir) / name, Path(cfg.ckpt_dir) / name

    # ---- data ------------------------------------------------------------------------------------
    train_ds = build.build_dataset(cfg, split="train", is_train=True)
    train_loader = build.build_loader(cfg, train_ds, True, B_rank, info.rank, info.world_size)
    val_loader = None
    if cfg.do_val:
        val_ds = build.build_dataset(cfg, split="val", is_train=False)
        val_loader = build.build_loader(cfg, val_ds, False, B_rank, info.rank, info.world_size)
    # bad_samples=skip: samples left out are listed in <log_dir>/<run>/bad_samples.jsonl
    bad_log = BadSampleLog.for_run(log_run, info.rank, train=train_ds, val=val_loader and val_loader.dataset)

    # ---- model, optimiser, schedule, precision ---------------------------------------------------
    vox_util = build.build_vox_util(cfg)
    # a resumed run's weights come from its checkpoint: no ImageNet file needed
    no_imagenet = ckpt is not None or from_simplebev
    model = build.build_model(cfg.replace(encoder_weights="none") if no_imagenet else cfg).to(device)
    if info.distributed:
        seed_everything(cfg.seed + info.rank)  # same init everywhere (DDP broadcasts), own augment RNG
    if info.distributed and cfg.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            say("[bevtrain] sync_bn needs CUDA (torch's SyncBatchNorm); ignored on CPU")
    raw_model = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = None
    if cfg.use_scheduler:
        # Simple-BEV's schedule: linear one-cycle, 100 spare steps so the last step stays in range.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.max_iters + 100, pct_start=cfg.pct_start,
            cycle_momentum=False, anneal_strategy="linear",
        )
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    step, data_pos, nonfinite_total, val_pending = 0, {}, 0, False
    if ckpt is not None:
        load_weights(raw_model, ckpt["model"], source=ckpt_file)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, nonfinite_total = int(ckpt["step"]), int(ckpt.get("nonfinite_total", 0))
        val_pending = bool(ckpt.get("val_pending", False))
        same_layout = (ckpt.get("world_size") == info.world_size
                       and ckpt.get("config", {}).get("batch_size") == cfg.batch_size)
        data_pos = ckpt.get("data") or {}
        if not same_layout:
            say("[bevtrain] world size or batch size changed since the checkpoint: "
                "data restarts at the next epoch")
            data_pos = {k: {"epoch": v["epoch"] + 1, "consumed": 0} for k, v in data_pos.items()}
    elif init is not None:
        weights = convert_weights(raw_model, init, init_file)
        skipped = load_weights(raw_model, weights, ignore_load=cfg.ignore_load, source=init_file)
        say(f"[bevtrain] initialised from {init_file}"
            + (f" (skipped {len(skipped)} ignored keys)" if skipped else ""))
        if cfg.load_optimizer:
            if init.get("optimizer") is None:
                raise CheckpointError(
                    f"--load_optimizer=True: {init_file} holds no bevtrain optimiser state (a Simple-BEV or "
                    "converted checkpoint: Simple-BEV's optimiser state does not map onto ours); drop it"
                )
            optimizer.load_state_dict(init["optimizer"])
            if scheduler is not None and init.get("scheduler") is not None:
                scheduler.load_state_dict(init["scheduler"])
            if scaler.is_enabled() and init.get("scaler"):
                scaler.load_state_dict(init["scaler"])
        if cfg.load_step:
            step = int(init["step"])
            if scheduler is not None and not (cfg.load_optimizer and init.get("scheduler") is not None):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(min(step, scheduler.total_steps - 1)):
                        scheduler.step()
        del init

    if info.distributed:
        ddp_ids = [device.index] if device.type == "cuda" else None
        model = DDP(model, device_ids=ddp_ids, find_unused_parameters=cfg.find_unused_parameters)
    if cfg.compile:  # after DDP, so that DDP's bucket hooks are compiled around (torch's advice)
        model = build.compile_model(model, cfg.compile_backend)

    # ---- loop state; what an interruption saves is kept current from here on ---------------------
    status = "finished"
    # a resumed run's checkpoint already holds this step; a new run has nothing worth saving yet
    last_saved, saved_path = step, (ckpt_file if ckpt is not None else None)
    point: _SafePoint | None = None  # the state of the last safe point
    updating = False  # in an optimiser update: no exact state until the step ends
    test_signal = _TestSignal(os.environ.get("BEVTRAIN_TEST_SIGNAL", ""))
    nonfinite_run, last_val = 0, None
    history: List[Dict[str, Any]] = []
    samples_per_step = cfg.batch_size * cfg.grad_acc
    ema_step_time = None
    start_step, t_start = step, time.perf_counter()
    writer_t = writer_v = log_file = manager = None
    stop = _StopSignals()
    stop.install()  # before loader workers start: from here on a signal is acted on at a safe point
    try:
        # ---- data position, then RNG: the resumed run continues the same random streams ----------
        train_cursor = LoaderCursor(train_loader, **data_pos.get("train", {}))
        val_cursor = LoaderCursor(val_loader, **data_pos.get("val", {})) if val_loader is not None else None
        val_pending = val_pending and val_cursor is not None
        if ckpt is not None:
            rng = ckpt.get("rng") or []
            if len(rng) == info.world_size:
                restore_rng(rng[info.rank])
            else:
                seed_everything(cfg.seed + info.rank + 1000003 * step)
                say("[bevtrain] RNG states for this world size not in the checkpoint: reseeded")
            del ckpt

        # ---- run folders, writers --------------------------------------------------------------------
        version = code_version()
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            write_run_info([log_run, ckpt_run], cfg, version, step)
            # drop what a killed launch logged after this step; a pending val is redone
            purge = step + 1 if step > 0 else None
            writer_t = SummaryWriter(str(log_run / "t"), purge_step=purge)
            if val_cursor:
                writer_v = SummaryWriter(str(log_run / "v"), purge_step=step if val_pending else purge)
            manager = CheckpointManager(ckpt_run, cfg.keep_latest)
            if step > 0:
                _trim_log(log_run / "train_log.jsonl", step, val_pending)
            log_file = open(log_run / "train_log.jsonl", "a")
            say(f"[bevtrain] run {name}: {info.world_size} process(es) on {device}, "
                f"batch {cfg.batch_size} ({B_rank}/rank) x grad_acc {cfg.grad_acc}, "
                f"precision {dtype or 'fp32'}; {cfg.target_raster} target raster (iou below: Simple-BEV "
                f"protocol under it); logs {log_run}, checkpoints {ckpt_run}")

        def log_record(record: Dict[str, Any]) -> None:
            if is_main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()

        def make_state(rng_states: List[Any], train_pos, val_pos, val_pending: bool) -> Dict[str, Any]:
            return {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step,
                "rng": rng_states,
                "data": {"train": train_pos, **({"val": val_pos} if val_pos is not None else {})},
                "val_pending": val_pending,
                "config": cfg.to_dict(),
                "run_name": name,
                "version": version,
                "world_size": info.world_size,
                "nonfinite_total": nonfinite_total,
            }

        def save_checkpoint() -> Path | None:
            """At a step end, of the live state. Collective (all ranks at the same step); rank 0 writes."""
            rng_states = all_gather_object(capture_rng())
            path = None
            if is_main:
                test_signal("save", step)
                state = make_state(rng_states, train_cursor.state(),
                                   val_cursor.state() if val_cursor else None, False)
                path = manager.save(state, step)
            return path

        def save_safe_point(point: _SafePoint) -> Path:
            """Rank 0 alone (other ranks may be gone): the state of the last safe point."""
            if point.buffers is not None:  # undo the interrupted step's BatchNorm updates
                with torch.no_grad():
                    for live, saved in zip(raw_model.buffers(), point.buffers):
                        live.copy_(saved)
            test_signal("save", step)
            state = make_state([point.rng], point.train_pos, point.val_pos, point.val_pending)
            return manager.save(state, step)

        def safe_point(val_pending: bool = False, buffers=None) -> _SafePoint:
            return _SafePoint(capture_rng(), train_cursor.state(), val_cursor.state() if val_cursor else None,
                              val_pending, buffers)

        def check_stop() -> None:
            """A safe point: a single process stops here after a signal (DDP ranks agree at step ends,
            as they must all run the same collectives)."""
            if stop.requested and not info.distributed:
                raise _StopNow

        def evaluate() -> Dict[str, float]:
            model.eval()
            sums: Dict[str, torch.Tensor] = {}
            iou = BevIoUEvaluator()
            with torch.no_grad():
                for i in range(cfg.val_batches):
                    test_signal("val", step, i)
                    check_stop()
                    batch = to_device(val_cursor.next(), device)
                    bad_log.add_batch("val", batch, step)
                    with autocast():
                        out = forward(raw_model, batch)
                    loss, parts = compute_losses(out, batch, raw_model)
                    for k, v in {"loss": loss, **parts}.items():
                        sums[k] = sums.get(k, 0) + v.detach().float()
                    iou.update(out["seg"], batch["seg_bev"], batch["valid_bev"])
            model.train()
            keys = sorted(sums)
            packed = all_reduce_sum(torch.stack([sums[k] for k in keys]))
            n = cfg.val_batches * info.world_size
            result = {k: (packed[i] / n).item() for i, k in enumerate(keys)}
            result["iou"] = iou.compute()["simplebev"]["iou"]  # collective: counts summed over ranks
            if is_main and cfg.viz_freq and step % cfg.viz_freq == 0:
                log_bev_images(writer_v, "bev", batch, out, step, vox_util)
            return result

        # ---- the loop --------------------------------------------------------------------------------
        window = _Window(device)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        while step < cfg.max_iters or val_pending:
            stop_now = False
            # a validation interrupted midway is redone first, from the cursor it had started at
            val_due, val_pending = val_pending, False
            if not val_due:
                point = safe_point(buffers=[b.detach().clone() for b in raw_model.buffers()])
                t0 = time.perf_counter()
                data_time, finite = 0.0, True
                step_loss = torch.zeros((), device=device)
                step_parts: Dict[str, torch.Tensor] = {}
                for micro in range(cfg.grad_acc):
                    test_signal("micro", step + 1, micro)
                    check_stop()
                    td = time.perf_counter()
                    batch = to_device(train_cursor.next(), device)
                    bad_log.add_batch("train", batch, step + 1)
                    data_time += time.perf_counter() - td
                    last_micro = micro == cfg.grad_acc - 1
                    sync = (model.no_sync() if info.distributed and not last_micro
                            else contextlib.nullcontext())
                    with sync:
                        with autocast():
                            out = forward(model, batch)
                        loss, parts = compute_losses(out, batch, raw_model)
                        if info.distributed and not cfg.find_unused_parameters:
                            loss = loss + unused_outputs_term(out)
                        scaler.scale(loss / cfg.grad_acc).backward()
                    finite = finite and bool(torch.isfinite(loss).item())
                    step_loss += loss.detach().float() / cfg.grad_acc
                    for k, v in parts.items():
                        step_parts[k] = step_parts.get(k, 0) + v.detach().float() / cfg.grad_acc
                    window.iou.update(out["seg"], batch["seg_bev"], batch["valid_bev"])

                test_signal("update", step + 1)
                updating = True
                # every rank must take the same decision: agree on non-finite losses and stop requests
                flags_t = torch.tensor([0.0 if finite else 1.0, float(stop.requested)], device=device)
                flags_t = all_reduce_sum(flags_t)
                skip, stop_now = flags_t[0].item() > 0, flags_t[1].item() > 0
                scaler.unscale_(optimizer)
                if not skip and cfg.grad_clip > 0:
                    grad_norm = clip_gradients(raw_model.parameters(), cfg.grad_clip, cfg.grad_acc)
                    # with fp16 an inf gradient is the scaler's business (it skips and lowers the scale)
                    skip = not scaler.is_enabled() and not bool(torch.isfinite(grad_norm).item())
                if skip:
                    nonfinite_run += 1
                    nonfinite_total += 1
                    if scaler.is_enabled():
                        scaler.update()
                else:
                    nonfinite_run = 0
                    scaler.step(optimizer)
                    scaler.update()
                    if scheduler is not None and scheduler.last_epoch + 1 < scheduler.total_steps:
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                val_due = val_cursor is not None and step % cfg.val_freq == 0
                point, updating = safe_point(val_pending=val_due), False

                step_time = time.perf_counter() - t0
                ema_step_time = step_time if ema_step_time is None else 0.9 * ema_step_time + 0.1 * step_time
                window.add_step(step_loss, step_parts, not skip, data_time, step_time, samples_per_step)
                if skip:
                    say(f"[bevtrain] step {step}: non-finite loss or gradient, step skipped "
                        f"({nonfinite_run} in a row, {nonfinite_total} in total)")

                if step % cfg.log_freq == 0 or step == 1 or step == cfg.max_iters:
                    rec = window.reduce(info.world_size)
                    rec.update(step=step, lr=optimizer.param_groups[0]["lr"], nonfinite_total=nonfinite_total)
                    eta = ema_step_time * (cfg.max_iters - step)
                    if is_main:
                        writer_t.add_scalar("loss", rec["loss"], step)
                        for k, v in rec["parts"].items():
                            writer_t.add_scalar(f"loss/{k}", v, step)
                        for k in ("iou", "lr", "nonfinite_total"):
                            writer_t.add_scalar(k, rec[k], step)
                        writer_t.add_scalar("time/data", rec["data_time"], step)
                        writer_t.add_scalar("time/step", rec["step_time"], step)
                        writer_t.add_scalar("samples_per_s", rec["samples_per_s"], step)
                        parts_s = " ".join(f"{k} {v:.4f}" for k, v in rec["parts"].items())
                        say(f"step {step:>7d}/{cfg.max_iters} | loss {rec['loss']:.4f} ({parts_s}) | "
                            f"iou {100 * rec['iou']:.2f} | lr {rec['lr']:.2e} | data {rec['data_time']:.3f}s "
                            f"step {rec['step_time']:.3f}s | {rec['samples_per_s']:.2f} samples/s | "
                            f"eta {format_duration(eta)}")
                    record = {"split": "train", **{k: v for k, v in rec.items() if k != "parts"},
                              **{f"loss/{k}": v for k, v in rec["parts"].items()}}
                    history.append(record)
                    log_record(record)

                if is_main and cfg.viz_freq and step % cfg.viz_freq == 0:
                    log_bev_images(writer_t, "bev", batch, out, step, vox_util)

            if val_due:
                point = safe_point(val_pending=True)  # after logging: the state validation starts from
                res = evaluate()
                point = safe_point()
                last_val = {"split": "val", "step": step, **res}
                history.append(last_val)
                log_record(last_val)
                if is_main:
                    for k, v in res.items():
                        writer_v.add_scalar(k if k in ("loss", "iou") else f"loss/{k}", v, step)
                    say(f"val  {step:>7d}/{cfg.max_iters} | loss {res['loss']:.4f} | "
                        f"iou {100 * res['iou']:.2f}")

            if cfg.max_nonfinite and nonfinite_run >= cfg.max_nonfinite:
                path = save_checkpoint()
                raise NonFiniteLossError(
                    f"{nonfinite_run} non-finite steps in a row at step {step}; the last good weights "
                    f"are in {path or ckpt_run}. Lower --lr, try --amp=none or --amp=bf16, or check the data."
                )
            if not info.distributed:
                stop_now = stop.requested
            stopping = stop_now or (cfg.stop_at and step >= cfg.stop_at)
            if step % cfg.save_freq == 0 or step == cfg.max_iters or stopping:
                saved_path = save_checkpoint()
                last_saved = step
            if stopping and stop_now and step >= cfg.max_iters:
                break  # the signal came as the last step ended: the run is complete, its checkpoint saved
            if stopping:
                status = "signalled" if stop_now else "stopped"
                how = f"by {stop.name}" if stop_now else "as asked (--stop_at)"
                say(f"[bevtrain] stopped {how} at step {step} with a checkpoint in {ckpt_run}; "
                    f"continue with --resume={ckpt_run}")
                break
    except _StopNow:
        status = "signalled"
        if step > last_saved:
            saved_path = save_safe_point(point)
            last_saved = step
            say(f"[bevtrain] stopped by {stop.name} at step {step}"
                + (" (its validation is redone on resume)" if point.val_pending else "")
                + f": checkpoint saved to {saved_path}; continue with --resume={ckpt_run}")
        elif saved_path is not None:
            say(f"[bevtrain] stopped by {stop.name} at step {step}: its checkpoint {saved_path} stands; "
                f"continue with --resume={ckpt_run}")
        else:
            say(f"[bevtrain] stopped by {stop.name} before the first step completed: nothing to save")
    except BaseException as exc:
        # a crash or KeyboardInterrupt: keep the last completed step (rank 0 alone: others may be gone)
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
        if is_main and manager is not None and not isinstance(exc, NonFiniteLossError):
            try:
                if updating:
                    newest = f"; the newest checkpoint is {saved_path}" if saved_path else ""
                    say(f"[bevtrain] {status} during the optimiser update of step {step + 1}: "
                        f"no exact state to save{newest}")
                elif step > last_saved:
                    saved_path = save_safe_point(point)
                    say(f"[bevtrain] {status} at step {step}: checkpoint saved to {saved_path}; "
                        f"continue with --resume={ckpt_run}")
                elif saved_path is None:
                    say(f"[bevtrain] {status} before the first step completed: nothing to save")
            except Exception as save_exc:  # report, but let the original error surface
                say(f"[bevtrain] could not save a checkpoint after the {status} run: {save_exc}")
        raise
    finally:
        stop.uninstall()
        if writer_t is not None:
            writer_t.close()
        if writer_v is not None:
            writer_v.close()
        if log_file is not None:
            log_file.close()

    elapsed = time.perf_counter() - t_start
    say(f"[bevtrain] {status}: {step - start_step} steps in {format_duration(elapsed)}"
        + (f", last val iou {100 * last_val['iou']:.2f}" if last_val else ""))
    if saved_path is not None:
        for line in next_steps(cfg, Path(saved_path), log_run):
            say(line)
    return {
        "run_name": name, "step": step, "status": status, "log_dir": str(log_run), "ckpt_dir": str(ckpt_run),
        "history": history, "last_val": last_val, "seconds": elapsed,
        "checkpoint": str(saved_path) if saved_path is not None else None,
        "exit_code": cfg.signal_exit_code if status == "signalled" else 0,
    }


class _Window:
    """Sums between two log lines; reduced across ranks when logged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.parts: Dict[str, torch.Tensor] = {}
        self.iou = BevIoUEvaluator()  # whole grid, Simple-BEV protocol (valid_bev mask)
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
            [self.loss.float()] + [self.parts[k].float() for k in keys]
            + [torch.tensor(float(self.finite_steps), device=self.device)]
        )
        packed = all_reduce_sum(packed)
        n = max(packed[-1].item(), 1.0)  # finite steps summed over ranks
        rec = {
            "loss": packed[0].item() / n if self.finite_steps else math.nan,
            "parts": {k: packed[1 + i].item() / n for i, k in enumerate(keys)},
            "iou": self.iou.compute()["simplebev"]["iou"],  # collective
            "data_time": self.data_time / max(self.steps, 1),
            "step_time": self.step_time / max(self.steps, 1),
            "samples_per_s": self.samples / max(self.step_time, 1e-9),
        }
        self.reset()
        return rec

