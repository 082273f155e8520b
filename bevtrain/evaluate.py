"""Evaluate a trained run on the whole val split: IoU under both protocols, and pictures.

    python eval_nuscenes.py --init_dir=checkpoints/<run>            # newest model-*.pth
    python eval_nuscenes.py --init_dir=<run> --load_step=25000       # a run name: looked up in ckpt_dir
    torchrun --nproc_per_node=4 eval_nuscenes.py --init_dir=...       # same numbers, faster

The run's saved config (inside the checkpoint, else ``config.yaml`` beside it) decides model and
data settings, so evaluation matches training; command-line flags override it and are listed.
Every val sample is read exactly once across all ranks (the val sampler shards without padding;
a per-sample tally, summed over ranks, proves it). Outputs, beside the checkpoint unless told:

- ``viz-<step>-<dataset tag>-<split>/`` (e.g. ``viz-000000600-synthetic-1a2b3c-mini-val``; the
  tag is the dataroot's folder name, a short hash of its absolute path and the dset, so two
  dataroots never share a folder): one PNG composite per visualised sample (``--viz_every``,
  ``--max_viz``), one animated GIF per scene (written with Pillow), and this evaluation's
  ``metrics.json``: checkpoint, step, config, data, sample count, both protocols, distance
  bands, samples/s; ``--viz_only`` writes to ``viz_only-<step>-...`` instead (and TensorBoard
  ``eval-...-viz_only``), never over a full evaluation's pictures;
- ``metrics.json`` beside the checkpoint: a copy of the latest evaluation's (``--metrics_path``
  writes only there instead);
- TensorBoard ``<log_dir>/<run>/eval-<dataset tag>-<split>``: the numbers and the composites
  at the checkpoint's step.

GIFs and TensorBoard images are assembled by rank 0 from the PNG files, so with several machines
``viz_dir`` should be on a shared file system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import yaml

from bevtrain import report
from bevtrain.build import (
    build_dataset,
    build_loader,
    build_model,
    build_precision,
    build_vox_util,
    compile_model,
    configure_cuda,
    configure_threads,
    forward,
    precision_note,
    resolve_data_dir,
)
from bevtrain.checkpoint import (
    CheckpointError,
    checkpoint_path,
    is_simplebev,
    list_checkpoints,
    load_checkpoint,
    load_weights,
)
from bevtrain.classes import ClassSpecError
from bevtrain.config import (
    EVAL_DEFAULTS,
    EVAL_SHORTCUTS,
    FLAG_BY_NAME,
    Config,
    check_eval_flags,
    coerce,
    eval_help,
    fill_legacy,
    override_saved,
)
from bevtrain.disk import DiskFullError
from bevtrain.distributed import all_gather_object, barrier, cleanup, init_distributed
from bevtrain.inference import (
    BATCH_KEYS_ON_DEVICE,
    EvalError,
    ExactlyOnce,
    IoU,
    Pictures,
    ProgressBar,
    run_batches,
    slowest_rank,
)
from bevtrain.metrics import MAP_PROTOCOL, MAP_PROTOCOL_LABEL, PROTOCOLS, format_table
from bevtrain.viz import class_index

__all__ = ["cli", "EvalError", "EvalOptions", "evaluate", "find_checkpoint", "run_split", "main"]

# Settings that shape the network's weights: a checkpoint only loads into a model built with these.
MODEL_KEYS = (
    "encoder_type",
    "latent_dim",
    "Z",
    "Y",
    "X",
    "use_radar",
    "use_lidar",
    "use_metaradar",
    "do_rgbcompress",
    "nsweeps",
)
# Settings that change what the network sees or is scored on: overriding them changes the numbers.
DATA_KEYS = ("res_scale", "ncams", "refcam_id", "bounds", "scene_centroid", "classes", "compat")
# Model settings that do not change the weights' shapes: the checkpoint loads, the grid is another.
GRID_KEYS = ("Z", "X")
# Training flags eval_nuscenes.py shows among its own (they override the run's config when given).
SHORTCUT_FLAGS = EVAL_SHORTCUTS


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation draws and writes (eval's own flags: bevtrain.config.EVAL_FLAGS, where their
    help and defaults live)."""

    viz_every: int = EVAL_DEFAULTS["viz_every"]
    max_viz: int = EVAL_DEFAULTS["max_viz"]
    viz_only: bool = EVAL_DEFAULTS["viz_only"]
    viz_dir: str = EVAL_DEFAULTS["viz_dir"]
    viz_width: int = EVAL_DEFAULTS["viz_width"]
    gif_fps: float = EVAL_DEFAULTS["gif_fps"]
    gif_scale: float = EVAL_DEFAULTS["gif_scale"]
    metrics_path: str = EVAL_DEFAULTS["metrics_path"]
    tensorboard: bool = EVAL_DEFAULTS["tensorboard"]
    split: str = EVAL_DEFAULTS["split"]


EVAL_OPTION_NAMES = tuple(f.name for f in fields(EvalOptions))


@dataclass
class TrainedRun:
    """A checkpoint to evaluate: its file, weights and step, and the config it was trained with."""

    file: Path
    weights: Dict[str, Any]  # 'model', 'step', 'format' of the checkpoint (the optimiser state is dropped)
    trained: Dict[str, Any]  # its config, flags it predates filled with what it used
    source: str  # where that config came from
    legacy: Dict[str, Any] = field(default_factory=dict)  # values filled in (not overridden now)

    @property
    def step(self) -> int:
        return int(self.weights.get("step", 0))


# -- finding the checkpoint and its config ----------------------------------------------------------
def find_checkpoint(init_dir: str, load_step: Any = None, ckpt_dir: str | None = None) -> Path:
    """``init_dir`` (a run folder, a run name in ``ckpt_dir``, or a .pth file) + optional step ->
    checkpoint file."""
    if init_dir in (None, "", True, False):
        raise EvalError(
            "--init_dir is required: the run's checkpoint folder (<ckpt_dir>/<run>, holding "
            "model-000001000.pth files), its name, or one model-*.pth file"
        )
    path = Path(str(init_dir))
    if path.is_file():
        if load_step not in (None, False, True):
            raise EvalError(
                f"--load_step={load_step} needs --init_dir to be a run folder, not the file {path}"
            )
        return path
    if not path.exists() and ckpt_dir and (Path(ckpt_dir) / path).is_dir():
        path = Path(ckpt_dir) / path  # a run name, as --resume=<run name> takes it
    if not path.exists():
        root = Path(ckpt_dir) if ckpt_dir else None
        runs = [p for p in root.iterdir() if p.is_dir()] if root is not None and root.is_dir() else []
        newest = [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime)[-5:]]
        raise EvalError(
            f"--init_dir={init_dir} does not exist"
            + (f", nor a run of that name in --ckpt_dir={ckpt_dir}" if root is not None else "")
            + (f" (newest runs there: {', '.join(newest)})" if newest else "")
            + "; expected a run folder such as checkpoints/<run>, a run name or a model-*.pth file"
        )
    ckpts = list_checkpoints(path)
    if not ckpts:
        nested = sorted(str(p.parent) for p in path.glob("*/model-*.pth"))
        hint = f"; run folders inside it: {', '.join(sorted(set(nested))[:5])}" if nested else ""
        contents = sorted(p.name for p in path.iterdir())
        what = f"it holds {contents[:8]}{' ...' if len(contents) > 8 else ''}" if contents else "it is empty"
        raise EvalError(f"--init_dir={init_dir}: no model-#########.pth checkpoint there ({what}){hint}")
    if load_step in (None, False, True, ""):
        return ckpts[-1]
    try:
        step = int(load_step)
    except (TypeError, ValueError):
        raise EvalError(f"--load_step must be a step number, got {load_step!r}") from None
    wanted = checkpoint_path(path, step)
    if not wanted.is_file():
        steps = [int(p.stem.split("-")[1]) for p in ckpts]
        raise EvalError(f"--load_step={step}: {wanted} does not exist; steps in {path}: {steps}")
    return wanted


def saved_config(ckpt: Mapping[str, Any], ckpt_file: Path) -> Tuple[Dict[str, Any], str]:
    """The training config of a checkpoint: inside the checkpoint, else config.yaml beside it;
    for a Simple-BEV checkpoint (no config anywhere) Simple-BEV's defaults in its compat mode."""
    if is_simplebev(ckpt):
        from bevtrain.convert_simplebev import simplebev_base_config

        base = {**simplebev_base_config(), "_simplebev_file": True}  # model flags are settings, not overrides
        return base, f"{ckpt_file}: Simple-BEV file, no config: Simple-BEV's defaults"
    if isinstance(ckpt.get("config"), Mapping):
        return dict(ckpt["config"]), f"{ckpt_file} ['config']"
    beside = ckpt_file.parent / "config.yaml"
    if beside.is_file():
        data = yaml.safe_load(beside.read_text()) or {}
        if isinstance(data, Mapping):
            return dict(data), str(beside)
    raise EvalError(
        f"{ckpt_file} carries no 'config' and there is no config.yaml beside it: the model settings "
        f"used in training are unknown. Save a config.yaml with the run's flags into {ckpt_file.parent}"
    )


def open_run(init_dir: str, load_step: Any = None, ckpt_dir: str | None = None) -> TrainedRun:
    file = find_checkpoint(init_dir, load_step, ckpt_dir)
    ckpt = load_checkpoint(file, map_location="cpu", pick="--init_dir=<file.pth> or --load_step=<step>")
    trained, source = saved_config(ckpt, file)
    # A run saved before a flag existed was trained with the old behaviour (target_raster: exact).
    trained, legacy = fill_legacy(trained)
    # Only the weights and the step are needed: let the optimiser state (~2x the weights) go now.
    weights = {k: ckpt[k] for k in ("model", "step", "format") if k in ckpt}
    return TrainedRun(file, weights, trained, source, legacy)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str]) -> List[str]:
    out = []
    for k in keys:
        va, vb = (list(v) if isinstance(v, tuple) else v for v in (a.get(k), b.get(k)))
        if va != vb:
            out.append(f"{k}: {va!r} (checkpoint) vs {vb!r} (now)")
    return out


def eval_config(trained: Mapping[str, Any], overrides: Mapping[str, Any]) -> Tuple[Config, List[str]]:
    """The training config with command-line overrides; returns it and lines describing the overrides
    that change a value (a flag given with the run's own value is no override)."""
    check_eval_flags(overrides)
    # Where training ran says nothing about where evaluation runs: pick the device afresh.
    base = {
        **trained,
        "device": FLAG_BY_NAME["device"].default,
        "device_ids": FLAG_BY_NAME["device_ids"].default,
    }
    cfg, _, _ = override_saved(base, overrides, drop=("config", "resume", "init_dir", "debug"))
    notes = [_override_note(k, trained, cfg) for k in overrides if k != "debug"]
    return cfg, [note for note in notes if note]


NOT_COMPARABLE = "numbers not comparable to the run's own"


def _override_note(k: str, trained: Mapping[str, Any], cfg: Config) -> str:
    """'' when the value is the run's own."""
    before = trained.get(k, FLAG_BY_NAME[k].default)
    if _frozen_equal(before, cfg[k]):
        return ""
    note = f"{k}: {before!r} -> {cfg[k]!r} (command line)"
    if k == "target_raster":
        return note + f"  [ground truth drawn by another rule than in training: {NOT_COMPARABLE}]"
    if trained.get("_simplebev_file"):
        return note
    if k in GRID_KEYS:
        return note + f"  [another BEV grid than in training: {NOT_COMPARABLE}]"
    if k in MODEL_KEYS:
        return note + f"  [changes the network: the checkpoint may not load; if it does, {NOT_COMPARABLE}]"
    if k in DATA_KEYS:
        return note + f"  [differs from training: {NOT_COMPARABLE}]"
    return note


def _frozen_equal(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)
def check_classes(trained: Mapping[str, Any], cfg: Config, source: Any) -> None:
    """The classes asked for must be those the checkpoint was trained on (names, kinds and sources, in
    channel order): its heads score nothing else. EvalError naming both lists otherwise."""
    try:
        asked = Config(cfg).model.outputs
    except ClassSpecError as e:
        raise EvalError(f"--classes: {e}") from None
    try:
        saved = {k: trained[k] for k in ("classes", "class_groups") if k in trained}
        had = Config({**cfg, **saved}).model.outputs
    except ClassSpecError as e:
        raise EvalError(f"{source}: the checkpoint's classes cannot be read: {e}") from None
    if had != asked:
        same_names = [c.name for c in had] == [c.name for c in asked]
        detail = (" (same names, other definitions: " + "; ".join(
            f"{a.name}: {a.kind} {list(a.sources)} (checkpoint) vs {b.kind} {list(b.sources)} (now)"
            for a, b in zip(had, asked) if a != b) + ")") if same_names else ""
        raise EvalError(
            f"the checkpoint {source} was trained on classes {[c.name for c in had]}, but "
            f"{[c.name for c in asked]} were asked for{detail}: a model scores only the classes it has "
            f"heads for. Drop --classes / --class_groups (the run's own are used), or evaluate a checkpoint "
            f"trained on those classes"
        )
    try:
        class_index(asked, cfg.viz_class)
    except ValueError as e:
        raise EvalError(f"--{e}") from None


def check_val_split(cfg: Config) -> None:
    """data_dir must hold the tables of dset; the val dataset must have samples (checked on build)."""
    root = Path(cfg.data_dir)
    version = f"v1.0-{cfg.dset}"
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*")) if root.is_dir() else []
        hint = f"; it has {found}: pass --dset={found[0][5:]}" if found else ""
        raise EvalError(f"--data_dir={cfg.data_dir} has no {version}/ tables for --dset={cfg.dset}{hint}")


# -- the loop -----------------------------------------------------------------------------------------
def viz_indices(n: int, viz_every: int, max_viz: int) -> List[int]:
    """Dataset positions to visualise: every viz_every-th, at most max_viz (0 = none)."""
    if viz_every <= 0 or max_viz <= 0:
        return []
    return list(range(0, n, int(viz_every)))[: int(max_viz)]


def run_split(
    loader,
    predict,
    n: int,
    vox_util,
    device: torch.device,
    *,
    expected: Sequence[int] | None = None,
    compute_metric: bool = True,
    draw: Sequence[int] = (),
    viz_dir: Path | None = None,
    viz_width: int = 400,
    show_progress: bool = False,
    world_size: int = 1,
    classes=None,
    viz_class: str = "",
) -> Dict[str, Any]:
    """Run ``predict(batch on device) -> seg logits (B, C, Z, X)`` over ``loader``; the metric path.
    ``classes``: the outputs of the C channels (default ``[vehicle]``); ``viz_class`` the pictures'
    error class.

    Every dataset position in ``expected`` (default: all ``n``) must enter the metric exactly once
    across ranks (inference.ExactlyOnce). Samples whose position is in ``draw`` are rendered to PNGs
    in ``viz_dir``. Returns the metric (``BevIoUEvaluator.compute()``, {} without it), sample count,
    seconds (slowest rank), forward seconds and the PNG paths written by this rank.
    """
    tally, iou = ExactlyOnce(n, expected), IoU(vox_util, classes)
    pictures = Pictures(draw, viz_dir, vox_util, viz_width, classes, viz_class)
    progress = ProgressBar(math.ceil(tally.samples / world_size), show_progress)
    evaluators = [tally, *([iou] if compute_metric else []), pictures, progress]
    timing = run_batches(
        lambda batch: {"seg": predict(batch)}, loader, evaluators, device, BATCH_KEYS_ON_DEVICE
    )
    progress.close()
    timing = slowest_rank(timing)
    tally.check()  # every sample exactly once across ranks, or the numbers are not the split's
    result: Dict[str, Any] = {}
    if compute_metric:
        result = iou.compute()
        if result["samples"] != tally.samples:
            raise EvalError(f"metric counted {result['samples']} samples, expected {tally.samples}")
    return {"result": result, "samples": tally.samples, "pngs": pictures.pngs,
            "disk_full": pictures.disk_full, **timing}


def evaluate(init_dir: str = "", load_step: Any = None, **flags: Any) -> Dict[str, Any]:
    """Evaluate the checkpoint in ``init_dir`` on ``split``; returns the metrics dict (also on disk).

    Flags: eval's own (bevtrain.config.EVAL_FLAGS: ``load_step``, what is drawn and written) and any
    training flag, which overrides the run's saved config. Every flag is checked before the checkpoint
    is read.
    """
    # A shortcut left at None means "as in training"; other training flags are taken as given.
    flags = {k: v for k, v in flags.items() if not (k in SHORTCUT_FLAGS and v is None)}
    own, overrides = check_eval_flags({"init_dir": init_dir, "load_step": load_step, **flags})
    for name, value in overrides.items():
        coerce(name, value)  # its type now; its fit with the run's config once that is read
    options = EvalOptions(**{k: own[k] for k in EVAL_OPTION_NAMES})
    ckpt_dir = overrides.get("ckpt_dir", FLAG_BY_NAME["ckpt_dir"].default)
    run = open_run(own["init_dir"], own["load_step"], ckpt_dir)
    run.legacy = {k: v for k, v in run.legacy.items() if k not in overrides}
    cfg, notes = eval_config(run.trained, overrides)
    check_classes(run.trained, cfg, run.file)
    if is_simplebev(run.weights):
        from bevtrain.convert_simplebev import check_simplebev_settings

        try:
            check_simplebev_settings(run.weights, cfg, run.file)
        except CheckpointError as e:
            raise EvalError(f"cannot evaluate {run.file}: {e}") from None
    try:
        info = init_distributed(cfg.device, cfg.device_ids)
    except ValueError as e:
        raise EvalError(str(e)) from None
    try:
        return evaluate_run(cfg, run, notes, options, info)
    finally:
        cleanup()


def _build_model(cfg: Config, run: TrainedRun) -> torch.nn.Module:
    # The weights come from the checkpoint: never look for pretrained encoder weights here.
    from bevtrain.convert_simplebev import convert_weights

    model = build_model(cfg.replace(encoder_weights="none"))
    try:
        load_weights(model, convert_weights(model, run.weights, run.file), ignore_load=None, source=run.file)
    except CheckpointError as e:
        diffs = _differences(run.trained, cfg, MODEL_KEYS)
        why = (
            "the model settings differ from the checkpoint's: "
            + "; ".join(diffs)
            + ". Drop those overrides (the run's config is used by default)"
            if diffs
            else "its saved config matches but the weights do not (was it written by another version "
            "of the model code?)"
        )
        raise EvalError(f"cannot evaluate {run.file}: {why}.\n{e}") from None
    return model


def _split_dataset(cfg: Config, split: str):
    from bevtrain.cli import data_error_types

    try:
        return build_dataset(cfg, split=split, is_train=False)
    except data_error_types():
        raise  # they name the file to fix; bevtrain.cli prints them with their own exit code
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvalError(
            f"--data_dir={cfg.data_dir} --dset={cfg.dset}: cannot read the {split!r} split: {e}"
        ) from e


def _announce(cfg: Config, run: TrainedRun, notes: Sequence[str], say) -> None:
    say(f"[eval] checkpoint {run.file} (step {run.step}); config from {run.source}; compat={cfg.compat}")
    for k, v in run.legacy.items():
        say(
            f"[eval] {run.source} has no '{k}' (saved before the flag existed): using {v!r}, "
            f"what the run was trained with; pass --{k}=... to score it otherwise"
        )
    for note in notes:
        say(f"[eval] override {note}")


def _ready_model(cfg: Config, run: TrainedRun, device: torch.device) -> torch.nn.Module:
    model = _build_model(cfg, run).to(device).eval()
    configure_cuda(device, cfg.deterministic)
    return compile_model(model, cfg.compile_backend) if cfg.compile else model


def evaluate_run(
    cfg: Config, run: TrainedRun, notes: Sequence[str], options: EvalOptions, info
) -> Dict[str, Any]:
    say = print if info.is_main else (lambda *a, **k: None)
    _announce(cfg, run, notes, say)
    device = info.device
    threads = configure_threads(cfg.threads, device)
    cfg = resolve_data_dir(cfg, announce=info.is_main)
    check_val_split(cfg)
    model = _ready_model(cfg, run, device)
    per_rank = max(1, math.ceil(cfg.batch_size / info.world_size))
    ds = _split_dataset(cfg, options.split)
    n = len(ds)
    chosen = viz_indices(n, options.viz_every, options.max_viz)
    if options.viz_only and not chosen:
        raise EvalError("--viz_only with nothing to draw: set --viz_every >= 1 and --max_viz >= 1")
    # In order (a scene's frames together; order does not change the sums), every sample once across ranks.
    loader = build_loader(
        cfg.replace(shuffle=False),
        ds,
        False,
        per_rank,
        info.rank,
        info.world_size,
        indices=chosen if options.viz_only else None,
    )
    autocast, _, dtype = build_precision(cfg.amp, device)  # the same precision as training's
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    classes = cfg.model.outputs
    evaluated = report.evaluated_name(cfg.data_dir, cfg.dset, options.split)
    # --viz_only draws other samples (and no scores): never into a full evaluation's folders.
    prefix = "viz_only" if options.viz_only else "viz"
    out_viz = (
        Path(options.viz_dir) if options.viz_dir else run.file.parent / f"{prefix}-{run.step:09d}-{evaluated}"
    )
    say(
        f"[eval] {options.split} split of {cfg.dset} at {cfg.data_dir}: {n} samples; "
        f"{'visualising ' + str(len(chosen)) + ' (viz_only)' if options.viz_only else 'all of them'}; "
        f"{info.world_size} process(es), batch {per_rank}/process, device {device}, "
        f"{precision_note(cfg.amp, device)}, {threads}; classes {[c.name for c in classes]}"
    )

    def predict(batch):
        with autocast():
            return forward(model, batch)["seg"].float()

    done = run_split(
        loader,
        predict,
        n,
        build_vox_util(cfg),
        device,
        expected=chosen if options.viz_only else None,
        compute_metric=not options.viz_only,
        draw=chosen,
        viz_dir=out_viz,
        viz_width=options.viz_width,
        show_progress=info.is_main,
        world_size=info.world_size,
        classes=classes,
        viz_class=cfg.viz_class,
    )
    pngs = sorted({p for part in all_gather_object(done["pngs"]) for p in part})
    picture_errors = [e for e in all_gather_object(done["disk_full"]) if e]
    barrier()
    summary = _summary(cfg, run, notes, options, info, done, n, precision, per_rank)
    summary["viz_dir"] = str(out_viz) if chosen else None
    if info.is_main:
        # One TensorBoard folder per evaluated dataset and split: their curves share tags and steps.
        tb_dir = Path(cfg.log_dir) / run.file.parent.name / f"eval-{evaluated}"
        if options.viz_only:  # its pictures are other samples: not at a full evaluation's step and tags
            tb_dir = tb_dir.with_name(tb_dir.name + "-viz_only")
        folders = (out_viz, tb_dir)
        _write_outputs(cfg, run, summary, done["result"], options, pngs, folders, say, picture_errors)
    summary["pngs"] = pngs  # every rank's, on every rank
    return summary


def _summary(cfg, run: TrainedRun, notes, options: EvalOptions, info, done, n, precision, per_rank):
    counted, wall, forward_s = done["samples"], done["seconds"], done["forward_seconds"]
    summary = {
        "checkpoint": str(run.file.resolve()),
        "step": run.step,
        "config_source": run.source,
        "checkpoint_format": "simplebev" if is_simplebev(run.weights) else "bevtrain",
        "compat": cfg.compat,
        "overrides": list(notes),
        # False when an override changes what is scored (grid, inputs, ground truth): see overrides
        "comparable_with_training": not any(NOT_COMPARABLE in note for note in notes),
        "data": {"data_dir": str(cfg.data_dir), "dset": cfg.dset, "split": options.split, "split_size": n},
        "samples": counted,
        "viz_only": bool(options.viz_only),
        "world_size": info.world_size,
        "device": str(info.device),
        "precision": precision,
        "batch_size_per_process": per_rank,
        "target_raster": cfg.target_raster,
        "seconds": wall,
        "samples_per_s": counted / wall if wall > 0 else None,
        "model_samples_per_s": counted / forward_s if forward_s > 0 else None,
        "config": Config(cfg).to_dict(),
    }
    if not options.viz_only:
        result = done["result"]
        summary["threshold"] = result["threshold"]
        # The first class's numbers where a one-class evaluation always had them; every class below.
        summary["iou"] = {p: result[p]["iou"] for p in PROTOCOLS}
        summary["protocols"] = report.protocol_entries(result, cfg.target_raster)
        summary["classes"] = result["classes"]
        summary["per_class"] = result["per_class"]
        summary["mean_iou"] = result["mean_iou"]
        summary["protocol_labels"] = report.protocol_labels(result, cfg.target_raster)
        if MAP_PROTOCOL in result:
            summary[MAP_PROTOCOL] = {**result[MAP_PROTOCOL], "label": MAP_PROTOCOL_LABEL}
    return summary


def _write_outputs(cfg, run: TrainedRun, summary, result, options: EvalOptions, pngs, folders, say,
                   disk_full=()):
    """Rank 0: the table, metrics.json, GIFs, TensorBoard, and where each went. ``folders``: the
    picture folder and the TensorBoard folder of this evaluation. ``disk_full``: why pictures stopped.

    The scores are printed first and every file is written atomically, so a full disk costs what could
    not be written and nothing else: the rest is still written, then one DiskFullError names what is
    missing (no traceback, exit 75 from the command line)."""
    disk_full = list(disk_full)
    out_viz, tb_dir = folders
    if not options.viz_only:
        say(format_table(result, raster=cfg.target_raster))
        if not summary["comparable_with_training"]:
            changed = [note.split(":", 1)[0] for note in summary["overrides"] if NOT_COMPARABLE in note]
            say(f"[eval] scored with {', '.join(changed)} other than in training: these numbers are not "
                f"comparable with the run's own")
    say(
        f"[eval] {summary['samples']} samples in {summary['seconds']:.1f} s: {summary['samples_per_s']:.2f} "
        f"samples/s (model alone {summary['model_samples_per_s'] or 0:.2f})"
    )
    metrics_files = []
    if not options.viz_only:
        # This evaluation's own copy beside its pictures (never overwritten by another dataset's),
        # and <run>/metrics.json (or --metrics_path) for the latest evaluation.
        metrics_files = (
            [Path(options.metrics_path)]
            if options.metrics_path
            else [out_viz / "metrics.json", run.file.parent / "metrics.json"]
        )
        try:
            report.write_metrics(summary, metrics_files)
            summary["metrics_path"] = str(metrics_files[0])
        except DiskFullError as e:
            disk_full.insert(0, f"{e} (any earlier metrics.json there is unchanged; the scores are above)")
            metrics_files = []
    gifs = []
    if not disk_full:
        try:
            gifs = report.write_scene_gifs([Path(p) for p in pngs], options.gif_fps, options.gif_scale)
        except DiskFullError as e:
            disk_full.append(str(e))
    summary["gifs"] = [str(g) for g in gifs]
    if options.tensorboard:
        summary["tensorboard"] = report.write_tensorboard(
            tb_dir, run.step, cfg.target_raster, result, summary.get("samples_per_s"), pngs
        )
    if summary["viz_dir"]:
        say(f"[eval] pictures: {len(pngs)} composites (PNG) and {len(gifs)} scene GIFs in {out_viz}")
    if metrics_files:
        also = f" (and {metrics_files[1]}, the latest evaluation's)" if len(metrics_files) > 1 else ""
        say(f"[eval] metrics: {metrics_files[0]}{also}")
    if options.tensorboard:
        say(f"[eval] TensorBoard: tensorboard --logdir={summary['tensorboard']}")
    if disk_full:
        raise DiskFullError("; ".join(disk_full[:1] + [f"also: {e}" for e in disk_full[1:2]])
                            + f". {len(pngs)} pictures were written before the disk filled up")


EVAL_USAGE = """Evaluate a trained run on the whole val split: IoU under both protocols (Simple-BEV's, with
visibility-1 boxes ignored, and LSS's), PNG/GIF pictures, metrics.json and TensorBoard.

    python eval_nuscenes.py --init_dir=checkpoints/<run>             # its newest checkpoint
    python eval_nuscenes.py --init_dir=<run> --load_step=25000        # a run name: looked up in --ckpt_dir
    python eval_nuscenes.py --init_dir=checkpoints/<run> --viz_only=True --viz_every=1 --max_viz=40
    torchrun --nproc_per_node=4 eval_nuscenes.py --init_dir=checkpoints/<run>   # same numbers, faster

The model and data settings are the run's own (saved in the checkpoint, else config.yaml beside it).
Pictures and metrics.json go to viz-<step>-<data>-<split>/ beside the checkpoint (viz_only-... with
--viz_only); the end of the output names every folder written.
Exit codes: 0 done, 2 a flag or checkpoint to fix, 65 a data file to fix.
"""


def main(*args: Any, **flags: Any) -> Dict[str, Any]:
    """``evaluate`` with the errors a user can fix printed as one ``error:`` line; ``--help``."""
    from bevtrain.cli import refuse_positional, run_command

    if flags.pop("help", False) or flags.pop("h", False):
        # evaluate() takes any training flag as an override, so fire would swallow --help.
        print(EVAL_USAGE + "\n" + eval_help())
        return {}
    debug = str(flags.get("debug", False)).lower() == "true"

    def command():
        refuse_positional(args, flag_for_path="init_dir")
        return evaluate(**flags)

    return run_command(command, debug=debug, usage_errors=(EvalError, CheckpointError))


def cli(*args: Any, **flags: Any) -> None:
    """``eval_nuscenes.py``: fire parses the flags. The summary goes to metrics.json: returning it would
    make fire print it all."""
    main(*args, **flags)
