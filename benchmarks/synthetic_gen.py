"""Synthetic generator, this checkout against another git revision, side by side.

    python benchmarks/synthetic_gen.py --base main --scenes 2 --keyframes 4 --repeats 3

Extracts ``bevtrain/synthetic`` at ``--base`` into a temporary package, then generates the same
small set with each generator in turn (one process, alternating, so machine load hits both alike)
and prints wall and CPU seconds per run, the set's size, and the ratios new / base.
"""

from __future__ import annotations

import argparse
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _extract_base(rev: str, into: Path) -> str:
    """``bevtrain/synthetic`` at ``rev`` as package ``synthetic_base`` under ``into``; its name."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", rev, "bevtrain/synthetic"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into)
    (into / "bevtrain" / "synthetic").rename(into / "synthetic_base")
    return "synthetic_base"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main", help="git revision to compare with")
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--keyframes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synthetic-gen-"))
    try:
        sys.path.insert(0, str(work))
        generators = {"base": importlib.import_module(_extract_base(args.base, work) + ".dataroot"),
                      "new": importlib.import_module("bevtrain.synthetic.dataroot")}
        runs = {name: [] for name in generators}
        for r in range(args.repeats):
            for name, mod in generators.items():
                out = work / f"{name}-{r}"
                wall, cpu = time.perf_counter(), time.process_time()
                mod.generate(out, keyframes=args.keyframes, scenes=args.scenes, workers=1, progress=False)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                size = _size(out)
                runs[name].append((wall, cpu, size))
                line = f"{name} run {r}: wall {wall:.2f} s, cpu {cpu:.2f} s, {size / 2**20:.2f} MiB"
                print(line, flush=True)
                shutil.rmtree(out)
        best = {name: (min(w for w, _, _ in v), min(c for _, c, _ in v), v[0][2]) for name, v in runs.items()}
        (bw, bc, bs), (nw, nc, ns) = best["base"], best["new"]
        print(f"best of {args.repeats}: base wall {bw:.2f} s cpu {bc:.2f} s {bs / 2**20:.2f} MiB; "
              f"new wall {nw:.2f} s cpu {nc:.2f} s {ns / 2**20:.2f} MiB")
        print(f"new / base: wall {nw / bw:.3f}, cpu {nc / bc:.3f}, size {ns / bs:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
