"""Training flags (Simple-BEV's names, meanings and defaults), YAML presets, validation, and the typed
sections (data, model, optim, run) that the parts of bevtrain read.

Precedence: defaults < YAML preset (``--config=NAME`` or a path, see ``find_preset``) < command line.
Every flag has a type taken from its default (or given explicitly); a value of the wrong type,
an unknown flag or an unknown YAML key is a ``ConfigError`` that names the flag and, for unknown
names, suggests the closest known one.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple, TypeVar

import yaml

from bevtrain.classes import ClassSpecError, resolve_classes
from bevtrain.geometry import DEFAULT_BOUNDS, DEFAULT_CENTROID
from bevtrain.suggest import closest_name


class ConfigError(ValueError):
    """A bad flag, YAML key or value; the message says which and what to do."""


# The image encoders bevtrain builds (bevtrain.model.encoders.ENCODER_TYPES; a test keeps both equal)
# and the number of nuScenes cameras (bevtrain.data.index.CAMERA_NAMES): flags are checked against
# them before anything is imported or built.
ENCODER_TYPES = ("res101", "res50", "res18", "effb0", "effb4")
NUM_CAMERAS = 6
# Simple-BEV's nworkers default: an upper bound here, lowered to the CPUs a process may use
# (usable_cpus) unless the flag is given.
SIMPLE_BEV_NWORKERS = 12


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a cgroup or taskset limit counts), shared among
    the ranks torchrun starts on this machine (LOCAL_WORLD_SIZE); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, cpus // local_ranks)


@dataclass(frozen=True)
class Flag:
    name: str
    default: Any
    help: str
    kind: str = ""  # "bool" | "int" | "float" | "str" | "list[int]" | "list[float]" | "list[str]" | "mapping"
    #                 | custom
    choices: Tuple[Any, ...] | None = None
    simple_bev: bool = False  # a Simple-BEV flag: name, meaning and default must not change


def _kind_of(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, (list, tuple)) and default:
        return f"list[{_kind_of(default[0])}]"
    raise TypeError(f"give an explicit kind for a flag defaulting to {default!r}")


def _f(name, default, help, kind="", choices=None, simple_bev=False) -> Flag:
    return Flag(name, default, help, kind or _kind_of(default), choices, simple_bev)


def _sb(name, default, help, kind="", choices=None) -> Flag:
    return _f(name, default, help, kind, choices, simple_bev=True)


FLAGS: Tuple[Flag, ...] = (
    # --- Simple-BEV's train_nuscenes.py main() -------------------------------------------------
    _sb("exp_name", "debug", "experiment name, the last part of the run name before the time"),
    _sb("max_iters", 100000, "optimiser steps (the paper's recipe ran 25k)"),
    _sb("log_freq", 1000, "train scalars and the console line every N steps"),
    _sb("shuffle", True, "shuffle the data (train and val loaders)"),
    _sb("dset", "trainval", "nuScenes version", choices=("trainval", "mini")),
    _sb("do_val", True, "evaluate on val batches every val_freq steps"),
    _sb("val_freq", 100, "val loss/IoU every N steps"),
    _sb("save_freq", 1000, "checkpoint every N steps (and always at the end)"),
    _sb("batch_size", 8, "global batch per micro-step (split across DDP ranks)"),
    _sb("grad_acc", 5, "micro-batches per optimiser step (loss divided by grad_acc; see grad_clip)"),
    _sb("lr", 3e-4, "learning rate (OneCycleLR max_lr when use_scheduler)"),
    _sb("use_scheduler", True, "linear OneCycleLR over max_iters + 100 steps (Simple-BEV), pct_start 0.05"),
    _sb("weight_decay", 1e-7, "AdamW weight decay"),
    _sb("nworkers", SIMPLE_BEV_NWORKERS, "data-loader worker processes per rank (0 = load in the main "
        "process); unless given, Simple-BEV's 12 lowered to the CPUs this process may use (per rank)"),
    _sb("data_dir", "data/nuscenes", "nuScenes dataroot (the folder holding v1.0-trainval/ or v1.0-mini/, "
        "samples/, sweeps/); a missing one is an error unless --synthetic=True"),
    _sb("log_dir", "logs_nuscenes_bevseg", "TensorBoard root: <log_dir>/<run>/t and /v"),
    _sb("ckpt_dir", "checkpoints/", "checkpoint root: <ckpt_dir>/<run>/model-%09d.pth"),
    _sb("keep_latest", 1, "keep this many newest checkpoints of a run"),
    _sb("init_dir", "", "initialise the model from the newest checkpoint in this run folder (or a run name "
        "in ckpt_dir, or a .pth file)"),
    _sb("ignore_load", None, "parameter-name prefixes not loaded from init_dir (str or list)",
        kind="optional_str_list"),
    _sb("load_step", False, "with init_dir: continue the step count of that checkpoint"),
    _sb("load_optimizer", False, "with init_dir: also load optimiser (and scheduler/scaler) state"),
    _sb("res_scale", 2, "image scale: final_dim = (224*res_scale, 400*res_scale)", kind="number"),
    _sb("rand_flip", True, "random image / BEV flips (train)"),
    _sb("rand_crop_and_resize", True, "random resize in [0.8, 1.2] + crop (train)"),
    _sb("ncams", NUM_CAMERAS, f"cameras per sample (nuScenes: 1..{NUM_CAMERAS}; at most the rig's "
        "camera count; 0 = every camera of the rig)"),
    _sb("nsweeps", 3, "radar/lidar sweeps accumulated"),
    _sb("encoder_type", "res101", "image encoder", choices=ENCODER_TYPES),
    _sb("use_radar", False, "feed radar to the model"),
    _sb("use_radar_filters", False, "use the devkit's default radar filters"),
    _sb("use_lidar", False, "feed lidar to the model"),
    _sb("use_metaradar", False, "radar with its meta channels"),
    _sb("do_rgbcompress", True, "compress RGB features before the BEV decoder"),
    _sb("do_shuffle_cams", True, "train: shuffle cameras and pick a random reference camera"),
    _sb("device_ids", [0, 1, 2, 3], "single process: the GPU to use is device_ids[0] (several GPUs: "
        "use torchrun); ignored under torchrun", kind="list[int]"),
    _sb("seqlen", 1, "frames per sample"),
    _sb("refcam_id", 1, "reference camera index into the rig's cameras (see 'cameras'; 1 = CAM_FRONT on "
        "nuScenes)"),
    _sb("get_tids", False, "return instance ids"),
    _sb("temporal_aug", False, "temporal augmentation"),
    # --- ours -------------------------------------------------------------------------------------
    _f("config", "", "YAML preset: a name (quickstart, rgb, radar, lidar: configs/NAME.yaml of bevtrain) or "
       "a path to a YAML file; command-line flags override it"),
    _f("resume", "", "continue a run: True = the newest run in ckpt_dir, or a run folder / "
       "run name / .pth file", kind="resume"),
    _f("stop_at", 0, "stop with a checkpoint after this step (0 = run to max_iters); resume later"),
    _f("signal_exit_code", 75, "exit code after SIGINT/SIGTERM stopped the run with a checkpoint of the last "
       "completed step (75 = EX_TEMPFAIL: stopped early, resumable; pick what your scheduler requeues on)"),
    _f("seed", 0, "random seed (model init, sampler, augmentation)"),
    _f("deterministic", False, "deterministic algorithms (slower on GPU)"),
    _f("compile", False, "torch.compile the model for training and evaluation (first steps slower while "
       "it compiles; off until measured faster: benchmarks/gpu.py)"),
    _f("compile_backend", "inductor", "torch.compile backend with compile=True: inductor (fast code), "
       "or eager / aot_eager (trace only: checks that the model compiles, no speed-up)"),
    _f("encoder_weights", "imagenet", "'imagenet' (torchvision's ImageNet weights from the torch hub cache, "
       "downloaded when missing; a run stops before training if neither works), 'none' (random init), "
       "or a path to a state dict"),
    _f("radar_features", "simplebev", "radar input: 'simplebev' = Simple-BEV's exactly (points in the ego "
       "frame at RADAR_FRONT's time; 1 occupancy channel collapsed over Y, or with use_metaradar 16 raw "
       "fields per voxel (last point wins, velocities in the sensor frame), no occupancy); 'rich' = ours "
       "(each sweep at its own ego pose, occupancy + mean of 16 features with velocities in the ref "
       "frame, per height slice)", choices=("simplebev", "rich")),
    _f("latent_dim", 128, "BEV feature channels"),
    _f("Z", 200, "BEV grid cells forward"),
    _f("Y", 8, "voxel grid cells vertical"),
    _f("X", 200, "BEV grid cells right"),
    _f("bounds", list(DEFAULT_BOUNDS), "XMIN XMAX YMIN YMAX ZMIN ZMAX in metres", kind="list[float]"),
    _f("scene_centroid", list(DEFAULT_CENTROID), "grid shift (x, y, z) in metres", kind="list[float]"),
    _f("classes", ["vehicle"], "output channels in order, one segmentation target each: object groups "
       "(boxes of nuScenes categories by prefix: vehicle, car, truck, bus, trailer, construction_vehicle, "
       "emergency_vehicle, motorcycle, bicycle, pedestrian, traffic_cone, barrier, pushable_pullable, "
       "debris, bicycle_rack, animal), "
       "map-expansion layers (drivable_area, ped_crossing, walkway, stop_line, carpark_area, divider, lane, "
       "road_segment, road_divider, lane_divider), a nuScenes category or prefix, or a class_groups name "
       "(README 'Targets')", kind="list[str]"),
    _f("class_groups", {}, "your own output groups (YAML mapping): {name: {categories: [nuScenes category "
       "prefixes]}} or {name: {layers: [map-expansion layers]}}, optional color: [r, g, b]; name them in "
       "classes", kind="mapping"),
    _f("map_loss", "focal", "loss of the map-layer channels: 'focal' (BEVFusion's per-class sigmoid focal "
       "loss, gamma 2) or 'bce' (plain per-class BCE); object channels always take Simple-BEV's masked BCE "
       "(pos_weight 2.13)", choices=("focal", "bce")),
    _f("viz_class", "", "the class whose errors the pictures' error panel shows ('' = the first class)"),
    _f("target_raster", "simplebev", "how boxes become BEV targets: 'simplebev' = Simple-BEV's maps "
       "cell for cell (lidar-keyframe ego pose, truncated corners, cv2.fillPoly; needed for numbers "
       "comparable with the paper), 'exact' = cells whose centre is inside the footprint",
       choices=("simplebev", "exact")),
    _f("amp", "auto", "mixed precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (+GradScaler), none, or "
       "bf16_if_native (bf16 where the device computes bf16 natively: CUDA with bf16, a CPU with avx512_bf16 "
       "or amx_bf16; fp32 elsewhere, where bf16 would be emulated and slower)",
       choices=("auto", "bf16", "fp16", "none", "bf16_if_native")),
    _f("device", "auto", "auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)"),
    _f("val_batches", 1, "val batches per evaluation"),
    _f("viz_freq", 5000, "BEV images every N steps (0 = never)"),
    _f("grad_clip", 5.0, "max norm of the gradient summed over the grad_acc micro-batches, as Simple-BEV "
       "clipped it (0 = off); we average micro-batches, so the averaged gradient is clipped at "
       "grad_clip / grad_acc"),
    _f("pct_start", 0.05, "OneCycleLR warm-up fraction"),
    _f("max_nonfinite", 20, "stop (with a checkpoint) after this many non-finite steps in a row"),
    _f("sync_bn", False, "DDP: synchronise BatchNorm statistics across ranks"),
    _f("find_unused_parameters", False, "DDP: allow parameters without gradients"),
    _f("cache_dir", "", "index cache folder ('' = $BEVTRAIN_CACHE if set, else ~/.cache/bevtrain/index)"),
    _f("synthetic", False, "train on the bundled synthetic set (synthetic_dir, generated on first use) "
       "when data_dir is left at its default and that folder is absent; the quickstart preset sets it"),
    _f("synthetic_dir", "data/synthetic", "synthetic dataroot used with --synthetic=True"),
    _f("compat", "none", "forward pass and validation inputs: 'none' (bevtrain's exact pixel conventions) "
       "or 'simplebev' (Simple-BEV's: intrinsics scaled as cx*sx, its lift sampling, zero padding and "
       "|feat|>0 camera mean, PIL NEAREST val resize, static camera rig), for Simple-BEV's checkpoints; "
       "set automatically when --init_dir is a Simple-BEV checkpoint", choices=("none", "simplebev")),
    _f("synthetic_keyframes", 40, "keyframes per synthetic scene when generating it"),
    _f("cameras", [], "the camera channels to use, in this order (refcam_id and cam_ids index it); [] = "
       "every camera of the dataroot's sensor table: nuScenes' six in their usual order, then the others by "
       "name (README 'Any rig')", kind="list[str]"),
    _f("synthetic_size", [1600, 900], "camera image width and height of the synthetic set when generating it "
       "(nuScenes' 1600 900; the CPU quickstarts render 800 450: half the generation time, and their "
       "56x100 inputs look the same)", kind="list[int]"),
    _f("channels_last", False, "run the network in channels-last memory layout (training and evaluation): "
       "about 10% faster steps on an AVX512 CPU in bf16 (benchmarks/RESULTS.md); off by default because "
       "the numbers differ in the last bits"),
    _f("bad_samples", "stop", "a sample with a corrupt/truncated/missing file or non-finite calibration or "
       "pose: 'stop' with an error naming it, or 'skip' it (the next good sample takes its place; listed in "
       "<log_dir>/<run>/bad_samples.jsonl)", choices=("stop", "skip")),
    _f("max_bad_fraction", 0.01, "with bad_samples=skip: stop when more than this fraction of a split "
       "(floor of fraction x samples) is bad"),
    _f("threads", 0, "torch CPU threads of the main process (0 = auto: on a CPU device the CPUs idle at "
       "the start, at most torch's default; on CUDA torch's default). Under load, more threads than idle "
       "cores made CPU steps 4-10x slower than one thread"),
    _f("debug", False, "print the full traceback of errors in flags, checkpoints or data (by default: the "
       "message alone)"),
)

FLAG_BY_NAME: Dict[str, Flag] = {f.name: f for f in FLAGS}
DEFAULTS: Dict[str, Any] = {f.name: f.default for f in FLAGS}
# What a run saved before a flag existed was trained with, where that differs from today's default.
LEGACY_VALUES: Dict[str, Any] = {"target_raster": "exact"}


def fill_legacy(saved: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A saved (checkpoint) config with the flags it predates set to what that run used.

    Returns the filled config and the values filled in (empty when the config has them all).
    """
    filled = {k: v for k, v in LEGACY_VALUES.items() if k not in saved}
    return {**dict(saved), **filled}, filled


class Config(dict):
    """A resolved configuration: a plain dict of primitive values with attribute access.

    The command line stays flat (Simple-BEV's flag names); the parts of bevtrain read typed
    sections of it: ``cfg.data``, ``cfg.model``, ``cfg.optim``, ``cfg.run`` (see DataConfig etc.).
    """

    @property
    def data(self) -> DataConfig:
        return DataConfig.from_config(self)

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.from_config(self)

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig.from_config(self)

    @property
    def run(self) -> RunConfig:
        return RunConfig.from_config(self)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes) -> Config:
        out = Config(self)
        out.update(changes)
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {k: (_thawed(v) if isinstance(v, (tuple, Mapping)) else v) for k, v in self.items()}


# Names other trainers use for our flags: an unknown name is matched against these too, so
# --learning_rate (or the typo lerning_rate) suggests 'lr' rather than a flag that merely looks alike.
ALIASES: Dict[str, str] = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "num_workers": "nworkers",
    "workers": "nworkers",
    "num_iters": "max_iters",
    "max_steps": "max_iters",
    "iterations": "max_iters",
    "gradient_accumulation_steps": "grad_acc",
    "accumulate_grad_batches": "grad_acc",
    "checkpoint_dir": "ckpt_dir",
    "output_dir": "ckpt_dir",
    "logdir": "log_dir",
    "dataroot": "data_dir",
    "backbone": "encoder_type",
    "clip_grad_norm": "grad_clip",
    "eval_freq": "val_freq",
    "checkpoint_freq": "save_freq",
    "precision": "amp",
    "mixed_precision": "amp",
}


def suggest(name: str, known: Iterable[str] = FLAG_BY_NAME) -> str:
    known = list(known)
    candidates = known + [a for a, target in ALIASES.items() if target in known]
    close = closest_name(name, candidates)
    if not close:
        return ""
    return f"; did you mean '{ALIASES.get(close, close)}'?"


# How the kinds that are not Python types read in a message.
KIND_WORDS = {"optional_int": "an int", "optional_str_list": "str or list[str]", "resume": "True or a path",
              "number": "a number", "mapping": "a mapping"}


def _type_error(name: str, where: str, flag: Flag, value: Any) -> ConfigError:
    return ConfigError(
        f"{where} '{name}' expects {KIND_WORDS.get(flag.kind, flag.kind)} (default {flag.default!r}), "
        f"got {value!r} ({type(value).__name__})"
    )


def _coerce_scalar(kind: str, value: Any) -> Any:
    """Return value as `kind` or raise TypeError. Lossless conversions only."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # fire passes --flag=true on as a string
        raise TypeError
    if kind in ("int", "optional_int"):
        if value is None and kind == "optional_int":
            return None
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # --max_iters=1e4
        raise TypeError
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return value
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # fire turns --exp_name=3 into an int
        raise TypeError
    raise AssertionError(kind)


# Flags that take a fixed number of values, and what they are.
LIST_LENGTHS: Dict[str, Tuple[int, str]] = {
    "bounds": (6, "XMIN XMAX YMIN YMAX ZMIN ZMAX"),
    "scene_centroid": (3, "x y z"),
    "synthetic_size": (2, "width height"),
}


def _coerce_mapping(value: Any) -> Dict[str, Any]:
    """A mapping flag's value as a plain dict: a mapping, YAML text of one (the command line), or empty."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TypeError from None
        if value is None:
            return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError
    return _thawed(value)


def _thawed(value: Any) -> Any:
    """A plain copy (dicts and lists) of nested mappings / sequences, e.g. of a section's frozen value."""
    if isinstance(value, Mapping):
        return {str(k): _thawed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thawed(v) for v in value]
    return value


def coerce(name: str, value: Any, where: str = "flag", flag: Flag | None = None) -> Any:
    """Check and convert one value against the flag's type; ConfigError names the flag.
    ``flag``: a flag of another table than FLAGS (eval's own)."""
    flag = flag or FLAG_BY_NAME[name]
    try:
        if flag.kind.startswith("list["):
            elem = flag.kind[5:-1]
            items = value if isinstance(value, (list, tuple)) else [value]
            out = [_coerce_scalar(elem, v) for v in items]
            if name in LIST_LENGTHS and len(out) != LIST_LENGTHS[name][0]:
                n, what = LIST_LENGTHS[name]
                raise ConfigError(
                    f"{where} '{name}' needs {n} numbers ({what}), got {len(out)}: {out}; "
                    f"e.g. --{name}=[{','.join(map(str, flag.default))}]"
                )
            if name == "synthetic_size" and min(out) < 32:
                raise ConfigError(f"{where} 'synthetic_size' needs a width and height of at least 32 pixels, "
                                  f"got {out}; e.g. --synthetic_size=[800,450]")
            value = out
        elif flag.kind == "optional_str_list":
            if value is None or value == "":
                value = None
            elif isinstance(value, str):
                value = [value]
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = list(value)
            else:
                raise TypeError
        elif flag.kind == "mapping":
            value = _coerce_mapping(value)
        elif flag.kind == "resume":
            if value is True or value is False or value is None:
                value = True if value else ""
            elif isinstance(value, str):
                low = value.lower()
                value = "" if low in ("", "false", "no") else True if low in ("true", "yes") else value
            else:
                raise TypeError
        else:
            value = _coerce_scalar(flag.kind, value)
    except TypeError:
        raise _type_error(name, where, flag, value) from None
    if name == "encoder_weights" and value == "auto":
        raise ConfigError(
            f"{where} 'encoder_weights': 'auto' was removed (it trained from random weights without a word "
            "when the ImageNet file was not cached). Use 'imagenet' (the default: torch hub cache, "
            "downloaded when missing), 'none' (random init) or a path to a state dict"
        )
    if flag.choices is not None and value not in flag.choices:
        raise ConfigError(f"{where} '{name}' must be one of {list(flag.choices)}, got {value!r}")
    return value


def _check_names(values: Mapping[str, Any], where: str) -> None:
    for name in values:
        if name not in FLAG_BY_NAME:
            raise ConfigError(f"unknown {where} '{name}'{suggest(name)} (see train_nuscenes.py --help)")


def preset_dirs() -> List[Path]:
    """Where ``--config=NAME`` finds bevtrain's presets, in order: ``configs/`` beside the bevtrain
    package (a clone, or ``pip install -e .``), then ``<sys.prefix>/share/bevtrain/configs`` (where
    ``pip install .`` puts them: setup.cfg's data_files)."""
    checkout = Path(__file__).resolve().parent.parent
    return [checkout / "configs", Path(sys.prefix) / "share" / "bevtrain" / "configs"]


def available_presets() -> Dict[str, Path]:
    """Preset name -> file, the first folder of ``preset_dirs`` holding a name winning."""
    found: Dict[str, Path] = {}
    for folder in preset_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def find_preset(value: str) -> Path:
    """``--config`` value -> YAML file: a path as given (relative to the current folder), else a preset
    by name (``rgb``, ``rgb.yaml``, or the README's ``configs/rgb.yaml`` from any folder)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    presets = available_presets()
    name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    if path.parent in (Path("."), Path("configs")) and name in presets:
        return presets[name]
    listed = ", ".join(presets) or "none found"
    where = " or ".join(str(d) for d in preset_dirs()[:1])
    raise ConfigError(
        f"flag 'config': {value} is neither a YAML file (looked in {Path.cwd()}) nor a preset; "
        f"presets: {listed} (in {where}); pass a name (--config=quickstart) or a path to a YAML file"
    )


def load_yaml(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        p = find_preset(path)
    path = str(p)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag: value")
    if "config" in data:
        raise ConfigError(f"config file {path}: presets cannot include other presets ('config' key)")
    _check_names(data, f"key in {path}:")
    return {k: coerce(k, v, where=f"{path}: key") for k, v in data.items()}


def _check_consistency(cfg: Config) -> None:
    positive = ("max_iters", "log_freq", "val_freq", "save_freq", "batch_size", "grad_acc", "keep_latest",
                "nsweeps", "seqlen", "Z", "Y", "X", "latent_dim", "val_batches")
    for name in positive:
        if cfg[name] < 1:
            raise ConfigError(f"flag '{name}' must be >= 1, got {cfg[name]}")
    for name in ("nworkers", "stop_at", "viz_freq", "max_nonfinite", "synthetic_keyframes", "threads"):
        if cfg[name] < 0:
            raise ConfigError(f"flag '{name}' must be >= 0, got {cfg[name]}")
    for name in ("lr", "res_scale"):
        if not cfg[name] > 0:  # also refuses nan
            raise ConfigError(f"flag '{name}' must be > 0, got {cfg[name]}")
    for name in ("weight_decay", "grad_clip"):
        if not cfg[name] >= 0:
            raise ConfigError(f"flag '{name}' must be >= 0, got {cfg[name]}")
    if not 1 <= cfg.signal_exit_code <= 255:
        raise ConfigError(f"flag 'signal_exit_code' must be in [1, 255] (0 means finished), "
                          f"got {cfg.signal_exit_code}")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise ConfigError(f"flag 'max_bad_fraction' must be in [0, 1], got {cfg.max_bad_fraction}")
    if not 0 < cfg.pct_start < 1:
        raise ConfigError(f"flag 'pct_start' must be in (0, 1), got {cfg.pct_start}")
    # The upper bound is the rig's camera count, which only the dataset knows (it reads the sensor table).
    if cfg.ncams < 0:
        raise ConfigError(f"flag 'ncams' must be >= 0 (0 = every camera of the rig), got {cfg.ncams}")
    if cfg.cameras and cfg.ncams > len(cfg.cameras):
        raise ConfigError(f"flag 'ncams' ({cfg.ncams}) is more than the {len(cfg.cameras)} cameras that "
                          f"'cameras' names; pass --ncams={len(cfg.cameras)} or --ncams=0")
    if cfg.seqlen != 1:
        raise ConfigError(f"flag 'seqlen' must be 1 (single frames only), got {cfg.seqlen}")
    if cfg.use_metaradar and not cfg.use_radar:
        raise ConfigError("flag 'use_metaradar': True needs --use_radar=True (metaradar adds radar features)")
    if cfg.ncams and not 0 <= cfg.refcam_id < cfg.ncams:
        raise ConfigError(f"flag 'refcam_id' must be in [0, ncams={cfg.ncams}), got {cfg.refcam_id}")
    try:
        resolve_classes(cfg.classes, cfg.class_groups)
    except ClassSpecError as e:
        raise ConfigError(f"flag 'classes' / 'class_groups': {e}") from None
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"flag 'device' must be auto, cpu, cuda or cuda:N, got {dev!r}")


def resolve_config(
    flags: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None
) -> Tuple[Config, set]:
    """defaults (or ``base``, e.g. a checkpoint's config) < YAML preset < ``flags``.

    Returns the validated config and the set of names set explicitly (by YAML or flags).
    """
    flags = dict(flags or {})
    _check_names(flags, "flag")
    values: Dict[str, Any] = dict(DEFAULTS)
    if base:
        values.update({k: v for k, v in base.items() if k in FLAG_BY_NAME})
    explicit: set = set()
    preset = flags.get("config") or ""
    if preset:
        preset = coerce("config", preset)
        from_yaml = load_yaml(str(find_preset(preset)))
        values.update(from_yaml)
        explicit |= set(from_yaml)
    for name, value in flags.items():
        values[name] = coerce(name, value)
        explicit.add(name)
    if "nworkers" not in explicit:  # more workers than CPUs only compete with training (torch warns)
        values["nworkers"] = min(values["nworkers"], usable_cpus())
    cfg = Config({name: values[name] for name in FLAG_BY_NAME})
    _check_consistency(cfg)
    return cfg, explicit


def format_lr(lr: float) -> str:
    """3e-4 -> '3e-4', 2.5e-4 -> '2.5e-4', 0.001 -> '1e-3' (Simple-BEV's run-name style)."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_name(cfg: Mapping[str, Any], hhmmss: str) -> str:
    """``{B}x{grad_acc}_{lr}{s}_{exp_name}_{HH:MM:SS}``, e.g. ``1x5_3e-4s_rgb03_17:45:58``."""
    s = "s" if cfg["use_scheduler"] else ""
    return f"{cfg['batch_size']}x{cfg['grad_acc']}_{format_lr(cfg['lr'])}{s}_{cfg['exp_name']}_{hhmmss}"


def _shown(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, str):
        return value if value else "''"
    return str(list(value)) if isinstance(value, tuple) else str(value)


def describe_flags(flags: Iterable[Flag], defaults: Mapping[str, str] | None = None) -> List[str]:
    """``--name=default`` then the help, indented and wrapped, with the choices where there are some.
    ``defaults``: a text to show instead of a flag's default."""
    import textwrap

    lines = []
    for f in flags:
        text = f.help + (f" (one of: {', '.join(map(str, f.choices))})" if f.choices else "")
        shown = (defaults or {}).get(f.name, _shown(f.default))
        lines.append(f"  --{f.name}={shown}")
        lines += textwrap.wrap(text, 100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return lines


def flags_help() -> str:
    lines = ["Flags, given as --name=value (defaults < --config=NAME or YAML file < command line):"]
    return "\n".join(lines + describe_flags(FLAGS, {"nworkers": f"{SIMPLE_BEV_NWORKERS} (at most the CPUs)"}))


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(Config(cfg).to_dict()), sort_keys=False)


# -- typed sections ------------------------------------------------------------------------------------
# Each part of bevtrain takes the section it reads instead of a long list of keywords. Names, defaults
# and help live in FLAGS alone; a section only says which flags it holds and their Python types (a
# test checks that every flag belongs to a section and every field is a flag). A flag may sit in two
# sections when two parts read it (the grid: data rasterises targets on it, the model lifts onto it).
S = TypeVar("S", bound="_Section")


class FrozenMapping(dict):
    """A read-only, hashable dict: how a section holds a mapping flag (class_groups), so that sections stay
    hashable values; it reads like a dict (``resolve_classes`` takes it as is)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _read_only(self, *args, **kwargs):
        raise TypeError("a section's mapping is read-only; use section.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore

    def __reduce__(self):
        return FrozenMapping, (dict(self),)


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenMapping({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class _Section:
    @classmethod
    def from_config(cls: type[S], cfg: Mapping[str, Any]) -> S:
        return cls(**{f.name: _frozen(cfg[f.name]) for f in fields(cls)})

    @classmethod
    def make(cls: type[S], **values: Any) -> S:
        """The section with flag defaults, ``values`` overriding them (checked and converted as flags),
        to build a dataset or model outside a run: ``DataConfig.make(data_dir=root, dset="mini")``."""
        names = {f.name for f in fields(cls)}
        for name in values:
            if name not in names:
                raise ConfigError(f"{cls.__name__} has no setting '{name}'{suggest(name, names)}")
        return cls(**{name: _frozen(coerce(name, values[name]) if name in values else DEFAULTS[name])
                      for name in names})

    def replace(self: S, **changes: Any) -> S:
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DataConfig(_Section):
    """What the dataset reads, how it augments images and how it draws targets (README 'Images and
    augmentation', 'Targets'), and how the loader feeds it."""

    data_dir: str
    dset: str
    res_scale: float
    rand_crop_and_resize: bool
    rand_flip: bool
    ncams: int
    cameras: Tuple[str, ...]
    nsweeps: int
    do_shuffle_cams: bool
    refcam_id: int
    use_radar: bool
    use_radar_filters: bool
    use_lidar: bool
    use_metaradar: bool
    radar_features: str
    seqlen: int
    get_tids: bool
    temporal_aug: bool
    Z: int
    Y: int
    X: int
    bounds: Tuple[float, ...]
    scene_centroid: Tuple[float, ...]
    classes: Tuple[str, ...]
    class_groups: Mapping[str, Any]
    cache_dir: str
    seed: int
    compat: str
    target_raster: str
    bad_samples: str
    max_bad_fraction: float
    shuffle: bool
    nworkers: int
    synthetic: bool
    synthetic_dir: str
    synthetic_keyframes: int
    synthetic_size: Tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig(_Section):
    """What shapes the network and its weights: a checkpoint loads into a model built from the same."""

    encoder_type: str
    encoder_weights: str
    latent_dim: int
    Z: int
    Y: int
    X: int
    bounds: Tuple[float, ...]
    scene_centroid: Tuple[float, ...]
    use_radar: bool
    use_lidar: bool
    use_metaradar: bool
    radar_features: str
    do_rgbcompress: bool
    compat: str
    classes: Tuple[str, ...]
    class_groups: Mapping[str, Any]
    map_loss: str

    @property
    def outputs(self):
        """The named outputs (``bevtrain.classes.OutputClass``), one segmentation channel each."""
        from bevtrain.classes import resolve_classes

        return resolve_classes(self.classes, self.class_groups)


@dataclass(frozen=True)
class OptimConfig(_Section):
    """The optimisation: steps, batch, optimiser, schedule, clipping, precision."""

    max_iters: int
    batch_size: int
    grad_acc: int
    lr: float
    use_scheduler: bool
    pct_start: float
    weight_decay: float
    grad_clip: float
    amp: str
    max_nonfinite: int


@dataclass(frozen=True)
class RunConfig(_Section):
    """Everything about a run that is neither data, model nor optimisation: names, folders, cadences,
    initialisation and resumption, devices, signals."""

    config: str
    exp_name: str
    seed: int
    deterministic: bool
    log_freq: int
    do_val: bool
    val_freq: int
    val_batches: int
    viz_freq: int
    save_freq: int
    keep_latest: int
    log_dir: str
    ckpt_dir: str
    init_dir: str
    ignore_load: Any
    load_step: bool
    load_optimizer: bool
    resume: Any
    stop_at: int
    signal_exit_code: int
    device: str
    device_ids: Tuple[int, ...]
    sync_bn: bool
    find_unused_parameters: bool
    compile: bool
    compile_backend: str
    threads: int
    debug: bool
    channels_last: bool
    viz_class: str


SECTIONS = (DataConfig, ModelConfig, OptimConfig, RunConfig)


def override_saved(
    saved: Mapping[str, Any], flags: Mapping[str, Any], drop: Iterable[str] = ()
) -> Tuple[Config, Dict[str, Any], Dict[str, Tuple[Any, Any]]]:
    """A run's saved config (a checkpoint's) with ``flags`` given now on top: what resume and eval do.

    ``drop``: saved keys not inherited (per-launch flags). Flags the saved config predates get the
    values that run used (``LEGACY_VALUES``). Returns the config, the legacy values filled in that
    ``flags`` did not override, and ``{name: (saved, now)}`` for every saved value that changed.
    """
    base = {k: v for k, v in saved.items() if k in FLAG_BY_NAME and k not in set(drop)}
    base, legacy = fill_legacy(base)
    cfg, _ = resolve_config(flags, base=base)
    changed = {k: (base[k], cfg[k]) for k in cfg if k in base and _frozen(base[k]) != _frozen(cfg[k])}
    return cfg, {k: v for k, v in legacy.items() if k not in flags}, changed


# -- eval_nuscenes.py's own flags ------------------------------------------------------------------------
# Besides these, eval takes every training flag as an override of the run's saved config.
EVAL_FLAGS: Tuple[Flag, ...] = (
    _f("init_dir", "", "the run to evaluate (required): its folder (checkpoints/<run>), its name (looked up "
       "in --ckpt_dir) or one model-*.pth file"),
    _f("load_step", None, "evaluate model-<step>.pth of the run (default: its newest checkpoint)",
       kind="optional_int"),
    _f("split", "val", "the split to score", choices=("val", "train")),
    _f("viz_every", 10, "draw every N-th sample of the split (0 = no pictures)"),
    _f("max_viz", 50, "draw at most this many samples"),
    _f("viz_only", False, "only run the model on the samples drawn: pictures, no scores (written to "
       "viz_only-<step>-<data>-<split>/, apart from a full evaluation's pictures)"),
    _f("viz_dir", "", "picture folder ('' = viz-<step>-<data>-<split>/ beside the checkpoint)"),
    _f("viz_width", 400, "width in pixels of each of the three columns of a picture"),
    _f("gif_fps", 2.0, "frames per second of the scene GIFs"),
    _f("gif_scale", 1.0, "size of the scene GIFs relative to the PNGs (below about 0.75 the legend is hard "
       "to read)"),
    _f("metrics_path", "", "write metrics.json only to this file ('' = the picture folder, and a copy beside "
       "the checkpoints)"),
    _f("tensorboard", True, "write the scores and pictures to TensorBoard "
       "(<log_dir>/<run>/eval-<data>-<split>)"),
)
EVAL_FLAG_BY_NAME: Dict[str, Flag] = {f.name: f for f in EVAL_FLAGS}
EVAL_DEFAULTS: Dict[str, Any] = {f.name: f.default for f in EVAL_FLAGS}
# Training flags eval_nuscenes.py shows among its own: left out, they take the run's saved value.
EVAL_SHORTCUTS = ("data_dir", "dset", "batch_size", "nworkers", "amp", "device", "log_dir", "ckpt_dir")


def check_eval_flags(flags: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """eval_nuscenes.py's flags, split into its own (checked and converted, defaults filled in) and the
    training flags that override the run's config (names checked; values are checked against the run's
    config later). ConfigError names an unknown flag and the closest known one."""
    for name in flags:
        if name not in EVAL_FLAG_BY_NAME and name not in FLAG_BY_NAME:
            raise ConfigError(
                f"unknown flag '--{name}'{suggest(name, [*EVAL_FLAG_BY_NAME, *FLAG_BY_NAME])} (eval takes "
                f"its "
                f"own flags and any training flag; see eval_nuscenes.py --help)"
            )
    own = {f.name: f.default for f in EVAL_FLAGS}
    for name, value in flags.items():
        if name in EVAL_FLAG_BY_NAME:
            own[name] = coerce(name, value, flag=EVAL_FLAG_BY_NAME[name])
    for name in ("viz_every", "max_viz", "load_step"):
        if own[name] is not None and own[name] < 0:
            raise ConfigError(f"flag '{name}' must be >= 0, got {own[name]}")
    if own["viz_width"] < 100:
        raise ConfigError(f"flag 'viz_width' must be >= 100 (pixels), got {own['viz_width']}")
    for name in ("gif_fps", "gif_scale"):
        if not own[name] > 0:
            raise ConfigError(f"flag '{name}' must be > 0, got {own[name]}")
    overrides = {k: v for k, v in flags.items() if k not in EVAL_FLAG_BY_NAME}
    return own, overrides


def eval_help() -> str:
    shortcuts = ", ".join(f"--{k}" for k in EVAL_SHORTCUTS)
    return "\n".join([
        "Flags of eval_nuscenes.py:",
        *describe_flags(
            EVAL_FLAGS, {"init_dir": "<run folder | run name | model-*.pth>", "load_step": "<newest>"}
        ),
        "",
        f"Training flags: {shortcuts} and every other flag of train_nuscenes.py --help override the run's",
        "saved config for this evaluation (left out, each takes the run's own value); each override is",
        "printed and stored in metrics.json, e.g. --data_dir=/data/nuscenes --dset=trainval, or",
        "--target_raster=exact to score against the exact footprints.",
    ])
