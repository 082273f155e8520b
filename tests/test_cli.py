"""The command lines tell the truth, early: every entry point checks its arguments before any work
(one ``error:`` line, exit 2, no traceback), presets by name from any folder, the synthetic set only
for the synthetic preset, data errors as their message alone (exit 65), what a run chose (workers,
threads, precision) said in its first lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevtrain import config
from bevtrain.config import DEFAULTS, ConfigError, resolve_config

REPO = Path(__file__).resolve().parents[1]
EXIT_DATA = 65


def run(args, cwd: Path, script: str = "train_nuscenes.py", timeout: float = 300, **env):
    """A command of the checkout in a fresh process, from ``cwd``; -m module when ``script`` has no .py."""
    cmd = [sys.executable, str(REPO / script)] if script.endswith(".py") else [sys.executable, "-m", script]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    r.seconds = time.perf_counter() - t0
    return r


def tiny_args(tmp_path: Path, data: Path, **over) -> list:
    flags = dict(
        data_dir=str(data), dset="mini", encoder_type="res18", encoder_weights="none", res_scale=0.25,
        Z=32, Y=4, X=32, latent_dim=16, batch_size=1, grad_acc=1, max_iters=1, log_freq=1, do_val=False,
        save_freq=100, viz_freq=0, seed=0, exp_name="c", device="cpu",
        log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ckpt"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    flags.update(over)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def assert_usage_error(r, *fragments):
    """One ``error:`` line, exit 2, no traceback, nothing else on stderr."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "args, fragments",
    [
        # issue 25 item 1: fire found a stray positional only after training
        (["configs/quickstart.yaml"], ["unexpected argument 'configs/quickstart.yaml'",
                                       "did you mean --config=configs/quickstart.yaml"]),
        # item 5: tracebacks and misleading messages
        (["--encoder_type=res34"], ["'encoder_type' must be one of", "res101", "res50", "res18", "effb0",
                                    "effb4"]),
        (["--ncams=-1"], ["'ncams' must be >= 0", "got -1"]),  # the upper bound is the rig's (dataset)
        (["--bounds=[1.0,2.0]"], ["'bounds' needs 6 numbers (XMIN XMAX YMIN YMAX ZMIN ZMAX), got 2"]),
        (["--bounds=[-9,9,-5,5,-9]"], ["'bounds' needs 6 numbers", "got 5"]),  # issue 26 item 5
        (["--init_dir=checkpoints/nope"], ["--init_dir=checkpoints/nope does not exist"]),
        (["--lrr=1e-3"], ["did you mean 'lr'"]),
        (["--max_iters=1", "--", "extra"], ["'--'"]),
        (["-x"], ["unknown option '-x'"]),
    ],
    ids=["positional", "encoder", "ncams", "bounds", "bounds5", "init_dir", "typo", "separator", "dash"],
)
def test_training_flags_are_checked_before_any_work(tmp_path, args, fragments):
    r = run(tiny_args(tmp_path, tmp_path / "no_data_needed", max_iters=None) + args, tmp_path)
    assert_usage_error(r, *fragments)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()
    assert r.seconds < 60  # an import of torch and a config, not a training run


def test_help_lists_encoders_and_every_flag_described():
    from bevtrain.config import flags_help

    text = flags_help()
    assert "(one of: res101, res50, res18, effb0, effb4)" in text and "..." not in text and "…" not in text
    assert "~/.cache/bevtrain/index" in text  # item 11: not "the dataset's default"
    for name in DEFAULTS:
        assert f"  --{name}=" in text


def test_flag_tables_match_the_code_they_describe():
    from bevtrain.data.index import CAMERA_NAMES
    from bevtrain.model.encoders import ENCODER_TYPES as BUILT

    assert set(config.ENCODER_TYPES) == set(BUILT) and config.NUM_CAMERAS == len(CAMERA_NAMES)


def test_bool_flags_take_true_and_false_as_text():
    cfg, _ = resolve_config({"shuffle": "false", "do_val": "True"})
    assert cfg.shuffle is False and cfg.do_val is True
    with pytest.raises(ConfigError, match="'shuffle' expects bool"):
        resolve_config({"shuffle": "maybe"})


def test_presets_by_name_from_any_folder(tmp_path, monkeypatch):
    """Item 7: --config=NAME, NAME.yaml or the README's configs/NAME.yaml from another folder."""
    monkeypatch.chdir(tmp_path)
    for value in ("rgb", "rgb.yaml", "configs/rgb.yaml"):
        assert config.find_preset(value) == REPO / "configs" / "rgb.yaml"
        cfg, _ = resolve_config({"config": value})
        assert cfg.encoder_type == "res101" and cfg.max_iters == 25000
    (tmp_path / "mine.yaml").write_text("lr: 1.0e-3\n")
    assert resolve_config({"config": "mine.yaml"})[0].lr == 1e-3  # a file here wins
    with pytest.raises(ConfigError) as err:
        resolve_config({"config": "rbg"})
    assert "presets: lidar, maps, multiclass, quickstart, quickstart_maps, radar, rgb" in str(err.value)


def test_presets_ship_with_a_regular_install():
    """setup.cfg installs configs/*.yaml where preset_dirs() looks after a non-editable install."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    listed = setup["options.data_files"]["share/bevtrain/configs"].split()
    assert sorted(listed) == sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))


def test_synthetic_set_only_for_the_synthetic_preset(tmp_path, monkeypatch):
    """Item 3: Simple-BEV's command without its data stops naming data_dir, before any download or
    generation; the quickstart preset (synthetic: true) still falls back to the synthetic set."""
    from bevtrain.build import resolve_data_dir

    monkeypatch.chdir(tmp_path)
    cfg, _ = resolve_config({"config": "rgb", "synthetic_dir": str(tmp_path / "synth")})
    with pytest.raises(ConfigError, match="data/nuscenes does not exist .*--config=quickstart"):
        resolve_data_dir(cfg)
    assert not (tmp_path / "synth").exists()
    quick, _ = resolve_config({"config": "quickstart"})
    assert quick.synthetic is True and not cfg.synthetic
    r = run(["--config=rgb", f"--synthetic_dir={tmp_path / 'synth'}"], tmp_path, timeout=120)
    assert_usage_error(r, "data/nuscenes does not exist", "--config=quickstart or --synthetic=True")
    assert not (tmp_path / "synth").exists()


def test_nworkers_default_fits_the_machine():
    """Item 3/nworkers: Simple-BEV's 12 lowered to the CPUs here unless given."""
    cfg, _ = resolve_config({})
    assert cfg.nworkers == min(config.SIMPLE_BEV_NWORKERS, config.usable_cpus())
    assert resolve_config({"nworkers": 12})[0].nworkers == 12  # given: as given
    assert resolve_config({"config": "quickstart"})[0].nworkers == 1  # the preset's own


def test_a_run_says_what_it_chose_without_torch_warnings(tmp_path, synthetic_root):
    """Default nworkers: no DataLoader 'suggested max' warning; the precision, the workers and the CPU
    threads in the first line (item 10, item 11: 'bf16', not 'torch.bfloat16')."""
    r = run(tiny_args(tmp_path, synthetic_root, amp="bf16", nworkers=None), tmp_path, OMP_NUM_THREADS="2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "suggested max" not in r.stderr and "Warning" not in r.stderr, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("[bevtrain] run ")]
    assert "precision bf16;" in line and "torch." not in line
    workers = min(config.SIMPLE_BEV_NWORKERS, config.usable_cpus())
    assert f"{workers} loader worker" in line and "CPU thread" in line and "CPUs idle" in line
    r = run(tiny_args(tmp_path, synthetic_root, nworkers=0, threads=1), tmp_path)
    assert r.returncode == 0 and "1 CPU thread (--threads)" in r.stdout


def test_threads_auto_never_raises_and_flag_sets(monkeypatch):
    """Item 10: on a busy machine one thread, on an idle one torch's own count at most; --threads=N."""
    import torch

    from bevtrain import build

    before = torch.get_num_threads()
    cpus = config.usable_cpus()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(build, "_AUTO_THREADS", None)
        monkeypatch.setattr(build, "idle_cpus", lambda: float(cpus))
        assert build.configure_threads(0, torch.device("cpu")).startswith("1 CPU thread (auto")
        assert torch.get_num_threads() == 1  # what the caller (or OMP_NUM_THREADS) set stands
        if cpus >= 2:
            torch.set_num_threads(2)
            monkeypatch.setattr(build, "_AUTO_THREADS", None)
            monkeypatch.setattr(build, "idle_cpus", lambda: 0.3)  # the others are busy
            assert build.configure_threads(0, torch.device("cpu")) == (
                f"1 CPU thread (auto: 0.3 of {cpus} CPUs idle; --threads=N to choose)")
            assert torch.get_num_threads() == 1
            torch.set_num_threads(2)  # chosen once per process: a later run computes alike
            assert build.configure_threads(0, torch.device("cpu")).startswith("1 CPU thread")
        assert build.configure_threads(2, torch.device("cpu")) == "2 CPU threads (--threads)"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_idle_cpus_sees_a_busy_cpu():
    """The measurement behind the auto choice: a CPU kept busy by another process is not idle."""
    import subprocess as sp

    from bevtrain import build

    if not Path("/proc/stat").is_file() or not shutil.which("taskset"):
        pytest.skip("no /proc/stat or taskset")
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = sp.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert build.idle_cpus([cpu], window=0.5) < 0.5
    finally:
        spin.kill()
        spin.wait()


def _break_data(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst, copy_function=os.link)  # hard links: the files changed are rewritten
    tables = dst / "v1.0-mini"
    if how == "jpeg":
        for jpg in (dst / "samples" / "CAM_FRONT").glob("*.jpg"):
            data = jpg.read_bytes()
            jpg.unlink()
            jpg.write_bytes(data[:2000])
    elif how == "intrinsic":
        path = tables / "calibrated_sensor.json"
        rows = json.loads(path.read_text())
        next(r for r in rows if r["camera_intrinsic"])["camera_intrinsic"][0][0] = float("nan")
        path.unlink()
        path.write_text(json.dumps(rows))
    elif how == "ego_pose":
        path = tables / "ego_pose.json"
        text = path.read_text()
        path.unlink()
        path.write_text(text[: len(text) // 2])


@pytest.mark.parametrize("how, fragment", [
    ("jpeg", "is truncated: no JPEG end-of-image marker"),
    ("intrinsic", "camera_intrinsic has fx=nan"),
    ("ego_pose", "ego_pose.json"),
])  # fmt: skip
def test_data_errors_print_their_message_alone(tmp_path, synthetic_root, how, fragment):
    """Item 13: a truncated JPEG (found by a loader worker), a NaN intrinsic, a half-written table:
    the named message alone, exit 65; the traceback with --debug (and, once the run has a folder, in
    its error.txt)."""
    data = tmp_path / "data"
    _break_data(synthetic_root, data, how)
    args = tiny_args(tmp_path, data, nworkers=1)
    r = run(args, tmp_path)
    assert r.returncode == EXIT_DATA, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and fragment in r.stderr.splitlines()[0], r.stderr
    assert "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2 and "--debug" in r.stderr
    if how == "jpeg":  # found while training: the run folder holds the traceback
        (saved,) = (tmp_path / "logs").glob("*/error.txt")
        assert "Traceback" in saved.read_text() and str(saved) in r.stderr
    debug = run(args + ["--debug=True"], tmp_path)
    assert debug.returncode == EXIT_DATA and "Traceback" in debug.stderr


@pytest.mark.parametrize("flags, fragments", [
    (["--classes=[vehicle,carpark_area]"],
     ["maps/expansion/boston-seaport.json do(es) not exist", "v1.3", "nuScenes-map-expansion-v1.3"]),
    (["--classes=[vehicle,spaceships]", "--class_groups={spaceships: {categories: [vehicle.spaceship]}}"],
     ["class 'spaceships'", "matches no category", "vehicle.car"]),
])  # fmt: skip
def test_map_and_class_errors_stop_training_with_their_message(tmp_path, synthetic_root, flags, fragments):
    """Issue 22: a map output on a dataroot without the expansion file of a location its split uses, and a
    class group that matches no category, stop the run before any step: the message alone, exit 65."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data, copy_function=os.link)
    (data / "maps" / "expansion" / "boston-seaport.json").unlink()  # the val scenes' location
    r = run(tiny_args(tmp_path, data, nworkers=0, do_val=True) + flags, tmp_path)
    assert r.returncode == EXIT_DATA, r.stdout[-2000:] + r.stderr[-3000:]
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: ") and all(f in first for f in fragments), r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("ckpt/*/*.pth"))


def test_tools_check_their_arguments(tmp_path):
    """verify, the synthetic generator and the Simple-BEV converter: one error: line, exit 2 (item 11:
    convert_simplebev without arguments said nothing; verify takes --nworkers like training)."""
    r = run([], tmp_path, script="bevtrain.convert_simplebev", timeout=120)
    assert_usage_error(r, "SRC and DST are required")
    r = run(["a", "b", "c"], tmp_path, script="bevtrain.convert_simplebev", timeout=120)
    assert_usage_error(r, "unexpected argument 'c'")
    r = run(["a", "b", "--lod_step=3"], tmp_path, script="bevtrain.convert_simplebev", timeout=120)
    assert_usage_error(r, "did you mean 'load_step'")
    r = run(["--data_dir=x", "--wrkers=2"], tmp_path, script="bevtrain.data.verify", timeout=120)
    assert_usage_error(r, "unknown flag '--wrkers'; did you mean '--nworkers'")
    r = run(["--data_dir=x", "stray"], tmp_path, script="bevtrain.data.verify", timeout=120)
    assert_usage_error(r, "unexpected argument 'stray'")
    r = run(["--out=x", "--scene=2"], tmp_path, script="bevtrain.synthetic", timeout=120)
    assert_usage_error(r, "did you mean '--scenes'")
    assert not (tmp_path / "x").exists()


def test_verify_takes_nworkers(synthetic_root, tmp_path):
    r = run([f"--data_dir={synthetic_root}", "--dset=mini", "--split=val", "--nworkers=1",
             f"--cache_dir={tmp_path / 'cache'}"], tmp_path, script="bevtrain.data.verify")  # fmt: skip
    assert r.returncode == 0 and "with 1 processes" in r.stdout, r.stdout + r.stderr
