"""Evaluate a trained run on the whole val split: IoU under both protocols, and pictures.

    python eval_nuscenes.py --init_dir=checkpoints/<run>            # newest model-*.pth
    python eval_nuscenes.py --init_dir=checkpoints/<run> --load_step=25000
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
  bands, samples/s;
- ``metrics.json`` beside the checkpoint: a copy of the latest evaluation's (``--metrics_path``
  writes only there instead);
- TensorBoard ``<log_dir>/<run>/eval-<dataset tag>-<split>``: the numbers and the composites
  at the checkpoint's step.

GIFs and TensorBoard images are assembled by rank 0 from the PNG files, so with several machines
``viz_dir`` should be on a shared file system.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import yaml

from bevtrain import viz
from bevtrain.build import (
    amp_dtype,
    build_dataset,
    build_model,
    build_vox_util,
    compile_model,
    configure_cuda,
    forward,
    resolve_data_dir,
    to_device,
)
from bevtrain.checkpoint import (
    CheckpointError,
    checkpoint_path,
    is_simplebev,
    list_checkpoints,
    load_checkpoint,
    load_weights,
)
from bevtrain.config import FLAG_BY_NAME, Config, ConfigError, fill_legacy, resolve_config, suggest
from bevtrain.distributed import (
    all_gather_object,
    all_reduce_,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
)
from bevtrain.metrics import PROTOCOLS, BevIoUEvaluator, format_table, protocol_label
from bevtrain.progress import Progress

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
    """Evaluation cannot start; the message names the file or flag and what to do."""


# -- finding the checkpoint and its config ----------------------------------------------------------
def find_checkpoint(init_dir: str, load_step: Any = None) -> Path:
    """``init_dir`` (a run folder, or a .pth file) + optional step -> checkpoint file."""
    if init_dir in (None, "", True, False):
        raise EvalError(
            "--init_dir is required: the run's checkpoint folder (<ckpt_dir>/<run>, holding "
            "model-000001000.pth files) or one model-*.pth file"
        )
    path = Path(str(init_dir))
    if path.is_file():
        if load_step not in (None, False, True):
            raise EvalError(
                f"--load_step={load_step} needs --init_dir to be a run folder, not the file {path}"
            )
        return path
    if not path.exists():
        raise EvalError(
            f"--init_dir={init_dir} does not exist (expected a run folder such as checkpoints/<run>)"
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


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str]) -> List[str]:
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            out.append(f"{k}: {va!r} (checkpoint) vs {vb!r} (now)")
    return out


def eval_config(trained: Mapping[str, Any], overrides: Mapping[str, Any]) -> Tuple[Config, List[str]]:
    """The training config with command-line overrides; returns it and lines describing the overrides."""
    for k in overrides:
        if k not in FLAG_BY_NAME:
            known = list(FLAG_BY_NAME) + [
                p for p in inspect.signature(evaluate).parameters if p != "overrides"
            ]
            raise ConfigError(
                f"unknown flag '--{k}'{suggest(k, known)} (eval takes its own flags and the training flags; "
                f"see eval_nuscenes.py --help)"
            )
    # Keys an older config may lack fall back to the defaults inside resolve_config.
    skip = ("config", "resume", "init_dir")
    base = {k: v for k, v in trained.items() if k in FLAG_BY_NAME and k not in skip}
    # Where training ran says nothing about where evaluation runs: pick the device afresh.
    base.update(device=FLAG_BY_NAME["device"].default, device_ids=FLAG_BY_NAME["device_ids"].default)
    cfg, _ = resolve_config(dict(overrides), base=base)
    notes = []
    for k in overrides:
        before = trained.get(k, FLAG_BY_NAME[k].default)
        if before == cfg[k]:
            notes.append(f"{k}: {cfg[k]!r} (command line, as in training)")
            continue
        note = f"{k}: {before!r} -> {cfg[k]!r} (command line)"
        if k == "target_raster":
            note += "  [ground truth drawn by another rule than in training]"
        elif k in MODEL_KEYS and not trained.get("_simplebev_file"):
            note += "  [changes the network: the checkpoint may not load]"
        elif k in DATA_KEYS:
            note += "  [differs from training: numbers not comparable to the run's own]"
        notes.append(note)
    return cfg, notes


def check_val_split(cfg: Config) -> None:
    """data_dir must hold the tables of dset; the val dataset must have samples (checked on build)."""
    root = Path(cfg.data_dir)
    version = f"v1.0-{cfg.dset}"
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*")) if root.is_dir() else []
        hint = f"; it has {found}: pass --dset={found[0][5:]}" if found else ""
        raise EvalError(f"--data_dir={cfg.data_dir} has no {version}/ tables for --dset={cfg.dset}{hint}")


# -- the loop -----------------------------------------------------------------------------------------
def autocast_for(amp: str, device: torch.device):
    """Autocast context for --amp and the precision's name (auto = bf16 on CUDA, fp32 elsewhere)."""
    dtype = amp_dtype(amp, device)
    if dtype is None:
        return nullcontext(), "fp32"
    return torch.autocast(device_type=device.type, dtype=dtype), "bf16" if dtype == torch.bfloat16 else "fp16"


def viz_indices(n: int, viz_every: int, max_viz: int) -> List[int]:
    """Dataset positions to visualise: every viz_every-th, at most max_viz (0 = none)."""
    if viz_every <= 0 or max_viz <= 0:
        return []
    return list(range(0, n, int(viz_every)))[: int(max_viz)]


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


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


def _png_name(scene: str, index: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in scene) or "scene"
    return f"{safe}__{index:06d}.png"


def write_scene_gifs(pngs: Sequence[Path], fps: float = 2.0, scale: float = 0.5) -> List[Path]:
    """One animated GIF per scene (``<viz_dir>/<scene>.gif``) from composites named by _png_name."""
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


def _model_predictor(model: torch.nn.Module, autocast):
    def predict(batch: Mapping[str, Any]) -> torch.Tensor:
        with autocast:
            return forward(model, batch)["seg"].float()

    return predict


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
) -> Dict[str, Any]:
    """Run ``predict(batch on device) -> seg logits (B, 1, Z, X)`` over ``loader``; the metric path.

    Every dataset position in ``expected`` (default: all ``n``) must enter the metric exactly once
    across ranks: a sample loaded twice on a rank counts once, and a sample missing or counted on
    two ranks is an EvalError. Samples whose position is in ``draw`` are rendered to PNGs in
    ``viz_dir``. Returns the metric (``BevIoUEvaluator.compute()``, {} without it), sample count,
    seconds (slowest rank), forward seconds and the PNG paths written by this rank.
    """
    evaluator = BevIoUEvaluator(vox_util)
    draw = set(int(i) for i in draw)
    seen = torch.zeros(n, dtype=torch.int64)  # times each sample was loaded (this rank)
    counted = torch.zeros(n, dtype=torch.int64)  # times each sample entered the metric (this rank)
    want = torch.zeros(n, dtype=torch.int64)
    want[list(expected) if expected is not None else slice(None)] = 1
    progress = Progress(math.ceil(int(want.sum()) / world_size), show_progress, label="eval", unit="samples")
    done, forward_s, pngs = 0, 0.0, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            index = batch["index"].cpu()
            # A sample a sampler pads in twice (e.g. DistributedSampler) enters the metric once.
            keep = torch.zeros(len(index), dtype=torch.bool)
            for b, idx in enumerate(index.tolist()):
                keep[b] = bool(seen[idx] == 0)
                seen[idx] += 1
            counted[index[keep]] += 1
            on_dev = to_device(batch, device, BATCH_KEYS_ON_DEVICE)
            tf = time.perf_counter()
            seg = predict(on_dev)  # (B, 1, Z, X) logits
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward_s += time.perf_counter() - tf
            if compute_metric:
                evaluator.update(seg, on_dev["seg_bev"], on_dev["valid_bev"], on_dev["ref_T_ego"], keep)
            to_draw = [b for b, idx in enumerate(index.tolist()) if idx in draw and bool(keep[b])]
            if to_draw and viz_dir is not None:
                seg_cpu = {"seg": seg.detach().float().cpu()}
                for b in to_draw:
                    image = viz.render_composite(batch, seg_cpu, b, vox_util, cell_width=viz_width)
                    png = Path(viz_dir) / _png_name(str(batch["scene_name"][b]), int(index[b]))
                    viz.write_png(png, image)
                    pngs.append(str(png))
            done += len(index)
            progress.update(done)
    progress.close(done)
    wall = time.perf_counter() - t0

    # Every sample exactly once across ranks, or the numbers are not the split's.
    all_reduce_sum(counted)
    timing = all_reduce_(torch.tensor([wall, forward_s], dtype=torch.float64), torch.distributed.ReduceOp.MAX)
    if not torch.equal(counted, want):
        missing = int(((want > 0) & (counted == 0)).sum())
        twice = int((counted > 1).sum())
        extra = int(((want == 0) & (counted > 0)).sum())
        raise EvalError(
            f"of {int(want.sum())} samples the loader gave {missing} no turn, {twice} more than one "
            f"(across ranks) and {extra} were not asked for: the numbers would not be the split's"
        )
    samples = int(want.sum())
    result: Dict[str, Any] = {}
    if compute_metric:
        result = evaluator.compute()
        if result["samples"] != samples:
            raise EvalError(f"metric counted {result['samples']} samples, expected {samples}")
    return {
        "result": result,
        "samples": samples,
        "seconds": float(timing[0]),
        "forward_seconds": float(timing[1]),
        "pngs": pngs,
    }


def evaluate(
    init_dir: str = "",
    load_step: Any = None,
    dset: str | None = None,
    data_dir: str | None = None,
    batch_size: int | None = None,
    nworkers: int | None = None,
    amp: str | None = None,
    device: str | None = None,
    viz_every: int = 10,
    max_viz: int = 50,
    viz_only: bool = False,
    viz_dir: str = "",
    viz_width: int = 400,
    gif_fps: float = 2.0,
    gif_scale: float = 0.5,
    metrics_path: str = "",
    log_dir: str | None = None,
    tensorboard: bool = True,
    split: str = "val",
    **overrides: Any,
) -> Dict[str, Any]:
    """Evaluate the checkpoint in ``init_dir`` on ``split``; returns the metrics dict (also on disk).

    Flags: ``--load_step`` picks ``model-<step>.pth`` (default: newest). ``--dset``, ``--data_dir``,
    ``--batch_size`` (global, split across ranks), ``--nworkers``, ``--amp``, ``--device`` and any
    training flag override the run's saved config. ``--viz_every``/``--max_viz`` choose samples to
    draw (0 = none); ``--viz_only`` runs the model on those samples only and skips the metric.
    """
    explicit = dict(
        dset=dset,
        data_dir=data_dir,
        batch_size=batch_size,
        nworkers=nworkers,
        amp=amp,
        device=device,
        log_dir=log_dir,
    )
    overrides = {**{k: v for k, v in explicit.items() if v is not None}, **overrides}
    ckpt_file = find_checkpoint(init_dir, load_step)
    ckpt = load_checkpoint(ckpt_file, map_location="cpu")
    trained, config_source = saved_config(ckpt, ckpt_file)
    # A run saved before a flag existed was trained with the old behaviour (target_raster: exact).
    trained, legacy = fill_legacy(trained)
    # Only the weights and the step are needed: let the optimiser state (~2x the weights) go now.
    ckpt = {k: ckpt[k] for k in ("model", "step", "format") if k in ckpt}
    cfg, notes = eval_config(trained, overrides)
    if is_simplebev(ckpt):
        from bevtrain.convert_simplebev import check_simplebev_settings

        try:
            check_simplebev_settings(ckpt, cfg, ckpt_file)
        except CheckpointError as e:
            raise EvalError(f"cannot evaluate {ckpt_file}: {e}") from None
    try:
        info = init_distributed(cfg.device, cfg.device_ids)
    except ValueError as e:
        raise EvalError(str(e)) from None
    say = print if info.is_main else (lambda *a, **k: None)
    try:
        return _evaluate(
            cfg,
            ckpt,
            ckpt_file,
            trained,
            config_source,
            notes,
            info,
            say,
            legacy={k: v for k, v in legacy.items() if k not in overrides},
            viz_every=viz_every,
            max_viz=max_viz,
            viz_only=viz_only,
            viz_dir=viz_dir,
            viz_width=viz_width,
            gif_fps=gif_fps,
            gif_scale=gif_scale,
            metrics_path=metrics_path,
            tensorboard=tensorboard,
            split=split,
        )
    finally:
        cleanup()


def _build_model_from_checkpoint(
    cfg: Config, ckpt: Mapping[str, Any], ckpt_file: Path, trained: Mapping[str, Any]
) -> torch.nn.Module:
    # The weights come from the checkpoint: never look for pretrained encoder weights here.
    from bevtrain.convert_simplebev import convert_weights

    model = build_model(cfg.replace(encoder_weights="none"))
    try:
        load_weights(model, convert_weights(model, ckpt, ckpt_file), ignore_load=None, source=ckpt_file)
    except CheckpointError as e:
        diffs = _differences(trained, cfg, MODEL_KEYS)
        why = (
            "the model settings differ from the checkpoint's: "
            + "; ".join(diffs)
            + ". Drop those overrides (the run's config is used by default)"
            if diffs
            else "its saved config matches but the weights do not (was it written by another version "
            "of the model code?)"
        )
        raise EvalError(f"cannot evaluate {ckpt_file}: {why}.\n{e}") from None
    return model


def _evaluate(
    cfg,
    ckpt,
    ckpt_file,
    trained,
    config_source,
    notes,
    info,
    say,
    *,
    legacy=None,
    viz_every,
    max_viz,
    viz_only,
    viz_dir,
    viz_width,
    gif_fps,
    gif_scale,
    metrics_path,
    tensorboard,
    split,
):
    step = int(ckpt.get("step", 0))
    say(f"[eval] checkpoint {ckpt_file} (step {step}); config from {config_source}; compat={cfg.compat}")
    for k, v in (legacy or {}).items():
        say(f"[eval] {config_source} has no '{k}' (saved before the flag existed): using {v!r}, "
            f"what the run was trained with; pass --{k}=... to score it otherwise")
    for note in notes:
        say(f"[eval] override {note}")
    device = info.device
    cfg = resolve_data_dir(cfg, announce=info.is_main)
    check_val_split(cfg)
    model = _build_model_from_checkpoint(cfg, ckpt, ckpt_file, trained).to(device).eval()
    configure_cuda(device, cfg.deterministic)
    if cfg.compile:
        model = compile_model(model, cfg.compile_backend)
    try:
        ds = build_dataset(cfg, split=split, is_train=False)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvalError(
            f"--data_dir={cfg.data_dir} --dset={cfg.dset}: cannot read the {split!r} split: {e}"
        ) from e
    n = len(ds)
    vox_util = build_vox_util(cfg)
    autocast, precision = autocast_for(cfg.amp, device)
    per_rank = max(1, math.ceil(cfg.batch_size / info.world_size))
    chosen = viz_indices(n, viz_every, max_viz)
    run_dir = ckpt_file.parent
    evaluated = evaluated_name(cfg.data_dir, cfg.dset, split)
    out_viz = Path(viz_dir) if viz_dir else run_dir / f"viz-{step:09d}-{evaluated}"

    if viz_only:
        if not chosen:
            raise EvalError("--viz_only with nothing to draw: set --viz_every >= 1 and --max_viz >= 1")
        mine = chosen[info.rank :: info.world_size]
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=per_rank,
            sampler=mine,
            num_workers=cfg.nworkers,
            pin_memory=device.type == "cuda",
        )
    else:
        # Not shuffled: order does not change the sums, and sequential keeps a scene's frames together.
        from bevtrain.data.dataset import make_loader

        loader = make_loader(
            ds,
            per_rank,
            cfg.nworkers,
            shuffle=False,
            is_train=False,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.seed,
        )
    say(
        f"[eval] {split} split of {cfg.dset} at {cfg.data_dir}: {n} samples; "
        f"{'visualising ' + str(len(chosen)) + ' (viz_only)' if viz_only else 'all of them'}; "
        f"{info.world_size} process(es), batch {per_rank}/process, device {device}, {precision}"
    )

    predict = _model_predictor(model, autocast)
    run = run_split(
        loader,
        predict,
        n,
        vox_util,
        device,
        expected=chosen if viz_only else None,
        compute_metric=not viz_only,
        draw=chosen,
        viz_dir=out_viz,
        viz_width=viz_width,
        show_progress=info.is_main,
        world_size=info.world_size,
    )
    result, counted, wall, forward_s = run["result"], run["samples"], run["seconds"], run["forward_seconds"]
    pngs = sorted({p for part in all_gather_object(run["pngs"]) for p in part})
    barrier()

    summary = {
        "checkpoint": str(ckpt_file.resolve()),
        "step": step,
        "config_source": config_source,
        "checkpoint_format": "simplebev" if is_simplebev(ckpt) else "bevtrain",
        "compat": cfg.compat,
        "overrides": notes,
        "data": {"data_dir": str(cfg.data_dir), "dset": cfg.dset, "split": split, "split_size": n},
        "samples": counted,
        "viz_only": bool(viz_only),
        "world_size": info.world_size,
        "device": str(device),
        "precision": precision,
        "batch_size_per_process": per_rank,
        "target_raster": cfg.target_raster,
        "seconds": wall,
        "samples_per_s": counted / wall if wall > 0 else None,
        "model_samples_per_s": counted / forward_s if forward_s > 0 else None,
        "config": Config(cfg).to_dict(),
    }
    if not viz_only:
        summary["threshold"] = result["threshold"]
        summary["iou"] = {p: result[p]["iou"] for p in PROTOCOLS}
        raster = cfg.target_raster
        summary["protocols"] = {
            "simplebev": dict(
                result["simplebev"],
                label=protocol_label("simplebev", raster),
                description=f"pixels of visibility-1 boxes (0-40% visible) ignored; ground truth from the "
                f"{raster} target raster",
            ),
            "lss": dict(
                result["lss"],
                label=protocol_label("lss", raster),
                description=f"every box counts, no mask; ground truth from the {raster} target raster",
            ),
        }

    if info.is_main:
        if not viz_only:
            say(format_table(result, raster=cfg.target_raster))
        say(
            f"[eval] {counted} samples in {wall:.1f} s: {summary['samples_per_s']:.2f} samples/s "
            f"(model alone {summary['model_samples_per_s'] or 0:.2f})"
        )
        metrics_files = []
        if not viz_only:
            # This evaluation's own copy beside its pictures (never overwritten by another dataset's),
            # and <run>/metrics.json (or --metrics_path) for the latest evaluation.
            metrics_files = [Path(metrics_path)] if metrics_path else [out_viz / "metrics.json",
                                                                       run_dir / "metrics.json"]
            text = json.dumps(_json_safe(summary), indent=2) + "\n"
            for path in metrics_files:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            summary["metrics_path"] = str(metrics_files[0])
        gifs = write_scene_gifs([Path(p) for p in pngs], gif_fps, gif_scale)
        summary["viz_dir"] = str(out_viz) if chosen else None
        summary["gifs"] = [str(g) for g in gifs]
        if tensorboard:
            summary["tensorboard"] = _write_tensorboard(cfg, run_dir, step, summary, result, pngs, evaluated)
        if chosen:
            say(f"[eval] pictures: {len(pngs)} composites (PNG) and {len(gifs)} scene GIFs in {out_viz}")
        if metrics_files:
            also = f" (and {metrics_files[1]}, the latest evaluation's)" if len(metrics_files) > 1 else ""
            say(f"[eval] metrics: {metrics_files[0]}{also}")
        if tensorboard:
            say(f"[eval] TensorBoard: tensorboard --logdir={summary['tensorboard']}")
    summary["pngs"] = pngs  # every rank's, on every rank
    return summary


def _write_tensorboard(
    cfg,
    run_dir: Path,
    step: int,
    summary: Mapping[str, Any],
    result: Mapping[str, Any],
    pngs: Sequence[str],
    evaluated: str,
) -> str:
    from torch.utils.tensorboard import SummaryWriter

    # One folder per evaluated dataset and split: their images and curves share tags and steps.
    tb_dir = Path(cfg.log_dir) / run_dir.name / f"eval-{evaluated}"
    writer = SummaryWriter(str(tb_dir))
    try:
        # The raster is in the tag: numbers scored against different ground truths are separate curves.
        raster = f"raster_{cfg.target_raster}"
        for protocol in PROTOCOLS if result else ():
            writer.add_scalar(f"eval/iou_{protocol}_{raster}", result[protocol]["iou"], step)
            for band, r in result[protocol]["bands"].items():
                writer.add_scalar(f"eval/iou_{protocol}_{raster}_{band}", r["iou"], step)
        if summary.get("samples_per_s"):
            writer.add_scalar("eval/samples_per_s", summary["samples_per_s"], step)
        for png in map(Path, pngs):
            writer.add_image(f"eval_viz/{png.stem}", viz.read_png(png), step, dataformats="HWC")
    finally:
        writer.close()
    return str(tb_dir)


def main(*args: Any, **flags: Any) -> Dict[str, Any]:
    """Entry point for fire; errors a user can fix print without a traceback."""
    if flags.pop("help", False) or flags.pop("h", False):
        # evaluate() takes any training flag as an override, so fire would swallow --help.
        print(__doc__.strip() + "\n\n" + (evaluate.__doc__ or "").strip())
        params = inspect.signature(evaluate).parameters.values()
        params = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        print("\nEval flags: " + ", ".join(f"--{p.name}={p.default!r}" for p in params))
        print("\nTraining flags (any can override the run's config):")
        print(", ".join(FLAG_BY_NAME))
        return {}
    try:
        return evaluate(*args, **flags)
    except (EvalError, ConfigError, CheckpointError) as e:
        print(f"eval_nuscenes.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    import fire

    fire.Fire(main)
