"""The index is built once per machine, in a child process (issue 21): processes starting together
wait for one builder, the devkit never loads into the process that asked, a dead builder is an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevtrain.data import index

REPO = Path(__file__).resolve().parents[1]

ASK = r"""
import os, sys, time
from pathlib import Path
start = Path(sys.argv[3])
while not start.exists():  # both processes ask at the same instant
    time.sleep(0.005)
from bevtrain.data import index
t0 = time.perf_counter()
present = index.prepare_indexes(sys.argv[1], "mini", ["train", "val"], 3, sys.argv[2])
recs, info = index.load_index(sys.argv[1], "mini", "val", 3, sys.argv[2], verbose=False)
print("RESULT", os.getpid(), present, len(recs), "nuscenes" in sys.modules, index.DEVKIT_LOADS, flush=True)
"""


def test_two_processes_starting_together_build_once(synthetic_root, tmp_path):
    cache, start = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", ASK, str(synthetic_root), str(cache), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    time.sleep(3)  # both are importing and then polling for the start file
    start.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "".join(outs)
    assert both.count("building the v1.0-mini/mini_train, v1.0-mini/mini_val index") == 1, both
    results = [line.split() for out in outs for line in out.splitlines() if line.startswith("RESULT")]
    loads = sorted(int(r[-1]) for r in results)
    assert loads == [0, 1], both  # one table load on this machine, by one of them
    assert len({r[-3] for r in results}) == 1  # the same val records in both
    assert all(r[-2] == "False" for r in results), "the devkit is loaded in the builder child only"
    builder = next(out for out in outs if "building the v1.0-mini/mini_train" in out)
    waiter = next(out for out in outs if out is not builder)
    assert "[bevtrain] waiting for " in waiter, both  # it waited for the builder, then read the cache
    assert len(list(cache.glob("v1.0-mini_mini_*.pkl"))) == 2


def test_a_build_leaves_the_asking_process_as_a_cache_hit_would(synthetic_root, tmp_path):
    """The devkit object never exists here, so nothing of it can stay resident after the build."""
    ask = f"index.prepare_indexes({str(synthetic_root)!r}, 'mini', ['train'], 3, {str(tmp_path)!r}, False); "
    code = ("import sys; from bevtrain.data import index; " + ask +
            "print(sorted(m for m in sys.modules if m.startswith('nuscenes')), index.DEVKIT_LOADS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] 1", out.stdout


def _killed_build(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_builder_killed_is_an_error_and_releases_the_lock(synthetic_root, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(index, "_build_splits", _killed_build)
        with pytest.raises(RuntimeError, match="died with signal 9.*out-of-memory.*nothing was cached"):
            index.prepare_indexes(synthetic_root, "mini", ["val"], 3, tmp_path, verbose=False)
    assert not list(tmp_path.glob("*.pkl"))
    assert index.prepare_indexes(synthetic_root, "mini", ["val"], 3, tmp_path, verbose=False) == [False]
    assert index.prepare_indexes(synthetic_root, "mini", ["val"], 3, tmp_path, verbose=False) == [True]


def test_a_table_error_in_the_builder_reaches_the_caller(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "v1.0-mini", root / "v1.0-mini")
    (root / "v1.0-mini" / "sample.json").write_text("[{")
    with pytest.raises(index.DataTableError, match="sample.json"):
        index.load_index(root, "mini", "train", 3, tmp_path / "cache", verbose=False)
