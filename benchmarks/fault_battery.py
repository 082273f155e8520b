"""Fault battery: signals, crashes and killed saves against a real training process.

Runs ``train_nuscenes.py`` of a given checkout (``--repo``, default this one) in subprocesses, each
in its own process group (as a batch scheduler or a terminal starts it), on the quickstart preset
cut down to a dozen steps on a synthetic set, with one data-loader worker. Signals go to the whole
group (``os.killpg``), the way Slurm pre-emption and Ctrl-C reach a job. The triggers are log
lines, so the battery runs unchanged against an old checkout; the exact-moment versions live in
tests/test_faults.py.

Cases (the reference is the same run uninterrupted, saving every step):
  1  SIGTERM after the step-5 line, three tries: exit code, is a checkpoint of a completed step left?
  1b SIGTERM while the first checkpoint is being written (torch.save slowed down by a wrapper)
  2  SIGINT just after the step-5 line (so in step 6): BatchNorm buffers of the checkpoint against the
     reference's step-5 checkpoint; then resume and compare train and val curves with the reference
  3  SIGINT just after the step-8 line (so during the validation at step 8): the val cursor saved,
     then resume and compare the curves
  7a every CAM_FRONT image truncated (a read error at step 0): checkpoints written, --resume advice
  7b kill -9 during the first save: what --resume=True says, and is the temp file left after a new run
  7c config messages: --learning_rate, YAML key lerning_rate, --res_scale=0

Usage: python benchmarks/fault_battery.py [--repo DIR] [--data_dir DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]

# torch.save slowed down for checkpoint files only: half the file, a line on stdout, then a pause
SLOW_SAVE = r"""
import io, runpy, sys, time, torch
real_save = torch.save
def slow_save(obj, f, *a, **k):
    name = getattr(f, "name", str(f))
    if ".model-" not in str(name):
        return real_save(obj, f, *a, **k)
    buf = io.BytesIO()
    real_save(obj, buf, *a, **k)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("SAVING", flush=True)
    for _ in range(40):
        time.sleep(0.05)
    f.write(data[len(data) // 2:])
torch.save = slow_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Run:
    """One training process in its own process group; stdout and stderr merged, read line by line."""

    def __init__(self, repo: Path, flags: dict, cwd: Path, slow_save: bool = False):
        args = [f"--{k}={v}" for k, v in flags.items()]
        script = str(repo / "train_nuscenes.py")
        cmd = [sys.executable, "-u"] + (["-c", SLOW_SAVE, script] if slow_save else [script]) + args
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 300) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            line = self.proc.stdout.readline()
            if not line:
                return False
            self.lines.append(line)
            if re.search(pattern, line):
                return True
        return False

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 300) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def flags_for(repo: Path, data_dir: str, root: Path, **over) -> dict:
    flags = dict(config=str(repo / "configs" / "quickstart.yaml"), data_dir=data_dir, dset="mini",
                 max_iters=12, log_freq=1, val_freq=4, val_batches=4, save_freq=100, viz_freq=0,
                 keep_latest=100, nworkers=1, log_dir=str(root / "logs"), ckpt_dir=str(root / "ckpt"))
    flags.update(over)
    return flags


def only_run(ckpt_dir: Path) -> Path | None:
    runs = [p for p in Path(ckpt_dir).iterdir() if p.is_dir()] if Path(ckpt_dir).is_dir() else []
    return runs[0] if len(runs) == 1 else None


def checkpoints(run: Path | None) -> list[Path]:
    return sorted(run.glob("model-*.pth")) if run else []


def load(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def records(log_dir: Path, run_name: str) -> list[dict]:
    path = Path(log_dir) / run_name / "train_log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def curve_diff(ref: list[dict], got: list[dict], split: str) -> dict:
    a = {r["step"]: r["loss"] for r in ref if r["split"] == split}
    b = {}
    for r in got:  # the resumed run appends: the newest record of a step counts
        if r["split"] == split:
            b[r["step"]] = r["loss"]
    diffs = [abs(a[s] - b[s]) for s in a if s in b]
    return {"steps_ref": sorted(a), "steps_got": sorted(b), "max_abs_diff": max(diffs) if diffs else None}


def buffer_diff(ref: dict, got: dict) -> dict:
    nbt = [(k, int(got["model"][k]), int(ref["model"][k]))
           for k in ref["model"] if k.endswith("num_batches_tracked")]
    stats = max((got["model"][k].float() - ref["model"][k].float()).abs().max().item()
                for k in ref["model"] if k.endswith(("running_mean", "running_var")))
    first = nbt[0] if nbt else None
    return {"num_batches_tracked(got, ref)": first[1:] if first else None,
            "running_stats_max_abs_diff": stats}


def tail(text: str, n: int = 6) -> list[str]:
    return [x for x in text.strip().splitlines() if x.strip()][-n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(HERE))
    ap.add_argument("--data_dir", default=os.environ.get("BEVTRAIN_TEST_DATA", "data/synthetic"))
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="", help="comma-separated case ids to run (default: all)")
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    data_dir = str(Path(args.data_dir).resolve())
    work = Path(tempfile.mkdtemp(prefix="fault_battery_"))
    want = set(args.only.split(",")) if args.only else None
    result: dict = {"repo": str(repo)}

    def run_case(name: str) -> bool:
        return want is None or name in want

    ref_root = work / "ref"
    ref = None
    if want is None or want & {"2", "3"}:
        r = Run(repo, flags_for(repo, data_dir, ref_root, save_freq=1), work)
        rc = r.finish()
        assert rc == 0, r.output[-3000:]
        ref = only_run(ref_root / "ckpt")
        result["reference"] = {"rc": rc, "checkpoints": len(checkpoints(ref))}

    if run_case("1"):
        tries = []
        for i in range(3):
            root = work / f"c1_{i}"
            r = Run(repo, flags_for(repo, data_dir, root), work)
            r.wait_for(r"step\s+5/")
            r.signal_group(signal.SIGTERM)
            rc = r.finish()
            run = only_run(root / "ckpt")
            ck = [(p.name, (load(p) or {}).get("step")) for p in checkpoints(run)]
            tries.append({"rc": rc, "checkpoints": ck, "worker_killed": "killed by signal" in r.output,
                          "save_failed": "could not save" in r.output, "tail": tail(r.output)})
        result["1_sigterm_after_step5"] = tries

    if run_case("1b"):
        root = work / "c1b"
        r = Run(repo, flags_for(repo, data_dir, root, save_freq=3), work, slow_save=True)
        r.wait_for(r"^SAVING")
        r.signal_group(signal.SIGTERM)
        rc = r.finish()
        run = only_run(root / "ckpt")
        ck = [(p.name, (load(p) or {}).get("step")) for p in checkpoints(run)]
        tmp = [p.name for p in run.glob(".*tmp*")] if run else []
        result["1b_sigterm_during_save"] = {"rc": rc, "checkpoints": ck, "temp_files": tmp,
                                            "worker_killed": "killed by signal" in r.output,
                                            "tail": tail(r.output)}

    for case, line, sig in (("2", r"step\s+5/", signal.SIGINT), ("3", r"step\s+8/", signal.SIGINT)):
        if not run_case(case):
            continue
        root = work / f"c{case}"
        r = Run(repo, flags_for(repo, data_dir, root), work)
        r.wait_for(line)
        time.sleep(0.1)
        r.signal_group(sig)
        rc = r.finish()
        run = only_run(root / "ckpt")
        ck = checkpoints(run)
        entry: dict = {"rc": rc, "checkpoints": [p.name for p in ck], "tail": tail(r.output)}
        if ck:
            got = load(ck[-1])
            entry["step"] = got["step"]
            entry["data"] = got["data"]
            entry["val_pending"] = got.get("val_pending")
            ref_ck = load(ref / f"model-{got['step']:09d}.pth")
            entry["reference_data_at_that_step"] = ref_ck["data"]
            entry.update(buffer_diff(ref_ck, got))
            r2 = Run(repo, {"resume": str(run), "log_dir": str(root / "logs")}, work)
            entry["resume_rc"] = r2.finish()
            a, b = records(ref_root / "logs", ref.name), records(root / "logs", run.name)
            entry["train_curve"] = curve_diff(a, b, "train")
            entry["val_curve"] = curve_diff(a, b, "val")
        result[{"2": "2_sigint_mid_step", "3": "3_sigint_during_val"}[case]] = entry

    if run_case("7a"):
        data_copy = work / "data_bad"
        shutil.copytree(data_dir, data_copy)
        for jpg in (data_copy / "samples" / "CAM_FRONT").glob("*.jpg"):
            jpg.write_bytes(jpg.read_bytes()[:200])
        root = work / "c7a"
        r = Run(repo, flags_for(repo, str(data_copy), root, nworkers=0), work)
        rc = r.finish()
        run = only_run(root / "ckpt")
        result["7a_read_error_at_step0"] = {
            "rc": rc, "checkpoints": [p.name for p in checkpoints(run)],
            "suggests_resume": "--resume" in r.output,
            "messages": [x for x in r.output.splitlines() if x.startswith("[bevtrain]")][-3:],
        }

    if run_case("7b"):
        root = work / "c7b"
        r = Run(repo, flags_for(repo, data_dir, root, save_freq=2), work, slow_save=True)
        r.wait_for(r"^SAVING")
        r.signal_group(signal.SIGKILL)
        r.finish()
        run = only_run(root / "ckpt")
        tmp_after_kill = [p.name for p in run.glob(".*tmp*")]
        resume = {"resume": "True", "ckpt_dir": str(root / "ckpt"), "log_dir": str(root / "logs")}
        r2 = Run(repo, resume, work)
        rc2 = r2.finish()
        r3 = Run(repo, flags_for(repo, data_dir, root, max_iters=1, do_val=False), work)
        rc3 = r3.finish()
        result["7b_kill9_during_first_save"] = {
            "temp_after_kill": tmp_after_kill, "resume_true_rc": rc2, "resume_true_says": tail(r2.output, 2),
            "new_run_rc": rc3, "temp_after_new_run": [p.name for p in run.glob(".*tmp*")],
        }

    if run_case("7c"):
        code = (
            "import sys, yaml\n"
            "from bevtrain.config import resolve_config, ConfigError\n"
            "open(sys.argv[1], 'w').write('lerning_rate: 1.0e-3\\n')\n"
            "for flags in ({'learning_rate': 1e-3}, {'config': sys.argv[1]}, {'res_scale': 0}):\n"
            "    try:\n"
            "        resolve_config(flags)\n"
            "        print('accepted')\n"
            "    except ConfigError as e:\n"
            "        print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(work / "typo.yaml")], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(repo)}, cwd=work).stdout
        result["7c_config_messages"] = out.strip().splitlines()

    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
