"""A run's folders and what they hold besides checkpoints and events: config.yaml, version.txt,
command.txt, train_log.jsonl, and the lines that tell the user what to do next."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Mapping, Tuple

import bevtrain
from bevtrain.config import Config, dump_yaml, run_name


def code_version() -> str:
    """``bevtrain <version>`` plus ``git describe`` when the code lives in a git checkout."""
    version = f"bevtrain {bevtrain.__version__}"
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            desc = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            if desc:
                version += f", git {desc}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def claim_run_name(cfg: Mapping[str, Any], hhmmss: str | None = None) -> Tuple[str, str]:
    """A new run's name and the clock's name for it (they differ when that one was taken), its
    checkpoint and log folders created here, exclusively.

    Runs started in the same second (array jobs, sweeps) get the same name from the clock; making the
    folder is the claim, so a check-then-create race cannot hand one folder to two runs. ``os.mkdir``
    is atomic on local disks and on NFS alike: a name whose folder exists already gets ``_2``, ``_3``...
    """
    base = run_name(cfg, hhmmss or time.strftime("%H:%M:%S"))
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}_{n}"
        claimed = []
        try:
            for parent in (Path(cfg["ckpt_dir"]), Path(cfg["log_dir"])):
                if parent.resolve() in [c.parent.resolve() for c in claimed]:
                    continue  # ckpt_dir == log_dir: one folder serves both
                parent.mkdir(parents=True, exist_ok=True)
                (parent / name).mkdir()
                claimed.append(parent / name)
            return name, base
        except FileExistsError:
            for folder in claimed:  # the other half of this name is someone else's: give ours back
                folder.rmdir()
    raise RuntimeError(f"no free run name {base}_N under {cfg['ckpt_dir']} and {cfg['log_dir']}")


def write_run_info(folders: List[Path], cfg: Config, version: str, step: int) -> None:
    command = shlex.join([sys.executable, *sys.argv])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(dump_yaml(cfg))
        (folder / "version.txt").write_text(version + "\n")
        with open(folder / "command.txt", "a") as f:  # one line per launch (resumes append)
            f.write(f"[step {step}] {command}\n")


def trim_log(path: Path, step: int, val_pending: bool) -> None:
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

    The eval command names the run alone: eval reads data_dir and dset (and every other setting) from
    the run's saved config, so repeating them would only show up as overrides.
    """
    eval_cmd = ["python", "eval_nuscenes.py", f"--init_dir={checkpoint.parent}"]
    return [
        f"[bevtrain] checkpoint: {checkpoint}",
        "[bevtrain] evaluate it on the whole val split (IoU, PNG/GIF pictures, metrics.json):",
        f"    {shlex.join(eval_cmd)}",
        "[bevtrain] watch the curves and BEV pictures in TensorBoard:",
        f"    {shlex.join(['tensorboard', f'--logdir={log_run}'])}",
    ]
