"""Checkpoints: atomic writes, keep-latest pruning, RNG capture, strict weight loading.

A run's checkpoints live in ``<ckpt_dir>/<run>/model-%09d.pth``. Each file is a dict of tensors
and primitive values only, so it loads with ``torch.load(weights_only=True)``:

    model        state dict of the unwrapped model (no 'module.' prefix)
    optimizer    optimiser state dict
    scheduler    LR-scheduler state dict or None
    scaler       GradScaler state dict or None (fp16 only)
    step         optimiser steps completed
    rng          list (one per rank) of {'python', 'numpy', 'torch', 'cuda'} states as tensors
    data         {'train': {'epoch', 'consumed'}, 'val': {'epoch', 'consumed'}}: loader positions
    config       the resolved config (dict of primitives)
    val_pending  True when the run stopped during the validation due at ``step``: the val cursor and
                 RNG are those from before it, and a resumed run redoes it before the next step
    run_name     the run's name; version: code version string; world_size; nonfinite_total

Temp files of a save cut short by ``kill -9`` (``.model-*.pth.tmp.<host>.<pid>``) are never listed
as checkpoints and are removed by the next start once their process is gone.
"""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

import numpy as np
import torch

from bevtrain.disk import TEMP_RE, DiskFullError, atomic_write

CKPT_RE = re.compile(r"^model-(\d{9})\.pth$")
PathLike = Union[str, Path]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or applied; the message names the file."""


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / f"model-{step:09d}.pth"


def list_checkpoints(run_dir: PathLike) -> List[Path]:
    """Finished checkpoints of a run, oldest step first (temp files are never listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def newest_run(ckpt_dir: PathLike) -> Path | None:
    """The run folder in ckpt_dir whose newest checkpoint was written last."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    best, best_t = None, -1.0
    for run in root.iterdir():
        last = latest_checkpoint(run) if run.is_dir() else None
        if last is not None and last.stat().st_mtime > best_t:
            best, best_t = run, last.stat().st_mtime
    return best


def resolve_resume(resume: Union[bool, str], ckpt_dir: PathLike) -> Path:
    """--resume value -> checkpoint file. True = newest run in ckpt_dir; else a run folder,
    a run name under ckpt_dir, or a .pth file."""
    if resume is True:
        run = newest_run(ckpt_dir)
        if run is None:
            root = Path(ckpt_dir)
            empty = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            detail = (f"; run folders there without a completed checkpoint: {_short(empty, 4)} "
                      f"({NO_CHECKPOINT_WHY}); start a new run without --resume") if empty else ""
            raise CheckpointError(f"--resume=True: no run with checkpoints found in {ckpt_dir}{detail}")
        return latest_checkpoint(run)
    p = Path(str(resume))
    if p.is_file():
        return p
    for run in (p, Path(ckpt_dir) / str(resume)):
        if run.is_dir():
            last = latest_checkpoint(run)
            if last is None:
                raise CheckpointError(
                    f"--resume={resume}: no model-*.pth checkpoint in {run} ({NO_CHECKPOINT_WHY}); "
                    f"start a new run without --resume"
                )
            return last
    raise CheckpointError(
        f"--resume={resume}: not a checkpoint file, a run folder, or a run name in {ckpt_dir}"
    )


def resolve_init(init_dir: PathLike, ckpt_dir: PathLike | None = None) -> Path:
    """init_dir -> checkpoint file: a .pth, the newest checkpoint of a run folder, or of a run name in
    ``ckpt_dir``."""
    p = Path(init_dir)
    if p.is_file():
        return p
    if not p.exists() and ckpt_dir is not None and (Path(ckpt_dir) / p).is_dir():
        p = Path(ckpt_dir) / p
    if not p.exists():
        in_ckpt = f" nor a run in {ckpt_dir}" if ckpt_dir is not None else ""
        raise CheckpointError(f"--init_dir={init_dir} does not exist{in_ckpt} (expected a run folder such as "
                              f"checkpoints/<run>, a run name or a model-*.pth file)")
    last = latest_checkpoint(p) if p.is_dir() else None
    if last is None:
        raise CheckpointError(f"--init_dir={init_dir}: no model-*.pth checkpoint there")
    return last


# -- atomic save ----------------------------------------------------------------------------------
# Temp files are named .<file>.tmp.<host>.<pid>: a later start can tell a dead writer's leftovers
# (same host, no such process) from a save in progress, also with ckpt_dir on a shared filesystem.
NO_CHECKPOINT_WHY = "stopped before its first checkpoint, or killed while writing it"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def stale_temp_files(folder: PathLike) -> List[Path]:
    """Temp files in ``folder`` left by a save whose process is gone (killed mid-write). Files of
    live writers, or written on another host, are not listed."""
    folder, host = Path(folder), socket.gethostname()
    if not folder.is_dir():
        return []
    stale = []
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m and m.group("host") in (None, host) and not _pid_alive(int(m.group("pid"))):
            stale.append(p)
    return sorted(stale)


def remove_stale_temp_files(ckpt_dir: PathLike) -> List[Path]:
    """Delete the stale temp files of every run in ``ckpt_dir`` (and in it); returns them."""
    root = Path(ckpt_dir)
    folders = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    removed = []
    for folder in folders:
        for p in stale_temp_files(folder):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_save(obj: Any, path: PathLike, size: int | None = None) -> Path:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a reader (or a
    crash at any moment) sees either the old state or the complete new file, never a torn one.
    A full disk raises DiskFullError (the temp file removed, ``path`` as it was); ``size``: the file's
    expected size for that message (e.g. the previous checkpoint's)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write, f"checkpoint {Path(path).name}", size)


def load_checkpoint(
    path: PathLike, map_location: Any = "cpu", pick: str = "--resume=<file.pth>"
) -> Dict[str, Any]:
    """``pick``: how the command that reads it chooses another checkpoint, for the error message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a bevtrain checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); delete it or pick another file with {pick}"
        ) from e
    if isinstance(ckpt, dict) and "model" not in ckpt and "model_state_dict" in ckpt:
        return simplebev_checkpoint(ckpt, path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} holds no 'model' state dict")
    return ckpt


def simplebev_checkpoint(raw: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """A file written by Simple-BEV's ``saverloader.save`` (``model_state_dict``, names maybe with
    DataParallel's ``module.``; no config, no step but the file name's) in our checkpoint layout,
    marked ``format='simplebev'``: its weights keep Simple-BEV's names until
    ``bevtrain.model.simplebev_compat.convert_state_dict`` maps them onto a model."""
    m = CKPT_RE.match(path.name)
    return {
        "format": "simplebev",
        "model": strip_module_prefix(raw["model_state_dict"]),
        "step": int(m.group(1)) if m else 0,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "config": None,
    }


def is_simplebev(ckpt: Dict[str, Any]) -> bool:
    return ckpt.get("format") == "simplebev"


class CheckpointManager:
    """Saves ``model-%09d.pth`` into one run folder and keeps the ``keep_latest`` newest."""

    def __init__(self, run_dir: PathLike, keep_latest: int = 1):
        self.run_dir = Path(run_dir)
        self.keep_latest = max(1, int(keep_latest))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in stale_temp_files(self.run_dir):  # left by a killed writer
            stale.unlink(missing_ok=True)

    def save(self, state: Dict[str, Any], step: int) -> Path:
        before = self.latest()
        try:
            path = atomic_save(state, checkpoint_path(self.run_dir, step), before and before.stat().st_size)
        except DiskFullError as e:
            stands = (f"the checkpoint of step {int(CKPT_RE.match(before.name).group(1))} ({before}) stands"
                      if before else "no earlier checkpoint of this run exists")
            raise DiskFullError(
                f"{e}; nothing was overwritten: {stands}. Free space, then continue with "
                f"python train_nuscenes.py --resume={self.run_dir}"
            ) from None
        for old in list_checkpoints(self.run_dir)[: -self.keep_latest]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)


# -- RNG state as tensors (so weights_only loading accepts it) -------------------------------------
def capture_rng() -> Dict[str, Any]:
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(version), "mt": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# -- strict weight loading -------------------------------------------------------------------------
def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Checkpoints of DataParallel/DDP models carry 'module.'; ours never do."""
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def load_weights(
    model: torch.nn.Module,
    state_dict: Dict[str, torch.Tensor],
    ignore_load: Sequence[str] | None = None,
    source: PathLike = "checkpoint",
) -> List[str]:
    """Load strictly: every model key must come from the checkpoint and every checkpoint key
    must be used, except names starting with an ``ignore_load`` prefix (skipped on both sides).
    Returns the skipped names. Mismatches raise CheckpointError listing them."""
    prefixes = tuple(ignore_load or ())
    state_dict = strip_module_prefix(state_dict)
    model_keys = set(model.state_dict())
    ignored = sorted(k for k in set(state_dict) | model_keys if prefixes and k.startswith(prefixes))
    wanted = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
    missing = sorted(k for k in model_keys - set(wanted) if not (prefixes and k.startswith(prefixes)))
    unexpected = sorted(set(wanted) - model_keys)
    shapes = model.state_dict()
    mismatched = sorted(k for k in set(wanted) & model_keys if wanted[k].shape != shapes[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {_short(keys)}")
        raise CheckpointError(
            f"{source} does not match the model: " + "; ".join(parts)
            + ". Pass --ignore_load=<prefix> (or a list) to skip parameters on purpose."
        )
    model.load_state_dict(wanted, strict=not prefixes)
    return ignored


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
