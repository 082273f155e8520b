"""Every GPU figure from one prepared command: model speed, end-to-end training, evaluation.

    python3 benchmarks/gpu.py --out DIR            # on the GPU machine, about 6-7 minutes
    python benchmarks/gpu.py --dry --out DIR       # CPU, tiny shapes: every code path, no figures

Stages, each guarded (a failure, out-of-memory or timeout becomes a row saying so, the rest
still runs) and each written to DIR/results.{md,json} as soon as it ends:

1. data: the synthetic set, generated here with all cores (``python -m bevtrain.synthetic``;
   default 10 scenes x 40 keyframes at 1600x900: 320 train, 80 val samples), unless --data_dir
   names an existing nuScenes-format dataroot.
2. model: the paper model (res101, 448x800, 6 cameras, 200x8x200, batch 8): forward, loss,
   backward, clipping and AdamW step, each (precision, lift) in its own process
   (benchmarks/model.py's ``run_row``): fp32 (TF32 on, as training), bf16 autocast,
   bf16 + channels_last, bf16 + torch.compile; sparse lift and grid_sample reference lift; and
   bf16 / sparse with configs/multiclass.yaml's eight classes (vehicle, pedestrian, six map layers),
   its time and memory against the vehicle row (goal <= 1.05x time).
   ms/step (median), samples/s, first step (compilation, cudnn search), peak GPU memory.
3. train: ``configs/rgb.yaml`` (batch 8 x grad_acc 5) for 60 steps on the synthetic set with
   nworkers = CPU cores, no validation, through bevtrain.train.main itself. Over the steps
   after the first 10: samples/s, fraction of step time waiting for data, GPU utilisation
   (NVML through pynvml, else nvidia-smi, sampled every 0.5 s) and memory.
4. eval: bevtrain.evaluate on the whole val split with the checkpoint of stage 3 (batch 8,
   nworkers = cores): samples/s end to end (loader start included) and of the model alone.

A global deadline (--budget, seconds) shrinks the later stages' time limits so the command ends
in time; rows that no longer fit are reported as skipped. Scratch files (data set, runs,
checkpoints) go to --work, results only to --out: results.md, results.json and the logs.

On the GPU machine, where nuscenes-devkit, pyquaternion, cachetools, fire and termcolor are
missing, first fetch their wheels here (``bash benchmarks/gpu_wheels.sh``: into .whl/) and run

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT

--dry runs on the CPU in seconds: a tiny synthetic set (2 keyframes, 400x225), the model rows
at res18 / 56x100 / 32x4x32 / batch 2 with torch.compile's 'eager' backend (traces the model as
the real run does, compiles nothing), 3 training steps at the same tiny shapes, evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import model as model_bench  # noqa: E402  (benchmarks/model.py)

FULL_ROWS = (  # (mode, lift, classes) by priority: training's own setting, the multi-class head and the
    ("bf16", "sparse", "vehicle"),  # lift comparison first; when time runs out the last rows are skipped
    ("bf16", "sparse", "multiclass"),
    ("bf16", "reference", "vehicle"),
    ("fp32", "sparse", "vehicle"),
    ("bf16_channels_last", "sparse", "vehicle"),
    ("bf16_compile", "sparse", "vehicle"),
    ("fp32", "reference", "vehicle"),
    ("bf16_channels_last", "reference", "vehicle"),
    ("bf16_compile", "reference", "vehicle"),
)


def parse_row(item: str):
    """'mode:lift' or 'mode:lift:classes' -> (mode, lift, classes)."""
    mode, lift, *rest = item.split(":")
    return mode, lift, (rest[0] if rest else "vehicle")

PROFILES: Dict[str, Dict[str, Any]] = {
    "full": dict(
        device="cuda",
        synthetic=dict(keyframes=40, width=1600, height=900),
        model=dict(setting="paper", batch=8, iters=20, warmup=2, row_budget_s=5.0, row_timeout_s=75.0,
                   compile_timeout_s=150.0, compile_backend="inductor", stage_s=300.0, threads=0),
        train=dict(steps=60, warmup_steps=10, log_freq=10, flags=dict(), grace_s=45.0),
        eval=dict(batch_size=8, stage_s=90.0, min_s=30.0),
        budget_s=450.0,
    ),
    "dry": dict(
        device="cpu",
        synthetic=dict(keyframes=2, width=400, height=225),
        model=dict(setting="tiny", batch=2, iters=2, warmup=1, row_budget_s=5.0, row_timeout_s=120.0,
                   compile_timeout_s=180.0, compile_backend="eager", stage_s=900.0, threads=1),
        train=dict(steps=3, warmup_steps=1, log_freq=1, grace_s=60.0,
                   flags=dict(encoder_type="res18", res_scale=0.25, Z=32, Y=4, X=32, latent_dim=32,
                              batch_size=2, grad_acc=2)),
        eval=dict(batch_size=2, stage_s=180.0, min_s=120.0),
        budget_s=1800.0,
    ),
}
# Stage limits are cut so that later stages keep at least this much of the deadline.
RESERVE_S = {"model": 150.0, "train": 40.0, "eval": 0.0}
MIN_ROW_S = 25.0  # a model row with less time than this left is skipped


def say(msg: str) -> None:
    print(msg, flush=True)


# -- GPU utilisation ---------------------------------------------------------------------------------
class GpuSampler:
    """Samples GPU utilisation (%) and memory used (MiB) every ``interval`` s in a thread, with the
    number of lines ``watch`` (a log file) had at that moment, so samples can be matched to steps.

    Source: NVML through pynvml, else ``nvidia-smi``, else nothing (``source`` says which)."""

    def __init__(self, watch: Path | None = None, interval: float = 0.5, gpu_index: int = 0):
        """``watch`` may be a glob pattern (the run folder is named when training starts)."""
        self.watch, self.interval, self.gpu_index = watch, interval, gpu_index
        self.samples: List[Dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._read = self._pick_source()

    def _pick_source(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)

            def read_nvml():
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                return float(util), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

            read_nvml()
            self.source = "nvml"
            return read_nvml
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", f"--id={self.gpu_index}", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits"]

            def read_smi():
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, mem = out.strip().splitlines()[0].split(",")
                return float(util), float(mem)

            try:
                read_smi()
                self.source = "nvidia-smi"
                return read_smi
            except Exception:
                pass
        self.source = "none"
        return None

    def _lines(self) -> int:
        if self.watch is None:
            return 0
        pattern = str(self.watch)
        found = sorted(Path("/").glob(pattern.lstrip("/"))) if "*" in pattern else [self.watch]
        try:
            with open(found[0], "rb") as f:
                return sum(1 for _ in f)
        except (OSError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = {"t": time.perf_counter(), "lines": self._lines()}
            if self._read is not None:
                try:
                    sample["util"], sample["mem_mb"] = self._read()
                except Exception:
                    pass
            self.samples.append(sample)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self, lo_lines: int = 0, hi_lines: int = 1 << 30) -> Dict[str, Any]:
        """Mean/peak over samples taken while the log had lo_lines <= lines < hi_lines."""
        picked = [s for s in self.samples if lo_lines <= s["lines"] < hi_lines and "util" in s]
        if not picked:
            return {"gpu_util_source": self.source, "gpu_util_samples": 0}
        utils = [s["util"] for s in picked]
        return {
            "gpu_util_source": self.source,
            "gpu_util_samples": len(picked),
            "gpu_util_mean": sum(utils) / len(utils),
            "gpu_util_min": min(utils),
            "gpu_mem_used_peak_mb": max(s["mem_mb"] for s in picked),
        }


# -- child processes -----------------------------------------------------------------------------------
def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(cmd: List[str], log: Path, timeout_s: float, grace_s: float = 0.0) -> Dict[str, Any]:
    """Run cmd with stdout+stderr to ``log``; at ``timeout_s`` send SIGTERM (the training loop
    checkpoints and stops), after ``grace_s`` more kill its whole process group.
    Returns rc, wall_s, terminated (SIGTERM sent), killed, and the last stdout line."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(),
                                start_new_session=True)
        terminated = killed = False
        try:
            proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            terminated = True
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=max(grace_s, 1.0))
            except subprocess.TimeoutExpired:
                killed = True
        if killed or proc.poll() is None:
            killed = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        else:  # leftover loader workers of a finished child
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lines = log.read_text(errors="replace").strip().splitlines()
    results = [x[len(RESULT_MARKER):] for x in lines if x.startswith(RESULT_MARKER)]
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "terminated": terminated,
            "killed": killed, "last_line": lines[-1] if lines else "",
            "result": json.loads(results[-1]) if results else None}


RESULT_MARKER = "GPU_BENCH_RESULT "  # a child's last word: this prefix, then its result as JSON


def _timed_out(run: Dict[str, Any]) -> str:
    return " (timed out)" if run["terminated"] else ""


def child_train(spec: Dict[str, Any]) -> None:
    import torch

    from bevtrain.train import StoppedBySignal
    from bevtrain.train import main as train_main

    try:
        summary = train_main(**spec["flags"])
    except StoppedBySignal as stop:  # the time limit's SIGTERM: a checkpoint was saved, report the run
        summary = stop.summary
    keys = ("run_name", "step", "status", "log_dir", "ckpt_dir", "checkpoint", "seconds")
    out = {k: summary[k] for k in keys}
    if torch.cuda.is_available():
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["max_memory_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print(RESULT_MARKER + json.dumps(out), flush=True)


def child_eval(spec: Dict[str, Any]) -> None:
    import torch

    from bevtrain.evaluate import evaluate

    s = evaluate(**spec["kwargs"])
    out = {k: s.get(k) for k in ("samples", "seconds", "samples_per_s", "model_samples_per_s", "precision",
                                  "device", "iou", "batch_size_per_process", "step")}
    if torch.cuda.is_available():
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(RESULT_MARKER + json.dumps(out), flush=True)


# -- stages -----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, profile: Dict[str, Any]):
        self.args, self.p = args, profile
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cores = os.cpu_count() or 1
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + (args.budget or profile["budget_s"])
        self.device = profile["device"]
        self.results: Dict[str, Any] = {"profile": "dry" if args.dry else "full", "meta": {}, "data": {},
                                        "model": [], "train": {}, "eval": {}}

    def left(self, stage: str) -> float:
        return self.deadline - time.perf_counter() - RESERVE_S.get(stage, 0.0)

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.t_start
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "results.md").write_text(render_markdown(self.results))

    # 0 ---------------------------------------------------------------------------------------------
    def meta(self) -> None:
        import numpy
        import torch

        m: Dict[str, Any] = {
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cpu_cores": self.cores, "device": self.device, "cuda_available": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if torch.cuda.is_available():
            m["gpu"] = torch.cuda.get_device_name(0)
            m["cuda"] = torch.version.cuda
            m["gpu_mem_total_mb"] = torch.cuda.get_device_properties(0).total_memory / 2**20
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True)
            m["nvidia_smi"] = q.stdout.strip()
        missing = []
        for mod in ("nuscenes.nuscenes", "pyquaternion", "cv2", "yaml", "tensorboard"):
            try:
                __import__(mod)
            except Exception as exc:  # ImportError, or a numpy-ABI error inside the package
                missing.append(f"{mod} ({type(exc).__name__}: {str(exc)[:120]})")
        m["missing_imports"] = missing
        if missing:
            say(f"[gpu-bench] cannot import {', '.join(missing)}: training and evaluation will fail. Fetch "
                f"the wheels with benchmarks/gpu_wheels.sh and install them as this file's docstring says")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("[gpu-bench] no CUDA device here: run with --dry for the CPU check")
        self.results["meta"] = m
        say(f"[gpu-bench] {json.dumps(m)}")

    # 1 ---------------------------------------------------------------------------------------------
    def data(self) -> Path | None:
        d: Dict[str, Any] = {}
        self.results["data"] = d
        if self.args.data_dir:
            root = Path(self.args.data_dir).resolve()
            d.update(source="given", data_dir=str(root))
            return root
        syn = dict(self.p["synthetic"])
        if self.args.keyframes:
            syn["keyframes"] = self.args.keyframes
        root = self.work / "synthetic"
        if root.exists():
            shutil.rmtree(root)
        cmd = [sys.executable, "-m", "bevtrain.synthetic", "--out", str(root), "--keyframes",
               str(syn["keyframes"]), "--width", str(syn["width"]), "--height", str(syn["height"]),
               "--workers", str(self.cores)]
        say(f"[gpu-bench] data: generating the synthetic set ({syn['keyframes']} keyframes x 10 scenes, "
            f"{syn['width']}x{syn['height']}) with {self.cores} processes")
        run = run_logged(cmd, self.out / "synthetic.log", timeout_s=max(self.left("model") - 60, 30.0))
        d.update(source="generated", data_dir=str(root), seconds=run["wall_s"], **syn,
                 samples_train=8 * syn["keyframes"], samples_val=2 * syn["keyframes"])
        if run["rc"] != 0:
            d["error"] = f"generator rc={run['rc']}{_timed_out(run)}: {run['last_line']}"
            say(f"[gpu-bench] data: FAILED {d['error']}")
            return None
        say(f"[gpu-bench] data: {run['last_line']}")
        return root

    # 2 ---------------------------------------------------------------------------------------------
    def model(self) -> None:
        mp = self.p["model"]
        rows = self.args.rows if self.args.rows is not None else [":".join(r) for r in FULL_ROWS]
        stage_end = time.perf_counter() + mp["stage_s"]
        for item in rows:
            mode, lift, classes = parse_row(item)
            spec = dict(setting=mp["setting"], mode=mode, lift=lift, iters=mp["iters"], warmup=mp["warmup"],
                        batch=mp["batch"], optimizer=True, budget_s=mp["row_budget_s"],
                        compile_backend=mp["compile_backend"], classes=classes)
            left = min(self.left("model"), stage_end - time.perf_counter())
            if left < MIN_ROW_S:
                row = dict(spec, error=f"skipped: time budget ({left:.0f} s left)")
            else:
                limit = mp["compile_timeout_s"] if mode.endswith("_compile") else mp["row_timeout_s"]
                say(f"[gpu-bench] model: {mode} / {lift} lift / {classes} (limit {min(limit, left):.0f} s)")
                row = model_bench.run_row(spec, self.device, min(limit, left), threads=mp["threads"],
                                          log=str(self.out / "model.log"))
            self.results["model"].append(row)
            say("[gpu-bench] model:   " + (row["error"] if "error" in row else (
                f"{row['ms_per_iter']:.1f} ms/step, {row['samples_per_s']:.1f} samples/s, peak "
                f"{row['peak_mem_mb']:.0f} MB, first step {row['first_ms']:.0f} ms, {row['iters']} timed")))
            self.save()

    # 3 ---------------------------------------------------------------------------------------------
    def train(self, data_dir: Path | None) -> str | None:
        tp = self.p["train"]
        t: Dict[str, Any] = {}
        self.results["train"] = t
        if data_dir is None:
            t["error"] = "skipped: no data set"
            return None
        steps = self.args.steps or tp["steps"]
        log_dir, ckpt_dir = self.work / "runs" / "logs", self.work / "runs" / "checkpoints"
        flags = dict(config=str(REPO / "configs" / "rgb.yaml"), data_dir=str(data_dir), dset="mini",
                     max_iters=steps, log_freq=tp["log_freq"], do_val=False, save_freq=10**9, viz_freq=0,
                     nworkers=self.cores, encoder_weights="none", exp_name="gpubench", device=self.device,
                     log_dir=str(log_dir), ckpt_dir=str(ckpt_dir), cache_dir=str(self.work / "index-cache"))
        flags.update(tp["flags"])
        t.update(steps_asked=steps, warmup_steps=tp["warmup_steps"], flags=flags)
        for d in (log_dir, ckpt_dir):
            shutil.rmtree(d, ignore_errors=True)
        limit = max(self.left("train"), 30.0)
        say(f"[gpu-bench] train: rgb preset, {steps} steps, nworkers {self.cores} (limit {limit:.0f} s)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", "train",
               "--_spec", json.dumps({"flags": flags})]

        with GpuSampler(watch=log_dir / "*" / "train_log.jsonl") as sampler:
            run = run_logged(cmd, self.out / "train.log", timeout_s=limit, grace_s=tp["grace_s"])
        result = run["result"] or {}
        t.update(wall_s=run["wall_s"], rc=run["rc"], **result)
        if run["terminated"]:
            killed = " and killed" if run["killed"] else ""
            t["note"] = f"stopped by SIGTERM at the {limit:.0f} s limit{killed}"
        logs = list(log_dir.glob("*/train_log.jsonl"))
        records = [json.loads(x) for x in logs[0].read_text().splitlines() if x.strip()] if logs else []
        records = [r for r in records if r.get("split") == "train"]
        t.update(train_stats(records, tp["warmup_steps"]))
        n_warm = sum(1 for r in records if r["step"] <= tp["warmup_steps"])
        t.update(sampler.summary(lo_lines=n_warm, hi_lines=len(records)))
        if run["rc"] != 0 and not result:
            t["error"] = f"rc={run['rc']}: {run['last_line'][:300]}"
        say(f"[gpu-bench] train: {json.dumps({k: v for k, v in t.items() if k != 'flags'})}")
        self.save()
        runs = sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []
        return t.get("ckpt_dir") or (str(runs[0]) if runs else None)

    # 4 ---------------------------------------------------------------------------------------------
    def eval(self, ckpt_run: str | None) -> None:
        ep = self.p["eval"]
        e: Dict[str, Any] = {}
        self.results["eval"] = e
        if not ckpt_run or not list(Path(ckpt_run).glob("model-*.pth")):
            e["error"] = "skipped: no checkpoint from the training stage"
            self.save()
            return
        kwargs = dict(init_dir=ckpt_run, batch_size=ep["batch_size"], nworkers=self.cores, viz_every=0,
                      max_viz=0, tensorboard=False, metrics_path=str(self.work / "eval_metrics.json"))
        limit = max(min(ep["stage_s"], self.left("eval")), ep["min_s"])
        say(f"[gpu-bench] eval: val split, batch {ep['batch_size']}, nworkers {self.cores} "
            f"(limit {limit:.0f} s)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", "eval", "--_spec",
               json.dumps({"kwargs": kwargs})]
        sampler = GpuSampler()
        with sampler:
            run = run_logged(cmd, self.out / "eval.log", timeout_s=limit, grace_s=5.0)
        result = run["result"] or {}
        e.update(wall_s=run["wall_s"], rc=run["rc"], **result, **sampler.summary())
        if not result:
            e["error"] = f"rc={run['rc']}{_timed_out(run)}: {run['last_line'][:300]}"
        say(f"[gpu-bench] eval: {json.dumps(e)}")
        self.save()


def train_stats(records: List[Dict[str, Any]], warmup_steps: int) -> Dict[str, Any]:
    """Samples/s and data-wait fraction over the logged windows after ``warmup_steps``.

    Each train record averages data_time and step_time over the steps since the previous record."""
    stats: Dict[str, Any] = {"steps_done": records[-1]["step"] if records else 0}
    prev, steps, data_s, step_s, samples = 0, 0, 0.0, 0.0, 0.0
    for r in records:
        n = r["step"] - prev
        if prev >= warmup_steps and n > 0:
            steps += n
            data_s += r["data_time"] * n
            step_s += r["step_time"] * n
            samples += r["samples_per_s"] * r["step_time"] * n
        prev = r["step"]
    if records:
        first = records[0]
        stats["first_step_s"] = first["step_time"] if first["step"] == 1 else None
    if steps:
        stats.update(steady_steps=steps, samples_per_s=samples / step_s, step_s=step_s / steps,
                     data_wait_fraction=data_s / step_s, last_loss=records[-1]["loss"])
    return stats


# -- the table ---------------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".1f", unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:{spec}}{unit}"


MODE_NAMES = {"fp32": "fp32 (TF32)", "bf16": "bf16 autocast", "channels_last": "fp32 channels_last",
              "bf16_channels_last": "bf16 + channels_last", "bf16_compile": "bf16 + torch.compile"}


def render_markdown(res: Dict[str, Any]) -> str:
    m = res.get("meta", {})
    lines = [f"# benchmarks/gpu.py ({res.get('profile')})", ""]
    lines.append(f"{m.get('gpu', m.get('device', '?'))}, torch {m.get('torch')}, CUDA {m.get('cuda', '-')}, "
                 f"numpy {m.get('numpy')}, Python {m.get('python')}, {m.get('cpu_cores')} CPU cores; "
                 f"{m.get('date', '')}; total {_fmt(res.get('elapsed_s'), '.0f', ' s')}")
    if m.get("missing_imports"):
        lines.append(f"missing imports: {', '.join(m['missing_imports'])}")
    d = res.get("data", {})
    if d:
        lines.append(f"data: {d.get('source')} {d.get('data_dir')}"
                     + (f" ({d['keyframes']} keyframes x 10 scenes, {d['width']}x{d['height']}, "
                        f"{_fmt(d.get('seconds'), '.0f', ' s')})" if d.get("source") == "generated" else "")
                     + (f" ERROR {d['error']}" if d.get("error") else ""))
    lines += ["", "| what | setting | ms/step | samples/s | peak MB | notes |", "|" + "---|" * 6]
    for r in res.get("model", []):
        what = f"model step, {MODE_NAMES.get(r['mode'], r['mode'])}, {r['lift']} lift"
        if r.get("classes", "vehicle") != "vehicle":
            what += f", {r['classes']} ({len(model_bench.class_set(r['classes']))} classes)"
        versus = [q for q in res.get("model", []) if "error" not in q and "error" not in r
                  and q.get("classes", "vehicle") == "vehicle" and r.get("classes", "vehicle") != "vehicle"
                  and (q["mode"], q["lift"], q["setting"]) == (r["mode"], r["lift"], r["setting"])]
        cfg = model_bench.SETTINGS.get(r["setting"], {})
        setting = (f"{cfg.get('encoder_type')} {cfg.get('H')}x{cfg.get('W')} grid "
                   f"{'x'.join(map(str, cfg.get('grid', ())))} batch {r['batch']}")
        if "error" in r:
            lines.append(f"| {what} | {setting} | - | - | - | {r['error']} |")
        else:
            graphs = (f", {r['compiled_graphs']} graphs, {r['graph_breaks']} graph breaks"
                      if "compiled_graphs" in r else "")
            ratio = (f", {r['ms_per_iter'] / versus[0]['ms_per_iter']:.3f}x the time and "
                     f"{r['peak_mem_mb'] / versus[0]['peak_mem_mb']:.3f}x the memory of [vehicle]"
                     if versus else "")
            lines.append(f"| {what} | {setting} | {_fmt(r['ms_per_iter'])} | {_fmt(r['samples_per_s'])} | "
                         f"{_fmt(r['peak_mem_mb'], '.0f')} | first step {_fmt(r['first_ms'], '.0f', ' ms')}, "
                         f"{r['iters']} timed{graphs}{ratio} |")
    t = res.get("train", {})
    if t:
        fl = t.get("flags", {})
        setting = (f"rgb.yaml: {fl.get('encoder_type', 'res101')}, batch {fl.get('batch_size', 8)} x "
                   f"grad_acc {fl.get('grad_acc', 5)}, nworkers {fl.get('nworkers')}")
        notes = [f"{t.get('steps_done', 0)}/{t.get('steps_asked')} steps, stats over "
                 f"{t.get('steady_steps', 0)}"]
        wait = t.get("data_wait_fraction")
        notes.append(f"data wait {_fmt(None if wait is None else 100 * wait, '.1f', ' %')}")
        if t.get("gpu_util_samples"):
            notes.append(f"GPU util {_fmt(t.get('gpu_util_mean'), '.0f', ' %')} mean, "
                         f"{_fmt(t.get('gpu_util_min'), '.0f', ' %')} min ({t['gpu_util_source']}, "
                         f"{t['gpu_util_samples']} samples)")
        else:
            notes.append(f"GPU util - ({t.get('gpu_util_source', 'none')})")
        notes.append(f"first step {_fmt(t.get('first_step_s'), '.1f', ' s')}")
        for k in ("note", "error"):
            if t.get(k):
                notes.append(str(t[k]))
        step_ms = 1000 * t["step_s"] if "step_s" in t else None
        lines.append(f"| train, {t.get('steps_asked')} steps | {setting} | "
                     f"{_fmt(step_ms)} | {_fmt(t.get('samples_per_s'))} | "
                     f"{_fmt(t.get('max_memory_allocated_mb'), '.0f')} | {'; '.join(notes)} |")
    e = res.get("eval", {})
    if e:
        notes = [f"{e.get('samples', '-')} samples in {_fmt(e.get('seconds'), '.1f', ' s')} (loader "
                 f"start-up included), model alone {_fmt(e.get('model_samples_per_s'))} samples/s, "
                 f"{e.get('precision', '-')}"]
        if e.get("gpu_util_samples"):
            notes.append(f"GPU util {_fmt(e.get('gpu_util_mean'), '.0f', ' %')} mean")
        if e.get("error"):
            notes.append(e["error"])
        lines.append(f"| eval, val split | batch {e.get('batch_size_per_process', '-')} | - | "
                     f"{_fmt(e.get('samples_per_s'))} | {_fmt(e.get('max_memory_allocated_mb'), '.0f')} | "
                     f"{'; '.join(notes)} |")
    lines += ["", "Model rows: forward, loss, backward, gradient clipping and AdamW step on random inputs. "
              "ms/step: model rows, one step of `batch` samples (median); train, one optimiser step of "
              f"batch x grad_acc samples (mean over the steps after the first "
              f"{res.get('train', {}).get('warmup_steps', '-')}). peak MB: CUDA "
              "max_memory_allocated (model rows: the row's process; train/eval: the run's); on the CPU "
              "the model row's peak resident set size."]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------------------
def main(argv: List[str] | None = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="results folder: results.md, results.json, logs")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, few steps: checks every code path")
    ap.add_argument("--work", default="/tmp/bevtrain-gpu-bench", help="scratch folder (data set, runs)")
    ap.add_argument("--data_dir", default="", help="an existing nuScenes-format dataroot (no generation)")
    ap.add_argument("--keyframes", type=int, default=0, help="keyframes per synthetic scene (0: profile's)")
    ap.add_argument("--rows", default="", help="model rows as mode:lift[:classes],... (classes: vehicle, the "
                    "default, or multiclass; default: all, see FULL_ROWS; none: no model rows)")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the profile's)")
    ap.add_argument("--budget", type=float, default=0.0, help="deadline in seconds (0: the profile's)")
    ap.add_argument("--_stage", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_spec", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._stage:
        {"train": child_train, "eval": child_eval}[args._stage](json.loads(args._spec))
        return {}
    if not args.out:
        ap.error("--out DIR is required")
    args.rows = [r for r in args.rows.split(",") if r] or None  # None: all
    if args.rows == ["none"]:
        args.rows = []
    for r in args.rows or []:
        mode, lift, classes = parse_row(r)
        known = (mode in model_bench.MODES, lift in model_bench.LIFTS, classes in model_bench.CLASS_SETS)
        if not all(known):
            ap.error(f"--rows: {r!r} is not mode:lift[:classes], mode in {model_bench.MODES}, "
                     f"lift in {model_bench.LIFTS}, classes in {model_bench.CLASS_SETS}")
    bench = Bench(args, PROFILES["dry" if args.dry else "full"])
    bench.meta()
    bench.save()
    data_dir = bench.data()
    bench.save()
    bench.model()
    ckpt_run = bench.train(data_dir)
    bench.eval(ckpt_run)
    bench.save()
    say("\n" + (bench.out / "results.md").read_text())
    return bench.results


if __name__ == "__main__":
    main()
