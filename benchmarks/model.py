"""Segnet forward+backward speed and peak memory, sparse lift vs the grid_sample reference lift.

Settings:
  paper: res101, 448x800 images, 6 cameras, batch 1, Z/Y/X 200/8/200 (Simple-BEV's paper setting)
  cpu:   res18, res_scale 0.5 -> 112x200 images, 6 cameras, batch 1, 200/8/200
Modes: fp32, bf16 (autocast), channels_last (fp32), bf16_channels_last.

"ms/iter" is the median wall time; "cpu ms" the median CPU time of all threads (on a shared
machine it is the steadier number). Every (setting, mode, lift) runs in its own subprocess so
that peak memory is its own: CUDA ``max_memory_allocated`` on GPU, peak resident set size
(ru_maxrss) on CPU. Inputs are a
nuScenes-like ring of six cameras with random images and random targets; timings include the
loss and the backward pass, not data loading.

  python benchmarks/model.py --settings cpu --iters 3
  python benchmarks/model.py --settings cpu,paper --modes fp32 --iters 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevtrain.geometry import Vox_util, pad_intrinsics, rigid_inverse  # noqa: E402
from bevtrain.losses import compute_losses  # noqa: E402
from bevtrain.model import Segnet  # noqa: E402
from bevtrain.model.segnet import LIFTS  # noqa: E402

SETTINGS = {
    "paper": dict(encoder_type="res101", H=448, W=800),
    "cpu": dict(encoder_type="res18", H=112, W=200),
}
MODES = ("fp32", "bf16", "channels_last", "bf16_channels_last")
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


def random_batch(B, Z, X, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = (torch.rand(B, 1, Z, X, generator=g) > 0.95).float()
    batch = {
        "seg_bev": seg,
        "valid_bev": torch.ones_like(seg),
        "center_bev": seg * torch.rand(B, 1, Z, X, generator=g),
        "offset_bev": torch.randn(B, 2, Z, X, generator=g) * seg,
    }
    return {k: v.to(device) for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_one(setting: str, mode: str, lift: str, iters: int, warmup: int, device_name: str) -> dict:
    device = torch.device(device_name)
    cfg = SETTINGS[setting]
    Z, Y, X, B = 200, 8, 200, 1
    torch.manual_seed(0)
    vox_util = Vox_util(Z, Y, X)
    model = Segnet(
        Z, Y, X, vox_util=vox_util, encoder_type=cfg["encoder_type"], encoder_weights="none", lift_impl=lift
    ).to(device)
    channels_last = "channels_last" in mode
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    pix_T_cams, cams_T_ref = nuscenes_like_rig(B, cfg["H"], cfg["W"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 6, 3, cfg["H"], cfg["W"]), dtype=torch.uint8, generator=g)
    images, pix_T_cams, cams_T_ref = images.to(device), pix_T_cams.to(device), cams_T_ref.to(device)
    batch = random_batch(B, Z, X, device)
    use_bf16 = mode.startswith("bf16")

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(images, pix_T_cams, cams_T_ref)
            total, _ = compute_losses(out, batch, model)
        total.backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = peak_memory_mb(device)
    for _ in range(warmup):
        step()
    sync()
    times, cpu_times = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return dict(
        setting=setting,
        mode=mode,
        lift=lift,
        encoder_type=cfg["encoder_type"],
        image_hw=[cfg["H"], cfg["W"]],
        params_m=n_params / 1e6,
        iters=iters,
        warmup=warmup,
        ms_per_iter=1000.0 * sorted(times)[len(times) // 2],
        ms_min=1000.0 * min(times),
        # CPU seconds of all threads: on a shared machine this moves less than wall time.
        cpu_ms_per_iter=1000.0 * sorted(cpu_times)[len(cpu_times) // 2],
        peak_mem_mb=peak_memory_mb(device),
        mem_before_mb=base_mb,
        device=str(device),
        threads=torch.get_num_threads(),
    )


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
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
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
        print(json.dumps(run_one(device_name=device, **spec)))
        return

    settings = [s for s in args.settings.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    lifts = [m for m in args.lifts.split(",") if m]
    choices = ((settings, SETTINGS, "settings"), (modes, MODES, "modes"), (lifts, LIFTS, "lifts"))
    for value, valid, flag in choices:
        bad = [v for v in value if v not in valid]
        if bad:
            parser.error(f"--{flag}: unknown {bad}; valid: {', '.join(valid)}")

    results, lift_results = [], {}
    header = f"{'setting':7} {'mode':19} {'lift':9} {'params':>7} {'ms/iter':>9} {'cpu ms':>9} {'peak MB':>9}"
    print(f"device={device} threads={args.threads or torch.get_num_threads()}\n{header}\n{'-' * len(header)}")
    for setting in settings:
        for mode in modes:
            for lift in lifts:
                spec = dict(setting=setting, mode=mode, lift=lift, iters=args.iters, warmup=args.warmup)
                cmd = [sys.executable, os.path.abspath(__file__), "--device", device]
                cmd += ["--_child", json.dumps(spec)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
                    print(f"{setting:7} {mode:19} {lift:9} FAILED rc={proc.returncode}: {tail[0]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(r)
                print(
                    f"{setting:7} {mode:19} {lift:9} {r['params_m']:6.2f}M {r['ms_per_iter']:9.1f} "
                    f"{r['cpu_ms_per_iter']:9.1f} {r['peak_mem_mb']:9.0f}",
                    flush=True,
                )
        if args.lift_only:
            cfg = SETTINGS[setting]
            lift_results[setting] = lift_only(device, cfg["H"], cfg["W"], max(args.iters, 1))

    print("\nsparse lift vs reference lift (whole forward+backward):")
    for r in results:
        if r["lift"] != "sparse":
            continue
        key = (r["setting"], r["mode"])
        ref = [q for q in results if q["lift"] == "reference" and (q["setting"], q["mode"]) == key]
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
