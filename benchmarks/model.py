"""Segnet forward+backward speed and peak memory, sparse lift vs the grid_sample reference lift.

Settings:
  paper: res101, 448x800 images, 6 cameras, Z/Y/X 200/8/200 (Simple-BEV's paper setting)
  cpu:   res18, res_scale 0.5 -> 112x200 images, 6 cameras, 200/8/200
  tiny:  res18, 56x100 images, 6 cameras, 32/4/32 (checks the code paths in seconds: no figure)
Modes: fp32, bf16 (autocast), channels_last (fp32), bf16_channels_last, bf16_compile
(torch.compile, backend --compile_backend). Classes (--classes): vehicle (Simple-BEV's one channel)
and multiclass (the classes of configs/multiclass.yaml: vehicle, pedestrian and six map layers, with
their losses); with both, the multiclass rows are compared with the vehicle ones (time and memory
ratios). Batch 1 unless --batch; --optimizer adds
gradient clipping and an AdamW step, as one training step does. On CUDA the training loop's
defaults apply (bevtrain.build.configure_cuda: cudnn.benchmark, TF32 for fp32 work).

"ms/iter" is the median wall time; "cpu ms" the median CPU time of all threads (on a shared
machine it is the steadier number). Every (setting, mode, lift) runs in its own subprocess so
that peak memory is its own: CUDA ``max_memory_allocated`` on GPU, peak resident set size
(ru_maxrss) on CPU. A row that fails (out of memory, a compile error, a crash, its --row_timeout)
is reported as such and the others still run; --budget stops timing a row after that many
seconds (at least one timed iteration). "first ms" is the first step (compilation, cudnn's
algorithm search). Inputs are a
nuScenes-like ring of six cameras with random images and random targets; timings include the
loss and the backward pass, not data loading.

  python benchmarks/model.py --settings cpu --iters 3
  python benchmarks/model.py --settings cpu,paper --modes fp32 --iters 1 --json out.json
  python benchmarks/model.py --settings paper --batch 8 --optimizer --modes bf16,bf16_compile
  python benchmarks/model.py --settings paper --modes bf16 --lifts sparse --classes vehicle,multiclass
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bevtrain.build import compile_model, configure_cuda  # noqa: E402
from bevtrain.config import ModelConfig  # noqa: E402
from bevtrain.geometry import Vox_util, pad_intrinsics, rigid_inverse  # noqa: E402
from bevtrain.losses import compute_losses  # noqa: E402
from bevtrain.model import Segnet  # noqa: E402
from bevtrain.model.segnet import LIFTS  # noqa: E402

SETTINGS = {
    "paper": dict(encoder_type="res101", H=448, W=800, grid=(200, 8, 200)),
    "cpu": dict(encoder_type="res18", H=112, W=200, grid=(200, 8, 200)),
    "tiny": dict(encoder_type="res18", H=56, W=100, grid=(32, 4, 32)),
}
MODES = ("fp32", "bf16", "channels_last", "bf16_channels_last", "bf16_compile")


def class_set(name: str) -> list:
    """The output classes of a benchmark row: 'vehicle', or 'multiclass' = configs/multiclass.yaml's."""
    if name == "vehicle":
        return ["vehicle"]
    if name == "multiclass":
        return list(yaml.safe_load((REPO / "configs" / "multiclass.yaml").read_text())["classes"])
    raise ValueError(f"unknown class set {name!r}; valid: vehicle, multiclass")


CLASS_SETS = ("vehicle", "multiclass")
# nuScenes camera yaws (degrees, left positive) in the dataset's camera order; CAM_FRONT is ref.
CAMERA_YAWS = (55.0, 0.0, -55.0, 110.0, 180.0, -110.0)


def nuscenes_like_rig(B: int, H: int, W: int):
    """pix_T_cams, cams_T_ref (B, 6, 4, 4) of six cameras around the front camera's frame."""
    scale = W / 1600.0
    K = torch.tensor([[1266.0 * scale, 0, 816.0 * scale], [0, 1266.0 * scale, 491.0 * H / 900.0], [0, 0, 1]])
    cams_T_ref = []
    for yaw_deg in CAMERA_YAWS:
        yaw = math.radians(yaw_deg)
        ref_T_cam = torch.eye(4)
        # A left yaw turns the camera's forward (z) axis towards -x; y (down) is the rotation axis.
        ref_T_cam[:3, :3] = torch.tensor(
            [[math.cos(yaw), 0, -math.sin(yaw)], [0, 1, 0], [math.sin(yaw), 0, math.cos(yaw)]]
        )
        ref_T_cam[:3, 3] = torch.tensor([-math.sin(yaw), 0.0, math.cos(yaw) - 1.0])
        cams_T_ref.append(rigid_inverse(ref_T_cam))
    S = len(CAMERA_YAWS)
    return pad_intrinsics(K).expand(B, S, 4, 4).clone(), torch.stack(cams_T_ref).expand(B, S, 4, 4).clone()


def random_batch(B, Z, X, device, seed=0, C=1):
    g = torch.Generator().manual_seed(seed)
    seg = (torch.rand(B, C, Z, X, generator=g) > 0.95).float()
    first = seg[:, :1]
    batch = {
        "seg_bev": seg,
        "valid_bev": torch.ones_like(seg),
        "center_bev": first * torch.rand(B, 1, Z, X, generator=g),
        "offset_bev": torch.randn(B, 2, Z, X, generator=g) * first,
    }
    return {k: v.to(device) for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_one(
    setting: str,
    mode: str,
    lift: str,
    iters: int,
    warmup: int,
    device_name: str,
    batch: int = 1,
    optimizer: bool = False,
    budget_s: float = 0.0,
    compile_backend: str = "inductor",
    classes: str = "vehicle",
) -> dict:
    device = torch.device(device_name)
    configure_cuda(device)
    cfg = SETTINGS[setting]
    (Z, Y, X), B = cfg["grid"], batch
    torch.manual_seed(0)
    names = class_set(classes)
    settings = ModelConfig.make(Z=Z, Y=Y, X=X, encoder_type=cfg["encoder_type"], encoder_weights="none",
                                classes=names)
    model = Segnet(settings, lift_impl=lift).to(device)
    channels_last = "channels_last" in mode
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    run_model = compile_model(model, compile_backend) if mode.endswith("_compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-7) if optimizer else None
    pix_T_cams, cams_T_ref = nuscenes_like_rig(B, cfg["H"], cfg["W"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 6, 3, cfg["H"], cfg["W"]), dtype=torch.uint8, generator=g)
    images, pix_T_cams, cams_T_ref = images.to(device), pix_T_cams.to(device), cams_T_ref.to(device)
    targets = random_batch(B, Z, X, device, C=len(names))
    use_bf16 = mode.startswith("bf16")

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = run_model(images, pix_T_cams, cams_T_ref)
        total, _ = compute_losses(out, targets, model)
        total.backward()
        if opt is not None:  # as the training loop: clip at 5, AdamW step
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = peak_memory_mb(device)
    t_first = time.perf_counter()
    for i in range(max(warmup, 1)):
        step()
        sync()
        if i == 0:
            first_s = time.perf_counter() - t_first
    times, cpu_times = [], []
    t_timed = time.perf_counter()
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if budget_s and time.perf_counter() - t_timed > budget_s:
            break
    ms = 1000.0 * sorted(times)[len(times) // 2]
    compiled = {}
    if run_model is not model:
        from torch._dynamo.utils import counters

        compiled = dict(compiled_graphs=int(counters["stats"]["unique_graphs"]),
                        graph_breaks=int(sum(counters["graph_break"].values())))
    return dict(
        setting=setting,
        mode=mode,
        lift=lift,
        classes=classes,
        n_classes=len(names),
        encoder_type=cfg["encoder_type"],
        image_hw=[cfg["H"], cfg["W"]],
        grid=list(cfg["grid"]),
        batch=B,
        optimizer=optimizer,
        params_m=n_params / 1e6,
        iters=len(times),
        warmup=max(warmup, 1),
        ms_per_iter=ms,
        ms_min=1000.0 * min(times),
        first_ms=1000.0 * first_s,
        samples_per_s=1000.0 * B / ms,
        # CPU seconds of all threads: on a shared machine this moves less than wall time.
        cpu_ms_per_iter=1000.0 * sorted(cpu_times)[len(cpu_times) // 2],
        peak_mem_mb=peak_memory_mb(device),
        mem_before_mb=base_mb,
        device=str(device),
        threads=torch.get_num_threads(),
        **compiled,
    )


def _child_failure(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    first = str(exc).strip().splitlines()[:1] or [""]
    return f"{type(exc).__name__}: {first[0][:300]}"


def run_row(spec: dict, device: str, timeout_s: float = 0.0, threads: int = 0, log: str = "") -> dict:
    """One (setting, mode, lift) in its own process: run_one's result, or the spec plus an
    ``error`` (out of memory, compile failure, crash, timeout) instead of raising. ``log``: a file
    to append the command and the child's output to."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--_child", json.dumps(spec)]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    # own process group: a timeout also ends the compiler's worker processes
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = child.communicate(timeout=timeout_s or None)
        proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        proc = subprocess.CompletedProcess(cmd, None, out, err)
    wall = time.perf_counter() - t0
    if log:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}[rc={proc.returncode}, {wall:.1f} s]\n\n")
    if proc.returncode is None:
        return dict(spec, error=f"timed out after {timeout_s:.0f} s", wall_s=wall)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return dict(spec, error=f"rc={proc.returncode}: {tail[0][:300]}", wall_s=wall)
    return dict(spec, **result, wall_s=wall)


def multiclass_ratio_line(multi: dict, vehicle: dict) -> str:
    """The multiclass row against the vehicle row of the same setting, mode and lift."""
    return (f"{multi['setting']:7} {multi['mode']:19} {multi['lift']:9} {multi['ms_per_iter']:9.1f} ms vs "
            f"{vehicle['ms_per_iter']:9.1f} ms = {multi['ms_per_iter'] / vehicle['ms_per_iter']:.3f}x time "
            f"(cpu {multi['cpu_ms_per_iter'] / vehicle['cpu_ms_per_iter']:.3f}x), peak "
            f"{multi['peak_mem_mb']:.0f} vs {vehicle['peak_mem_mb']:.0f} MB = "
            f"{multi['peak_mem_mb'] / vehicle['peak_mem_mb']:.3f}x")


def lift_only(device_name: str, H: int, W: int, iters: int) -> dict:
    """Forward+backward of the lift alone (128 channels, stride-8 features), sparse vs reference."""
    from bevtrain.model.lift import feature_pix_T_ref, lift_features, lift_reference

    device = torch.device(device_name)
    vox_util = Vox_util(200, 8, 200)
    pix_T_cams, cams_T_ref = nuscenes_like_rig(1, H, W)
    Hf, Wf = H // 8, W // 8
    featpix_T_ref = feature_pix_T_ref(pix_T_cams, cams_T_ref, (H, W), (Hf, Wf)).to(device)
    feats = torch.randn(1, 6, 128, Hf, Wf, device=device, requires_grad=True)
    result = {}
    for name, fn in (("sparse", lift_features), ("reference", lift_reference)):
        times = []
        for _ in range(iters + 1):
            t0 = time.perf_counter()
            fn(feats, featpix_T_ref, vox_util).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        result[name] = 1000.0 * min(times[1:])
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="cpu", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument(
        "--modes", default="fp32,bf16,channels_last", help=f"comma list of {', '.join(MODES)}"
    )
    parser.add_argument("--lifts", default="sparse,reference", help=f"comma list of {', '.join(LIFTS)}")
    parser.add_argument("--classes", default="vehicle", help=f"comma list of {', '.join(CLASS_SETS)}")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="samples per step")
    parser.add_argument("--optimizer", action="store_true", help="add clipping and an AdamW step")
    parser.add_argument("--budget", type=float, default=0.0, help="stop timing a row after N s (0: none)")
    parser.add_argument("--row_timeout", type=float, default=0.0, help="kill a row after N s (0: none)")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (bf16_compile)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--lift-only", action="store_true", help="also time the lift alone per setting")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    if args._child:
        spec = json.loads(args._child)
        try:
            result = run_one(device_name=device, **spec)
        except Exception as exc:  # reported as a row; the parent carries on
            import traceback

            traceback.print_exc()
            result = {"error": _child_failure(exc)}
        print(json.dumps(result))
        return

    settings = [s for s in args.settings.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    lifts = [m for m in args.lifts.split(",") if m]
    class_sets = [c for c in args.classes.split(",") if c]
    choices = ((settings, SETTINGS, "settings"), (modes, MODES, "modes"), (lifts, LIFTS, "lifts"),
               (class_sets, CLASS_SETS, "classes"))
    for value, valid, flag in choices:
        bad = [v for v in value if v not in valid]
        if bad:
            parser.error(f"--{flag}: unknown {bad}; valid: {', '.join(valid)}")

    results, lift_results = [], {}
    header = (f"{'setting':7} {'mode':19} {'lift':9} {'classes':10} {'params':>7} {'ms/iter':>9} "
              f"{'cpu ms':>9} {'peak MB':>9}")
    print(f"device={device} threads={args.threads or torch.get_num_threads()}\n{header}\n{'-' * len(header)}")
    for setting in settings:
        for mode in modes:
            for lift in lifts:
                # class sets innermost: their rows run one after the other, under the same load
                for classes in class_sets:
                    spec = dict(setting=setting, mode=mode, lift=lift, iters=args.iters, warmup=args.warmup,
                                batch=args.batch, optimizer=args.optimizer, budget_s=args.budget,
                                compile_backend=args.compile_backend, classes=classes)
                    r = run_row(spec, device, args.row_timeout, args.threads)
                    if "error" in r:
                        print(f"{setting:7} {mode:19} {lift:9} {classes:10} FAILED: {r['error']}")
                        continue
                    results.append(r)
                    print(
                        f"{setting:7} {mode:19} {lift:9} {classes:10} {r['params_m']:6.2f}M "
                        f"{r['ms_per_iter']:9.1f} {r['cpu_ms_per_iter']:9.1f} {r['peak_mem_mb']:9.0f}",
                        flush=True,
                    )
        if args.lift_only:
            cfg = SETTINGS[setting]
            lift_results[setting] = lift_only(device, cfg["H"], cfg["W"], max(args.iters, 1))

    if len(class_sets) > 1:
        print("\nmulticlass (configs/multiclass.yaml's classes) vs vehicle (goal: time <= 1.05x):")
        for r in results:
            if r.get("classes") != "multiclass":
                continue
            key = (r["setting"], r["mode"], r["lift"])
            base = [q for q in results if q.get("classes") == "vehicle"
                    and (q["setting"], q["mode"], q["lift"]) == key]
            if base:
                print("  " + multiclass_ratio_line(r, base[0]))
    print("\nsparse lift vs reference lift (whole forward+backward):")
    for r in results:
        if r["lift"] != "sparse" or r.get("classes", "vehicle") != "vehicle":
            continue
        key = (r["setting"], r["mode"])
        ref = [q for q in results if q["lift"] == "reference" and (q["setting"], q["mode"]) == key
               and q.get("classes", "vehicle") == "vehicle"]
        if ref:
            q = ref[0]
            print(
                f"  {r['setting']:7} {r['mode']:19} {r['ms_per_iter']:9.1f} ms vs {q['ms_per_iter']:9.1f} ms "
                f"= {q['ms_per_iter'] / r['ms_per_iter']:.2f}x faster; peak {r['peak_mem_mb']:.0f} vs "
                f"{q['peak_mem_mb']:.0f} MB"
            )
    for setting, lr in lift_results.items():
        print(
            f"  lift alone, {setting}: sparse {lr['sparse']:.1f} ms, reference {lr['reference']:.1f} ms "
            f"= {lr['reference'] / lr['sparse']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "lift_only": lift_results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
