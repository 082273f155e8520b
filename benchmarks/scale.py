"""Trainval at scale: the index, its memory and its first start on a trainval-shaped dataroot (issue 21).

    python benchmarks/scale.py --source data/synthetic --out /tmp/trainval-shaped [--fraction 1.0]

1. Writes a trainval-shaped table set into ``--out/v1.0-trainval``: the synthetic set's ten scenes
   replicated to the 850 scenes of nuScenes' official train (700) and val (150) splits, under those
   names (tokens rehashed, so every replica is its own scene, log, instance and box), plus padding
   sweep rows (``sample_data`` and ``ego_pose``, unlinked non-keyframes) up to trainval's row count;
   the files are the synthetic set's, linked (``samples/``, ``sweeps/``, ``maps/``). ``--fraction``
   writes that share of the scenes (a quick check).
2. Measures, each in a fresh process so that one measurement's memory does not leak into the next:
   - the devkit's table load alone (seconds, peak RSS);
   - the index build (train and val from one table load) as training starts it: seconds, peak RSS of
     the builder child, and the asking process's RSS after the build, against a cache-hit start;
   - the same build in the asking process (``--inprocess``, the pre-issue-21 way) for comparison;
   - cache size, cache-hit seconds (train, val);
   - first batch (2 workers) and the loader workers' unique memory (USS) after 100 and 1,000 samples;
   - ``python -m bevtrain.data.verify`` on both splits;
   - two processes started together on an empty cache (R = 2): who built, who waited, each one's
     RSS/PSS after, and the host's PSS then.
Prints one line per figure and writes them to ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINVAL_ROWS = {"sample": 34_000, "sample_annotation": 1_166_195, "sample_data": 2_550_850}


def _h(replica: int, token: str) -> str:
    return hashlib.md5(f"{replica}:{token}".encode()).hexdigest() if token else ""


def _rehashed(row: dict, replica: int, *keys: str) -> dict:
    """``row`` with the tokens under ``keys`` rehashed for ``replica`` (links stay links within it)."""
    return dict(row, **{k: _h(replica, row[k]) for k in keys})


def write_trainval_shaped(source: Path, out: Path, fraction: float = 1.0) -> dict:
    """The table set of the module docstring; returns its row counts."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    names = [
        n for split in ("train", "val") for n in splits[split][: max(1, round(len(splits[split]) * fraction))]
    ]
    src = source / "v1.0-mini"
    t = {
        name: json.loads((src / f"{name}.json").read_text())
        for name in [
            "attribute",
            "calibrated_sensor",
            "category",
            "ego_pose",
            "instance",
            "log",
            "map",
            "sample",
            "sample_annotation",
            "sample_data",
            "scene",
            "sensor",
            "visibility",
        ]
    }
    scenes = sorted(t["scene"], key=lambda s: s["name"])
    by_scene_samples = {}
    for s in t["sample"]:
        by_scene_samples.setdefault(s["scene_token"], []).append(s)
    sd_by_sample: dict = {}
    ann_by_sample: dict = {}
    for r in t["sample_data"]:
        sd_by_sample.setdefault(r["sample_token"], []).append(r)
    for a in t["sample_annotation"]:
        ann_by_sample.setdefault(a["sample_token"], []).append(a)
    ego_by_token = {e["token"]: e for e in t["ego_pose"]}
    inst_by_scene = {}
    sample_scene = {s["token"]: s["scene_token"] for s in t["sample"]}
    for a in t["sample_annotation"]:
        inst_by_scene.setdefault(sample_scene[a["sample_token"]], set()).add(a["instance_token"])
    inst_by_token = {i["token"]: i for i in t["instance"]}
    sweep_rows = [r for r in t["sample_data"] if not r["is_key_frame"]]

    n_samples = sum(len(by_scene_samples[scenes[k % len(scenes)]["token"]]) for k in range(len(names)))
    pad_per_sample = max(
        0,
        round(
            (
                TRAINVAL_ROWS["sample_data"] * len(names) / 850
                - len(t["sample_data"]) * len(names) / len(scenes)
            )
            / max(n_samples, 1)
        ),
    )
    keep_ann = min(
        1.0,
        TRAINVAL_ROWS["sample_annotation"]
        / TRAINVAL_ROWS["sample"]
        / (len(t["sample_annotation"]) / len(t["sample"])),
    )
    new = {
        k: [] for k in ["scene", "log", "sample", "sample_data", "ego_pose", "sample_annotation", "instance"]
    }
    log_by_token = {lg["token"]: lg for lg in t["log"]}
    for k, name in enumerate(names):
        scene = scenes[k % len(scenes)]
        rep = k  # every replica rehashes its tokens with its own number
        log = dict(log_by_token[scene["log_token"]], token=_h(rep, scene["log_token"]))
        new["log"].append(log)
        new["scene"].append(
            dict(
                scene,
                token=_h(rep, scene["token"]),
                name=name,
                log_token=log["token"],
                first_sample_token=_h(rep, scene["first_sample_token"]),
                last_sample_token=_h(rep, scene["last_sample_token"]),
            )
        )
        for s in by_scene_samples[scene["token"]]:
            new["sample"].append(_rehashed(s, rep, "token", "scene_token", "prev", "next"))
            for r in sd_by_sample.get(s["token"], []):
                new["sample_data"].append(
                    _rehashed(r, rep, "token", "sample_token", "ego_pose_token", "prev", "next")
                )
                new["ego_pose"].append(
                    dict(ego_by_token[r["ego_pose_token"]], token=_h(rep, r["ego_pose_token"]))
                )
            for a in ann_by_sample.get(s["token"], []):
                if int(_h(rep, a["token"])[:4], 16) >= keep_ann * 65536:
                    continue  # trainval has fewer boxes per sample than the synthetic streets
                new["sample_annotation"].append(
                    _rehashed(a, rep, "token", "sample_token", "instance_token", "prev", "next")
                )
            for p in range(pad_per_sample):  # unlinked sweeps: trainval's table sizes, no new files
                r = sweep_rows[(k * 7919 + p * 104729 + len(new["sample_data"])) % len(sweep_rows)]
                tok = _h(rep, f"pad{s['token']}{p}")
                new["sample_data"].append(
                    dict(
                        r,
                        token=tok,
                        sample_token=_h(rep, s["token"]),
                        ego_pose_token=tok,
                        prev="",
                        next="",
                        is_key_frame=False,
                    )
                )
                new["ego_pose"].append(dict(ego_by_token[r["ego_pose_token"]], token=tok))
        for i in inst_by_scene.get(scene["token"], ()):
            inst = inst_by_token[i]
            new["instance"].append(
                dict(
                    inst,
                    token=_h(rep, i),
                    first_annotation_token=_h(rep, inst["first_annotation_token"]),
                    last_annotation_token=_h(rep, inst["last_annotation_token"]),
                )
            )
    maps = []
    for m in t["map"]:
        reps = [
            _h(k, lt)
            for k in range(len(names))
            for lt in m["log_tokens"]
            if scenes[k % len(scenes)]["log_token"] == lt
        ]
        maps.append(dict(m, log_tokens=reps))
    dst = out / "v1.0-trainval"
    if out.exists():
        shutil.rmtree(out)
    dst.mkdir(parents=True)
    for name in ["attribute", "calibrated_sensor", "category", "sensor", "visibility"]:
        (dst / f"{name}.json").write_text(json.dumps(t[name]))
    (dst / "map.json").write_text(json.dumps(maps))
    for name, rows in new.items():
        with open(dst / f"{name}.json", "w") as f:
            json.dump(rows, f)
    for folder in ["samples", "sweeps", "maps"]:
        if (source / folder).exists():
            os.symlink((source / folder).resolve(), out / folder)
    return {name: len(rows) for name, rows in new.items()}


# -- measurements, each in its own process ---------------------------------------------------------------
def _status(pid: str = "self") -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 2**20  # GiB
    return out


def _smaps(pid) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
            out[parts[0][:-1]] = int(parts[1]) / 2**20
    out["Uss"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def _children_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def child_main(args) -> None:
    """``--child WHAT``: one measurement; prints one JSON line."""
    from bevtrain.data import index

    root, cache = args.out, args.cache_dir
    res: dict = {"what": args.child}
    t0 = time.perf_counter()
    if args.child == "devkit":
        index.load_devkit(Path(root), "v1.0-trainval")
        res.update(seconds=time.perf_counter() - t0, peak_rss_gib=_status()["VmHWM"])
    elif args.child in ("build", "build_inprocess"):
        if args.child == "build":
            index.prepare_indexes(root, "trainval", ["train", "val"], 3, cache)
        else:  # the pre-issue-21 way: each split loads the tables in this process, one after the other
            for split in ("train", "val"):
                version, name, scenes, path = index._split_cache(
                    Path(root).resolve(), "trainval", split, 3, Path(cache)
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                t1 = time.perf_counter()
                recs, probs, cams = index.build_records(
                    Path(root).resolve(), version, index.official_split_scenes(name), 3, verbose=False
                )
                index._write_cache(path, recs, probs, cams, 3)
                res[f"{split}_seconds"] = time.perf_counter() - t1
                del recs, probs
        res.update(
            seconds=time.perf_counter() - t0,
            rss_after_gib=_status()["VmRSS"],
            peak_rss_gib=_status()["VmHWM"],
            builder_child_peak_gib=_children_peak_gib(),
        )
        # then what training does next: read both splits, as a cache-hit start does
        kept = [index.load_index(root, "trainval", s, 3, cache, verbose=False)[0] for s in ("train", "val")]
        res["rss_after_read_gib"] = _status()["VmRSS"]
        del kept
    elif args.child == "hit":
        kept = []  # both splits held, as a training run holds them
        for split in ("train", "val"):
            t1 = time.perf_counter()
            recs, info = index.load_index(root, "trainval", split, 3, cache, verbose=False)
            assert info["cache_hit"]
            res[f"{split}_seconds"] = time.perf_counter() - t1
            res[f"{split}_samples"] = len(recs)
            kept.append(recs)
        res.update(rss_after_gib=_status()["VmRSS"])
    elif args.child == "loader":
        import torch

        from bevtrain.config import DataConfig
        from bevtrain.data.dataset import NuScenesBEVDataset, make_loader

        torch.set_num_threads(1)
        data = DataConfig.make(data_dir=root, dset="trainval", res_scale=0.5, cache_dir=cache, nsweeps=3)
        ds = NuScenesBEVDataset(data, split="train", is_train=True)
        loader = make_loader(ds, 1, 2, True, True, seed=0)
        it = iter(loader)
        next(it)
        res["first_batch_seconds"] = time.perf_counter() - t0
        pids = [w.pid for w in it._workers]
        total = min(1000, len(ds))  # a --fraction set may have fewer
        for n in range(1, total):
            next(it)
            if n + 1 in (100, total):
                res[f"worker_uss_mib_at_{n + 1}"] = [round(_smaps(p)["Uss"] * 1024, 1) for p in pids]
        res["main_rss_gib"] = _status()["VmRSS"]
        res["samples_per_s"] = (total - 1) / (time.perf_counter() - t0 - res["first_batch_seconds"])
    print("SCALE " + json.dumps(res), flush=True)


def _run(args, what: str, cache: Path, timeout: int = 3600) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--out", str(args.out), "--cache_dir", str(cache)]
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if p.returncode:
        raise SystemExit(f"{what} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("SCALE "))
    res = json.loads(line[6:])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def two_together(args, cache: Path) -> dict:
    """R = 2: two processes asking for the index of an empty cache at the same instant."""
    start = Path(str(cache) + ".go")
    code = (
        "import sys, time, json; from pathlib import Path\n"
        "while not Path(sys.argv[3]).exists(): time.sleep(0.005)\n"
        "from bevtrain.data import index\n"
        "t0 = time.perf_counter()\n"
        "index.prepare_indexes(sys.argv[1], 'trainval', ['train', 'val'], 3, sys.argv[2], verbose=True)\n"
        "recs = [index.load_index(sys.argv[1], 'trainval', s, 3, sys.argv[2], verbose=False)[0]\n"
        "        for s in ('train', 'val')]\n"
        "took = time.perf_counter() - t0\n"
        "print('TOGETHER', json.dumps({'seconds': took, 'loads': index.DEVKIT_LOADS}), flush=True)\n"
        "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)\n"  # hold the memory until measured
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(args.out), str(cache), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    time.sleep(3)
    start.touch()
    out = []
    for p in procs:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("TOGETHER"):
                break
        out.append(lines)
    mem = [_smaps(p.pid) for p in procs]
    for p in procs:
        p.kill()
        p.wait()
    start.unlink()
    res = {}
    for k, (lines, m) in enumerate(zip(out, mem)):
        rec = json.loads(next(ln for ln in lines if ln.startswith("TOGETHER"))[9:])
        rec["waited"] = any("waiting for" in ln for ln in lines)
        rec["rss_gib"], rec["pss_gib"] = m["Rss"], m["Pss"]
        res[f"process_{k}"] = rec
    res["host_pss_gib"] = sum(m["Pss"] for m in mem)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="data/synthetic", help="synthetic nuScenes set (made if missing)")
    ap.add_argument("--out", default="/tmp/trainval-shaped")
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--skip_write", action="store_true", help="reuse the table set in --out")
    ap.add_argument("--skip_inprocess", action="store_true", help="no pre-issue-21 build for comparison")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = Path(args.out)
    if args.child:
        return child_main(args)
    results: dict = {}

    def say(name, value):
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)

    if not args.skip_write:
        if args.source == "data/synthetic":
            from bevtrain.synthetic import ensure_synthetic

            ensure_synthetic(args.source)
        t0 = time.perf_counter()
        say("tables", write_trainval_shaped(Path(args.source).resolve(), args.out, args.fraction))
        say("tables_write_seconds", time.perf_counter() - t0)
    base = Path(str(args.out) + "-cache")
    shutil.rmtree(base, ignore_errors=True)
    say("devkit_load", _run(args, "devkit", base / "unused"))
    say("build_child", _run(args, "build", base / "a"))
    cache_files = sorted((base / "a").glob("*.pkl"))
    say("cache_mb", {p.name.split("_")[1]: round(p.stat().st_size / 1e6, 1) for p in cache_files})
    say("cache_hit", _run(args, "hit", base / "a"))
    if not args.skip_inprocess:
        say("build_inprocess", _run(args, "build_inprocess", base / "b"))
    say("loader", _run(args, "loader", base / "a"))
    t0 = time.perf_counter()
    v = subprocess.run(
        [
            sys.executable,
            "-m",
            "bevtrain.data.verify",
            f"--data_dir={args.out}",
            "--dset=trainval",
            f"--cache_dir={base / 'a'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    say(
        "verify",
        {
            "seconds": time.perf_counter() - t0,
            "exit": v.returncode,
            "summary": v.stdout.strip().splitlines()[0][:300] if v.stdout.strip() else v.stderr[-300:],
        },
    )
    say("two_together", two_together(args, base / "c"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
