"""The one place that builds things from a resolved config (training and evaluation share it).

    cfg = resolve_data_dir(cfg)          # real data at data_dir (or, with synthetic=True, the synthetic set)
    vox_util = build_vox_util(cfg)
    model = build_model(cfg)
    ds = build_dataset(cfg, split="train", is_train=True)
    loader = build_loader(cfg, ds, is_train=True, batch_size=..., rank=..., world_size=...)

A run folder's ``config.yaml`` is such a resolved config: ``Config(yaml.safe_load(...))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Dict, Mapping, Sequence, Tuple

import torch

from bevtrain.config import DEFAULTS, Config, ConfigError, DataConfig, ModelConfig
from bevtrain.geometry import Vox_util

_announced = set()


def _say_once(msg: str) -> None:
    if msg not in _announced:
        _announced.add(msg)
        print(msg, flush=True)


def _has_nuscenes_tables(root: Path) -> bool:
    return root.is_dir() and any((root / v / "sample.json").is_file() for v in ("v1.0-trainval", "v1.0-mini"))


def check_data_dir(cfg: Mapping[str, Any]) -> None:
    """ConfigError naming ``data_dir`` when it is absent and the synthetic set does not stand in for it
    (resolve_data_dir's rule): said before anything is downloaded or generated."""
    data_dir = Path(cfg["data_dir"])
    if data_dir.is_dir():
        return
    is_default = cfg["data_dir"].rstrip("/") == DEFAULTS["data_dir"].rstrip("/")
    if not (is_default and cfg.get("synthetic")):
        where = "" if data_dir.is_absolute() else f" (from {Path.cwd()})"
        raise ConfigError(
            f"flag 'data_dir': {cfg['data_dir']} does not exist{where}. Point --data_dir at a nuScenes "
            f"dataroot (the folder holding v1.0-trainval/ or v1.0-mini/, samples/, sweeps/)"
            + (", or train on the bundled synthetic set with --config=quickstart or --synthetic=True"
               if is_default else "")
        )


def resolve_data_dir(cfg: Mapping[str, Any], announce: bool = True) -> Config:
    """Return cfg with ``data_dir`` / ``dset`` pointing at data that exists.

    - ``data_dir`` exists: used as is.
    - ``synthetic`` is set (the quickstart preset), ``data_dir`` is the default (``data/nuscenes``)
      and absent: the synthetic set at ``synthetic_dir`` (generated on first use) with dset 'mini',
      said once.
    - any other absent ``data_dir``: ConfigError naming it (a paper preset run without its data must
      not train on the synthetic set).
    Idempotent: a resolved config resolves to itself.
    """
    cfg = Config(cfg)
    if Path(cfg.data_dir).is_dir():
        return cfg
    check_data_dir(cfg)
    from bevtrain.synthetic import ensure_synthetic

    synth = Path(cfg.synthetic_dir)
    if announce:
        _say_once(
            f"[bevtrain] no nuScenes at {cfg.data_dir}: using the synthetic set at {synth} "
            f"(dset 'mini'{', generating it now' if not _has_nuscenes_tables(synth) else ''})"
        )
    width, height = cfg.synthetic_size
    ensure_synthetic(synth, keyframes=cfg.synthetic_keyframes, width=width, height=height, progress=announce)
    return cfg.replace(data_dir=str(synth), dset="mini")


def build_vox_util(cfg: Mapping[str, Any]) -> Vox_util:
    return Vox_util(cfg["Z"], cfg["Y"], cfg["X"], scene_centroid=cfg["scene_centroid"], bounds=cfg["bounds"])


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The Segnet of a config, in channels-last layout with ``channels_last``."""
    from bevtrain.model import Segnet

    model = Segnet(ModelConfig.from_config(cfg))
    return model.to(memory_format=torch.channels_last) if cfg.get("channels_last") else model


def build_dataset(cfg: Mapping[str, Any], split: str = "train", is_train: bool = True):
    """The dataset of a split ('train' or 'val') of a resolved config (see resolve_data_dir)."""
    from bevtrain.data.dataset import NuScenesBEVDataset

    return NuScenesBEVDataset(DataConfig.from_config(cfg), split=split, is_train=is_train)


def prepare_indexes(cfg: Mapping[str, Any], splits: Sequence[str], verbose: bool = True) -> None:
    """Build the missing index caches of ``splits`` together (one table load, once per machine: other
    processes starting at the same time wait for it and read the cache)."""
    from bevtrain.data.index import prepare_indexes as prepare

    data = DataConfig.from_config(cfg)
    prepare(data.data_dir, data.dset, list(splits), data.nsweeps, data.cache_dir or None, verbose)


def build_loader(cfg: Mapping[str, Any], ds, is_train: bool, batch_size: int, rank: int = 0,
                 world_size: int = 1, indices=None):
    """``batch_size`` here is per rank (see distributed.per_rank_batch). ``indices``: only these dataset
    positions, each once across ranks (evaluation of chosen samples)."""
    from bevtrain.data.dataset import make_loader

    data = DataConfig.from_config(cfg)
    if indices is not None:
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=list(indices)[rank::world_size],
                                           num_workers=data.nworkers, pin_memory=torch.cuda.is_available())

    return make_loader(ds, batch_size, data.nworkers, data.shuffle, is_train,
                       rank=rank, world_size=world_size, seed=data.seed)


# -- CPU threads (training and evaluation) ---------------------------------------------------------------
def idle_cpus(cpus: Sequence[int] | None = None, window: float = 0.5) -> float | None:
    """How many of the CPUs this process may use are idle now: their idle share over ``window`` seconds
    (Linux ``/proc/stat``), summed; None where that cannot be read. Now, not the load average: the
    load average still counts work just finished (a pip install, the synthetic set's generation)."""
    import os
    import time

    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None

    def sample():
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(v) for v in fields]
                    out[int(name[3:])] = (values[3] + values[4], sum(values[:8]))  # idle + iowait, total
        return out

    try:
        before = sample()
        time.sleep(window)
        after = sample()
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu, (idle_b, total_b) in before.items():
        idle_a, total_a = after.get(cpu, (idle_b, total_b))
        if total_a > total_b:
            idle += (idle_a - idle_b) / (total_a - total_b)
    return idle if before else None


def configure_threads(threads: int, device: torch.device) -> str:
    """Set torch's CPU thread count; returns what was chosen and why, for the run's first lines.

    ``threads`` > 0: that many. 0 (auto): on a CPU device, the CPUs this process may use that are idle
    now (at least 1), never more than torch has (its default, or what OMP_NUM_THREADS or the caller
    set); chosen once per process, so that runs in one process compute alike. On CUDA, torch's count as
    it is. Why: on a busy machine more threads than idle cores wait for each other at every operation;
    CPU steps ran 4-10x slower with torch's default than with one thread there.
    """
    from bevtrain.config import usable_cpus

    global _AUTO_THREADS
    now = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
        return f"{threads} CPU thread{'s' if threads > 1 else ''} (--threads)"
    if device.type != "cpu":
        return f"{now} CPU threads"
    if _AUTO_THREADS is None:
        cpus = usable_cpus()
        idle = idle_cpus()
        if idle is None:
            _AUTO_THREADS = (now, "torch's default; --threads=N to choose")
        else:
            chosen = max(1, min(now, int(idle + 0.5)))
            _AUTO_THREADS = (chosen, f"auto: {idle:.1f} of {cpus} CPUs idle; --threads=N to choose")
    chosen, why = _AUTO_THREADS
    torch.set_num_threads(min(now, chosen))
    chosen = torch.get_num_threads()
    return f"{chosen} CPU thread{'s' if chosen > 1 else ''} ({why})"


_AUTO_THREADS = None  # (threads, why) of the first auto choice in this process


# -- running the model on a batch (shared by training and evaluation) -------------------------------
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# CPU instruction sets that compute bf16 natively; elsewhere oneDNN emulates bf16, slower than fp32.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> Tuple[str, ...]:
    """The native-bf16 instruction sets among this CPU's flags (Linux ``/proc/cpuinfo``); () when it has
    none or the file is unreadable (other systems)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in NATIVE_BF16_CPU_FLAGS if f in flags)
    return ()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. 'auto': bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU.
    'bf16_if_native': bf16 where the device computes it natively (CUDA with bf16, a CPU with
    ``NATIVE_BF16_CPU_FLAGS``), fp32 elsewhere."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16_if_native":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else bool(cpu_native_bf16())
        return torch.bfloat16 if native else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def precision_note(amp: str, device: torch.device) -> str:
    """What --amp chose on this device and why, for a run's first lines: 'bf16', 'fp32', or with
    bf16_if_native e.g. 'bf16 (amp=bf16_if_native: this CPU has avx512_bf16)'."""
    dtype = amp_dtype(amp, device)
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if amp != "bf16_if_native" or device.type == "cuda":
        return name
    native = cpu_native_bf16()
    if native:
        return f"{name} (amp=bf16_if_native: this CPU has {'/'.join(native)})"
    return (f"{name} (amp=bf16_if_native: this CPU lacks {' and '.join(NATIVE_BF16_CPU_FLAGS)}, where bf16 "
            "would be emulated and slower; --amp=bf16 forces it)")


def to_device(
    batch: Mapping[str, Any], device: torch.device, keys: Collection[str] | None = None
) -> Dict[str, Any]:
    """The batch with its tensors (only those named in ``keys``, if given) moved to ``device``; its masks
    (``seg_bev``, ``valid_bev``: uint8 from the loader) become float32 there, for the losses and metrics."""
    from bevtrain.data.dataset import MASK_KEYS

    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and (keys is None or k in keys):
            v = v.to(device, non_blocking=True)
            if k in MASK_KEYS:
                v = v.float()  # on the device: the host sends a quarter of the bytes
        out[k] = v
    return out


def forward(model: torch.nn.Module, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Run the model on a batch (batch contract of README.md); radar/lidar only when present."""
    return model(
        batch["images"], batch["pix_T_cams"], batch["cams_T_ref"],
        radar=batch.get("radar"), radar_count=batch.get("radar_count"),
        lidar=batch.get("lidar"), lidar_count=batch.get("lidar_count"),
    )


# -- CUDA fast paths and compilation (shared by training, evaluation and the benchmarks) ------------
def configure_cuda(device: torch.device, deterministic: bool = False) -> None:
    """Settings that are faster on CUDA and need no measurement to be safe.

    cudnn.benchmark picks the fastest convolution algorithms for the (fixed) input shapes; TF32
    runs fp32 matrix products and convolutions on the tensor cores (fp32 range, 10-bit mantissa;
    autocast's bf16 has 7). ``deterministic`` keeps cudnn's algorithm choice fixed instead.
    No-op on other devices.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile(model)``; the result shares parameters with ``model`` (save ``model``'s state).

    The sparse lift's data-dependent shapes are graph breaks: the encoder and the BEV decoder
    are compiled around it. ConfigError for a backend torch does not know.
    """
    from torch import _dynamo

    known = _dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(
            f"flag 'compile_backend': unknown torch.compile backend {backend!r}; this torch has "
            f"{', '.join(sorted(known))}"
        )
    return torch.compile(model, backend=backend)


# -- optimisation (training) ---------------------------------------------------------------------------
def build_optimizer(cfg: Mapping[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def build_scheduler(cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer):
    """Simple-BEV's schedule (None without use_scheduler): linear one-cycle over max_iters + 100 steps,
    the spare steps keeping the last step in range."""
    if not cfg["use_scheduler"]:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg["lr"], total_steps=cfg["max_iters"] + 100, pct_start=cfg["pct_start"],
        cycle_momentum=False, anneal_strategy="linear",
    )


def build_precision(amp: str, device: torch.device):
    """``(autocast, scaler, dtype)``: a callable giving the autocast context for --amp (a null context
    for fp32), the GradScaler (enabled for fp16 only) and the autocast dtype (None = fp32)."""
    import contextlib

    dtype = amp_dtype(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    return autocast, scaler, dtype
