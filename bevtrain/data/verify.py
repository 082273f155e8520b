"""Check every file and calibration a split's index references, before a run trips over one.

    python -m bevtrain.data.verify --data_dir=/data/nuscenes --dset=trainval [--split=train] \
        [--nsweeps=3] [--nworkers=N] [--decode_factor=8]

What is checked (the same index the dataset reads, so the same files):
- camera JPEGs: start and end-of-image markers (a truncated file has no FFD9), the frame header's
  size equal to the index's width x height, and a full entropy decode (at 1/decode_factor scale:
  every coefficient is still decoded, only the inverse DCT is smaller) during which libjpeg must
  not report corrupt data ("Corrupt JPEG data: premature end of data segment", ...), which cv2 only
  prints on stderr;
- lidar ``.pcd.bin``: present, size a non-zero multiple of 20 bytes (5 float32 per point);
- radar ``.pcd``: a readable binary PCD header and a payload of the header's point count (plus
  fewer than one point's bytes: nuScenes' files end with one extra byte);
- calibrations, ego poses and boxes: finite, unit quaternions, fx, fy > 0 (checked when the index is
  built; see ``index.py``); a table that is not valid JSON;
- the map expansion (``maps/expansion/<location>.json``, v1.3) of every location the splits use, when the
  dataroot has a ``maps/expansion/`` folder (without one, map-layer classes are unavailable: said, not
  counted as a problem).

Files run in parallel over ``--nworkers`` processes with a progress bar; the summary gives counts per
problem and the first offenders with their paths and samples. Exit status 0 when everything is
good, 1 when anything is bad.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import cv2

from bevtrain.cli import ArgumentParser
from bevtrain.data import augment, points
from bevtrain.data.index import (
    LIDAR_NAME,
    DataLayoutError,
    DataTableError,
    box_problem,
    check_dataroot,
    expansion_path,
    expansion_problem,
    find_bad_tables,
    intrinsic_problem,
    load_index,
    pose_problem,
    resolve_split,
)
from bevtrain.progress import Progress

LIDAR_RECORD_BYTES = points.LIDAR_POINT_BYTES
PROBLEM_TITLES = {
    "missing": "file missing or unreadable",
    "not_jpeg": "not a JPEG",
    "truncated": "JPEG truncated (no end-of-image marker)",
    "corrupt": "JPEG corrupt (libjpeg reports bad data)",
    "size": "JPEG of the wrong size",
    "lidar_size": "lidar file size not a multiple of 20 bytes",
    "radar": "radar file unreadable or truncated",
    "calibrated_sensor": "calibration not finite / out of range",
    "ego_pose": "ego pose not finite",
    "sample_annotation": "box not finite or with a side <= 0",
    "table": "table not valid JSON",
    "map_expansion": "map expansion missing or unusable",
}
CHUNK = 16  # files per task: small enough for a smooth progress bar, large enough to amortise IPC

Job = Tuple[str, str, Tuple[int, int] | None]  # (kind, absolute path, expected (w, h) for JPEGs)


# -- checks (run in worker processes) ---------------------------------------------------------------
def check_jpeg(path: str, want_wh: Tuple[int, int], factor: int = 8) -> Tuple[str, str] | None:
    """(problem kind, message) for a camera image, or None when it is good."""
    try:
        buf = augment.read_jpeg_bytes(path)
    except augment.ImageReadError as e:
        return e.kind, str(e)
    size = augment.jpeg_size(buf)
    if size != tuple(want_wh):
        got = "no frame header" if size is None else f"{size[0]}x{size[1]}"
        return "size", f"image {path} is {got}, but the index says {want_wh[0]}x{want_wh[1]}"
    img, message = augment.decode_reporting(buf, factor)
    if img is None or message:
        return "corrupt", f"image {path}: " + (message.replace("\n", "; ") or "cv2 cannot decode it")
    if img.shape[1::-1] != augment.decoded_size(want_wh, factor):
        return "size", f"image {path} decodes to {img.shape[1]}x{img.shape[0]} at 1/{factor} scale"
    return None


def check_lidar(path: str) -> Tuple[str, str] | None:
    try:
        size = os.stat(path).st_size
    except OSError as e:
        return "missing", f"lidar file {path}: {e.strerror or e}"
    if size == 0 or size % LIDAR_RECORD_BYTES:
        return "lidar_size", (f"lidar file {path} has {size} bytes, not a non-zero multiple of "
                              f"{LIDAR_RECORD_BYTES}")
    return None


def _pcd_payload(blob: bytes) -> Tuple[int, int, int]:
    """(payload offset, point count, bytes per point) of a binary PCD (header already validated)."""
    header, pos = {}, 0
    while True:
        end = blob.index(b"\n", pos)
        key, _, val = blob[pos:end].decode("ascii", "replace").strip().partition(" ")
        header[key] = val.split()
        pos = end + 1
        if key == "DATA":
            break
    count = int(header["WIDTH"][0]) * int(header.get("HEIGHT", ["1"])[0])
    return pos, count, sum(int(s) for s in header["SIZE"])


def check_radar(path: str) -> Tuple[str, str] | None:
    if not os.path.isfile(path):
        return "missing", f"radar file {path} does not exist"
    try:
        points.read_radar(path)
        with open(path, "rb") as f:
            blob = f.read()
        offset, count, itemsize = _pcd_payload(blob)
    except (OSError, ValueError, KeyError, IndexError) as e:
        return "radar", str(e) if path in str(e) else f"radar file {path}: {e}"
    payload = len(blob) - offset
    # nuScenes' files end with one byte after the points (the devkit's reader asserts that it is there)
    if not count * itemsize <= payload < (count + 1) * itemsize:
        return "radar", (f"radar file {path}: payload of {payload} bytes is not {count} points of "
                         f"{itemsize} bytes")
    return None


def _check_chunk(args) -> List[Tuple[str, Tuple[str, str] | None]]:
    jobs, factor = args
    out = []
    for kind, path, wh in jobs:
        if kind == "jpeg":
            out.append((path, check_jpeg(path, wh, factor)))
        elif kind == "lidar":
            out.append((path, check_lidar(path)))
        else:
            out.append((path, check_radar(path)))
    return out


def check_map_expansion(dataroot: str, locations) -> Tuple[List[Tuple[str, str, str]], str]:
    """(problems [(path, '', message)], note): the expansion file of every location, checked when the
    dataroot has maps/expansion/ at all; the note says what was checked (or that map layers are off)."""
    folder = os.path.join(dataroot, "maps", "expansion")
    if not os.path.isdir(folder):
        return [], f"no {folder}/: map-layer classes unavailable (object classes unaffected)"
    problems = []
    for loc in sorted(locations):
        bad = expansion_problem(dataroot, loc)
        if bad:
            problems.append((str(expansion_path(dataroot, loc)), "", bad))
    names = ", ".join(sorted(locations))
    return problems, f"map expansion checked for {len(set(locations))} location(s): {names}"


# -- when the index cannot be built: every table that reads, checked on its own ---------------------------
def _read_table(table_dir: Path, name: str):
    try:
        with open(table_dir / f"{name}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checks_without_index(dataroot, version: str):
    """(problems {kind: [(path, '', message)]}, jobs, owner, keyframes) from the tables that are valid
    JSON, for a dataroot whose index cannot be built (a broken table): each table named, the rows of
    the readable tables checked as the index checks them, and every keyframe file checked."""
    root = Path(dataroot).expanduser().resolve()
    table_dir = root / version
    problems: Dict[str, List[Tuple[str, str, str]]] = defaultdict(list)
    for path, why in find_bad_tables(table_dir):
        problems["table"].append((str(path), "", f"{path}: not valid JSON: {why}"))
    row_checks = (
        ("calibrated_sensor", lambda r: pose_problem(r["translation"], r["rotation"])
         or (intrinsic_problem(r["camera_intrinsic"]) if r.get("camera_intrinsic") else None)),
        ("ego_pose", lambda r: pose_problem(r["translation"], r["rotation"])),
        ("sample_annotation", box_problem),
    )
    for table, check in row_checks:
        path = str(table_dir / f"{table}.json")
        for row in _read_table(table_dir, table) or []:
            try:
                bad = check(row)
            except (KeyError, TypeError) as e:
                bad = f"missing or malformed field {e}"
            if bad:
                problems[table].append((path, "", f"{table} {row.get('token', '?')} in {path}: {bad}"))
    jobs: Dict[str, Job] = {}
    owner: Dict[str, str] = {}
    keyframes = 0
    for row in _read_table(table_dir, "sample_data") or []:
        if not row.get("is_key_frame"):
            continue
        keyframes += 1
        path = str(root / row["filename"])
        if row["filename"].endswith((".jpg", ".jpeg")):
            jobs[path] = ("jpeg", path, (int(row["width"]), int(row["height"])))
        elif row["filename"].endswith(".pcd.bin"):
            jobs[path] = ("lidar", path, None)
        elif row["filename"].endswith(".pcd"):
            jobs[path] = ("radar", path, None)
        owner[path] = row.get("sample_token", "")
    return problems, jobs, owner, keyframes


# -- collecting what the index references ------------------------------------------------------------
def collect(records, dataroot: str, nsweeps: int) -> Tuple[Dict[str, Job], Dict[str, str]]:
    """Files to check (path -> job, each once) and the first sample token using each path."""
    jobs: Dict[str, Job] = {}
    owner: Dict[str, str] = {}
    for rec in records:
        for c in rec["cams"].values():  # every camera of the rig (index.camera_channels)
            path = os.path.join(dataroot, c["path"])
            jobs.setdefault(path, ("jpeg", path, (int(c["width"]), int(c["height"]))))
            owner.setdefault(path, rec["token"])
        for chan, sweeps in rec["sweeps"].items():
            kind = "lidar" if chan == LIDAR_NAME else "radar"
            for rel in sweeps["paths"][:nsweeps]:
                path = os.path.join(dataroot, rel)
                jobs.setdefault(path, (kind, path, None))
                owner.setdefault(path, rec["token"])
    return jobs, owner


def run_checks(jobs: Iterable[Job], workers: int, factor: int, progress: bool = True):
    """[(path, problem or None)] for every job, over ``workers`` processes, with a progress bar."""
    jobs = list(jobs)
    chunks = [(jobs[i : i + CHUNK], factor) for i in range(0, len(jobs), CHUNK)]
    bar = Progress(len(jobs), progress, label="verify", unit="files")
    results, done = [], 0
    # The processes are the parallelism. cv2's thread count is set here, before fork(): setting it in a
    # forked child tears down a thread pool copied half-owned from the parent, which deadlocks.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for part in pool.imap_unordered(_check_chunk, chunks) if pool else map(_check_chunk, chunks):
            results.extend(part)
            done += len(part)
            bar.update(done)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        cv2.setNumThreads(threads)
    bar.close(done)
    return results


# -- the command -------------------------------------------------------------------------------------
def verify(data_dir: str, dset: str = "trainval", splits=("train", "val"), nsweeps: int = 3,
           workers: int | None = None, decode_factor: int = 8, cache_dir=None, show: int = 5,
           progress: bool = True, out=None) -> dict:
    """Check the splits; print a summary to ``out``; return {'problems': {kind: [(path, sample,
    message)]}, 'files', 'samples', 'seconds', ...}."""
    t0 = time.perf_counter()
    problems: Dict[str, List[Tuple[str, str, str]]] = defaultdict(list)
    jobs: Dict[str, Job] = {}
    owner: Dict[str, str] = {}
    n_samples, version, root = 0, "", data_dir
    seen_index, locations = set(), set()
    index_note = ""
    for split in splits:
        try:
            records, info = load_index(data_dir, dset, split, nsweeps, cache_dir, verbose=progress)
        except DataTableError:
            # The index needs every table; the checks that do not still run, from the tables that read.
            version = resolve_split(data_dir, dset, split)[0]
            root = str(check_dataroot(data_dir, version))
            found, jobs, owner, keyframes = checks_without_index(root, version)
            problems.update(found)
            index_note = (f"the index cannot be built (a table is not valid JSON): checked the rows of the "
                          f"tables that read and the files of all {keyframes} keyframe sample_data rows")
            break
        version, root = info["version"], info["dataroot"]
        n_samples += len(records)
        for i, issues in sorted(info["problems"].items()):
            rec = records[i]
            for p in issues:
                key = (p["table"], p["token"], rec["token"])
                if key not in seen_index:
                    seen_index.add(key)
                    table = os.path.join(root, version, p["table"] + ".json")
                    why = f"{p['channel']}: {p['table']} {p['token']} in {table}: {p['reason']}"
                    why += f" (needed for {p['needed_for']})"
                    problems[p["table"]].append((table, rec["token"], why))
        locations |= {rec.get("location", "") for rec in records} - {""}
        split_jobs, split_owner = collect(records, root, nsweeps)
        for path, job in split_jobs.items():
            jobs.setdefault(path, job)
            owner.setdefault(path, split_owner[path])
    map_problems, map_note = check_map_expansion(root, locations) if locations or not index_note else (
        [], "map expansion not checked: which locations the splits use comes from the index")
    problems["map_expansion"].extend(map_problems)
    if not problems["map_expansion"]:
        del problems["map_expansion"]
    t_index = time.perf_counter() - t0
    workers = workers or os.cpu_count() or 1
    t1 = time.perf_counter()
    results = run_checks(jobs.values(), workers, decode_factor, progress)
    t_files = time.perf_counter() - t1
    for path, problem in results:
        if problem is not None:
            problems[problem[0]].append((path, owner.get(path, ""), problem[1]))
    counts = defaultdict(int)
    for kind, _, _ in jobs.values():
        counts[kind] += 1
    summary = {
        "dataroot": root, "version": version, "splits": list(splits), "samples": n_samples,
        "files": len(jobs),
        "jpegs": counts["jpeg"], "lidar_files": counts["lidar"], "radar_files": counts["radar"],
        "seconds": time.perf_counter() - t0, "index_seconds": t_index, "file_seconds": t_files,
        "files_per_s": len(jobs) / max(t_files, 1e-9), "samples_per_s": n_samples / max(t_files, 1e-9),
        "workers": workers, "decode_factor": decode_factor, "map_note": map_note, "index_note": index_note,
        "problems": {k: sorted(v, key=lambda x: x[0]) for k, v in problems.items()},
    }
    print(format_summary(summary, show), file=out or sys.stdout, flush=True)
    return summary


def format_summary(s: dict, show: int = 5) -> str:
    lines = [
        f"verify {s['dataroot']} ({s['version']}, splits {', '.join(s['splits'])}): {s['samples']} samples, "
        f"{s['files']} files ({s['jpegs']} JPEGs, {s['lidar_files']} lidar, {s['radar_files']} radar) "
        f"checked in {s['file_seconds']:.1f} s with {s['workers']} processes: "
        f"{s['files_per_s']:.0f} files/s, "
        f"{s['samples_per_s']:.1f} samples/s (index {s['index_seconds']:.1f} s)"
    ]
    for note in ("index_note", "map_note"):
        if s.get(note):
            lines.append(s[note])
    total = sum(len(v) for v in s["problems"].values())
    if not total:
        lines.append("all good: no problems found")
        return "\n".join(lines)
    lines.append(f"{total} problem(s):")
    for kind, items in sorted(s["problems"].items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {PROBLEM_TITLES.get(kind, kind)}: {len(items)}")
        for _path, sample, message in items[:show]:
            where = f"sample {sample}: " if sample else ""
            lines.append(f"    {where}{message}")
        if len(items) > show:
            lines.append(f"    ... and {len(items) - show} more")
    lines.extend(advice(s["problems"], s["dataroot"], s["version"]))
    return "\n".join(lines)


FILE_KINDS = ("missing", "not_jpeg", "truncated", "corrupt", "size", "lidar_size", "radar")
ROW_KINDS = ("calibrated_sensor", "ego_pose", "sample_annotation")


def advice(problems: Dict[str, list], dataroot: str, version: str) -> List[str]:
    """What to do, per kind of problem found: --bad_samples=skip helps only with samples, never with
    a table the index cannot read or a map file."""
    lines = []
    if problems.get("table"):
        lines.append(f"Tables: extract the {version} metadata archive again into {dataroot} (a table that is "
                     f"not valid JSON stops every run; --bad_samples=skip cannot help).")
    if problems.get("map_expansion"):
        lines.append("Map expansion: download nuScenes-map-expansion-v1.3 again into "
                     f"{dataroot}/maps/expansion/ (needed only for map-layer classes).")
    rows = [k for k in ROW_KINDS if problems.get(k)]
    if rows:
        lines.append(f"Rows ({', '.join(rows)}): fix the values in the tables named above, or train with "
                     "--bad_samples=skip (the samples that use them are left out and listed in "
                     "<log_dir>/<run>/bad_samples.jsonl, up to --max_bad_fraction of a split).")
    if any(problems.get(k) for k in FILE_KINDS):
        lines.append("Files: re-copy them from the nuScenes archives, or train with --bad_samples=skip (the "
                     "samples that use them are left out and listed, as above).")
    return lines


def main(argv: Iterable[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m bevtrain.data.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", required=True, help="nuScenes dataroot (v1.0-*/, samples/, sweeps/)")
    ap.add_argument("--dset", default="trainval", help="trainval, mini, or a split file (as for training)")
    ap.add_argument("--split", default="train,val", help="split(s) to check, comma separated")
    ap.add_argument("--nsweeps", type=int, default=3, help="lidar/radar sweeps per sample referenced")
    ap.add_argument("--nworkers", "--workers", type=int, default=0, dest="workers", metavar="N",
                    help="processes (0 = one per CPU core), as training's --nworkers")
    ap.add_argument("--decode_factor", type=int, default=8, choices=(1, 2, 4, 8),
                    help="decode JPEGs at 1/N scale (all data is still entropy-decoded; 1 = full decode)")
    ap.add_argument("--cache_dir", default="",
                    help="index cache folder ('' = $BEVTRAIN_CACHE if set, else ~/.cache/bevtrain/index)")
    ap.add_argument("--show", type=int, default=5, help="offenders listed per problem")
    ap.add_argument("--conventions", action="store_true",
                    help="check nuScenes' conventions instead (frames, quaternions, intrinsics, boxes, "
                         "poses; see bevtrain/data/conventions.py) and draw --pictures samples")
    ap.add_argument("--pictures", type=int, default=4, help="with --conventions: samples drawn (0 = none)")
    ap.add_argument("--pictures_dir", default="conventions_pictures",
                    help="with --conventions: folder for the pictures")
    ap.add_argument("--lidar_samples", type=int, default=20,
                    help="with --conventions: lidar keyframes read for the ground-height check")
    args = ap.parse_args(None if argv is None else list(argv))
    if args.conventions:
        return conventions_main(args)
    try:
        summary = verify(args.data_dir, args.dset, [s for s in args.split.split(",") if s], args.nsweeps,
                         args.workers or None, args.decode_factor, args.cache_dir or None, args.show)
    except (DataLayoutError, ValueError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 1
    return 1 if summary["problems"] else 0


def conventions_main(args) -> int:
    """--conventions: numeric checks over the tables, then pictures of the first split; 1 on findings."""
    from bevtrain.data import conventions

    split = [s for s in args.split.split(",") if s][0]
    try:
        version = resolve_split(args.data_dir, args.dset, split)[0]
        root = check_dataroot(args.data_dir, version)
        summary = conventions.check_conventions(root, version, args.lidar_samples)
    except (DataLayoutError, ValueError, KeyError, OSError) as e:
        print(f"error: conventions check of {args.data_dir}: {e}", file=sys.stderr)
        return 1
    print(conventions.format_conventions(summary, args.show), flush=True)
    if args.pictures > 0:
        try:
            paths = conventions.write_pictures(args.data_dir, args.dset, split, args.pictures,
                                               args.pictures_dir, args.cache_dir or None)
            print(conventions.picture_note(paths, args.pictures_dir))
        except Exception as e:  # noqa: BLE001  the findings above stand; pictures need a loadable index
            print(f"pictures not drawn: the dataset cannot load {args.data_dir} ({type(e).__name__}: {e})")
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
