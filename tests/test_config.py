"""Flags: Simple-BEV names/defaults, YAML presets, precedence, type checks, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bevtrain.config import (
    DEFAULTS,
    FLAG_BY_NAME,
    FLAGS,
    ConfigError,
    fill_legacy,
    format_lr,
    resolve_config,
    run_name,
)

REPO = Path(__file__).resolve().parents[1]

SIMPLE_BEV_DEFAULTS = dict(
    exp_name="debug", max_iters=100000, log_freq=1000, shuffle=True, dset="trainval", do_val=True,
    val_freq=100, save_freq=1000, batch_size=8, grad_acc=5, lr=3e-4, use_scheduler=True,
    weight_decay=1e-7, nworkers=12, ckpt_dir="checkpoints/", keep_latest=1, init_dir="",
    ignore_load=None, load_step=False, load_optimizer=False, res_scale=2, rand_flip=True,
    rand_crop_and_resize=True, ncams=6, nsweeps=3, encoder_type="res101", use_radar=False,
    use_radar_filters=False, use_lidar=False, use_metaradar=False, do_rgbcompress=True,
    do_shuffle_cams=True, device_ids=[0, 1, 2, 3], seqlen=1, refcam_id=1, get_tids=False,
    temporal_aug=False,
)


def test_simple_bev_flags_keep_names_and_defaults():
    for name, value in SIMPLE_BEV_DEFAULTS.items():
        assert DEFAULTS[name] == value, name
    assert {"data_dir", "log_dir"} <= set(DEFAULTS)
    simple = {f.name for f in FLAGS if f.simple_bev}
    assert set(SIMPLE_BEV_DEFAULTS) | {"data_dir", "log_dir"} == simple


def test_precedence_defaults_yaml_command_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"lr": 1e-3, "batch_size": 4, "exp_name": "fromyaml"}))
    cfg, explicit = resolve_config({"config": str(preset), "batch_size": 2})
    assert cfg.lr == 1e-3 and cfg.batch_size == 2 and cfg.exp_name == "fromyaml"
    assert cfg.grad_acc == 5  # default
    assert {"lr", "batch_size", "exp_name"} <= explicit and "grad_acc" not in explicit


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_resolve(path):
    cfg, _ = resolve_config({"config": str(path)})
    assert cfg.max_iters >= 1


def test_rgb_preset_is_the_paper_recipe():
    cfg, _ = resolve_config({"config": str(REPO / "configs/rgb.yaml")})
    assert (cfg.encoder_type, cfg.res_scale, cfg.ncams, cfg.batch_size, cfg.grad_acc, cfg.max_iters) == (
        "res101", 2, 6, 8, 5, 25000)


@pytest.mark.parametrize("preset", ["rgb", "radar", "lidar"])
def test_paper_presets_and_default_use_simplebevs_targets(preset):
    assert DEFAULTS["target_raster"] == "simplebev"
    text = (REPO / "configs" / f"{preset}.yaml").read_text()
    assert yaml.safe_load(text)["target_raster"] == "simplebev"  # stated, not only inherited
    with pytest.raises(ConfigError, match=r"'target_raster' must be one of \['simplebev', 'exact'\]"):
        resolve_config({"config": str(REPO / "configs" / f"{preset}.yaml"), "target_raster": "fillpoly"})


def test_configs_saved_before_target_raster_mean_exact():
    old = {k: v for k, v in DEFAULTS.items() if k != "target_raster"}
    filled, legacy = fill_legacy(old)
    assert filled["target_raster"] == "exact" and legacy == {"target_raster": "exact"}
    assert fill_legacy(DEFAULTS) == (dict(DEFAULTS), {})
    cfg, _ = resolve_config({}, base=filled)
    assert cfg.target_raster == "exact"


def test_unknown_flag_and_yaml_key_suggest_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown flag 'bach_size'.*did you mean 'batch_size'"):
        resolve_config({"bach_size": 2})
    preset = tmp_path / "bad.yaml"
    preset.write_text("grad_accum: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'grad_accum'.*did you mean 'grad_acc'"):
        resolve_config({"config": str(preset)})


@pytest.mark.parametrize(
    "flags, pattern",
    [
        ({"lr": "fast"}, "'lr' expects float"),
        ({"max_iters": 2.5}, "'max_iters' expects int"),
        ({"shuffle": 1}, "'shuffle' expects bool"),
        ({"amp": "fp8"}, "'amp' must be one of"),
        ({"device_ids": ["a"]}, "'device_ids' expects list\\[int\\]"),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        ({"device": "gpu"}, "'device' must be"),
    ],
)
def test_bad_values_name_the_flag(flags, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(flags)


def test_lossless_coercions():
    flags = {"max_iters": 1e4, "lr": 1, "exp_name": 3, "device_ids": 1, "ignore_load": "decoder"}
    cfg, _ = resolve_config(flags)
    assert cfg.max_iters == 10000 and isinstance(cfg.max_iters, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.exp_name == "3" and cfg.device_ids == [1] and cfg.ignore_load == ["decoder"]
    assert resolve_config({"resume": True})[0].resume is True
    assert resolve_config({"resume": "runs/x"})[0].resume == "runs/x"


def test_run_name_and_lr_format():
    assert format_lr(3e-4) == "3e-4" and format_lr(2.5e-4) == "2.5e-4" and format_lr(1e-3) == "1e-3"
    cfg, _ = resolve_config({"batch_size": 1, "grad_acc": 5, "lr": 3e-4, "exp_name": "rgb03"})
    assert run_name(cfg, "17:45:58") == "1x5_3e-4s_rgb03_17:45:58"
    cfg, _ = resolve_config({"use_scheduler": False})
    assert run_name(cfg, "01:02:03") == "8x5_3e-4_debug_01:02:03"


def test_cli_errors_are_clear(tmp_path):
    """The front door: unknown flag and missing data_dir give readable errors; --help lists flags."""
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "train_nuscenes.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})

    r = run("--lrr=1e-3")
    assert r.returncode == 2 and "did you mean 'lr'" in r.stderr and "Traceback" not in r.stderr
    r = run("--data_dir=/nonexistent/nuscenes", "--nworkers=0", "--encoder_weights=none")
    assert r.returncode == 2 and "/nonexistent/nuscenes does not exist" in r.stderr
    r = run("--help")  # fire would pass it on as an unknown flag 'help'
    assert r.returncode == 0 and "--batch_size=8" in r.stdout and "--grad_acc=5" in r.stdout


def test_a_missing_data_dir_stops_the_cli_at_once(tmp_path, synthetic_root, capsys):
    """In process, through train_nuscenes.py's own entry (cli): a --data_dir that does not exist and is
    not the default is a ConfigError naming it, printed without a traceback (exit 2), before any run
    folder. The synthetic fallback points at the ready test set, so were the error dropped, the run
    would train on it at once and this test would fail in seconds rather than hang."""
    from conftest import TEST_SET

    from bevtrain.train import cli

    missing = tmp_path / "no" / "nuscenes"
    flags = dict(
        data_dir=str(missing), dset="mini", synthetic_dir=str(synthetic_root),
        synthetic_keyframes=TEST_SET["keyframes"], encoder_type="res18", encoder_weights="none",
        res_scale=0.25, Z=16, Y=4, X=16, latent_dim=16, batch_size=1, grad_acc=1, max_iters=1,
        do_val=False, viz_freq=0, nworkers=0, log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli(**flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"flag 'data_dir': {missing} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


def test_sections_partition_the_flags_and_carry_their_values():
    from dataclasses import fields

    from bevtrain.config import SECTIONS, DataConfig, ModelConfig

    in_sections = {f.name for section in SECTIONS for f in fields(section)}
    assert in_sections == set(FLAG_BY_NAME)  # every flag read by some part, no field without a flag
    cfg, _ = resolve_config({"lr": 1e-3, "Z": 40, "classes": ["vehicle", "human"]})
    assert cfg.optim.lr == 1e-3 and cfg.data.Z == cfg.model.Z == 40
    assert cfg.data.classes == ("vehicle", "human")  # lists become tuples: sections are hashable values
    assert DataConfig.make(dset="mini").res_scale == FLAG_BY_NAME["res_scale"].default
    with pytest.raises(ConfigError, match="'latent_dim'"):
        DataConfig.make(latent_dim=3)  # a model setting, not data
    with pytest.raises(ConfigError, match="expects int"):
        ModelConfig.make(latent_dim="wide")


def test_override_saved_reports_changes_and_legacy_values():
    from bevtrain.config import override_saved

    saved = {**DEFAULTS, "lr": 5e-4, "stop_at": 7}
    del saved["target_raster"]  # a run saved before the flag existed
    cfg, legacy, changed = override_saved(saved, {"lr": 1e-3, "nworkers": 12}, drop=("stop_at",))
    assert cfg.lr == 1e-3 and cfg.stop_at == 0
    assert changed == {"lr": (5e-4, 1e-3)}
    assert legacy == {"target_raster": "exact"} and cfg.target_raster == "exact"


def test_path_values_are_accepted_where_a_string_is_expected(tmp_path):
    from bevtrain.config import DataConfig

    assert DataConfig.make(data_dir=tmp_path, cache_dir=tmp_path / "c").cache_dir == str(tmp_path / "c")
    cfg, _ = resolve_config({"log_dir": tmp_path})
    assert cfg.log_dir == str(tmp_path)


def test_bf16_if_native_follows_the_cpu_flags(tmp_path, monkeypatch):
    import torch

    from bevtrain import build

    with_bf16 = tmp_path / "cpuinfo_bf16"
    with_bf16.write_text("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    without = tmp_path / "cpuinfo_avx2"
    without.write_text("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert build.cpu_native_bf16(with_bf16) == ("avx512_bf16",)
    assert build.cpu_native_bf16(without) == () and build.cpu_native_bf16(tmp_path / "none") == ()
    cpu = torch.device("cpu")
    cases = ((build.cpu_native_bf16(with_bf16), torch.bfloat16, "this CPU has avx512_bf16"),
             (build.cpu_native_bf16(without), None, "this CPU lacks avx512_bf16 and amx_bf16"))
    for found, dtype, says in cases:
        monkeypatch.setattr(build, "cpu_native_bf16", lambda found=found: found)  # as if on that CPU
        assert build.amp_dtype("bf16_if_native", cpu) == dtype
        assert says in build.precision_note("bf16_if_native", cpu)
    # The other choices keep their meaning: auto is fp32 on the CPU, bf16 is bf16 anywhere.
    assert build.amp_dtype("auto", cpu) is None and build.amp_dtype("bf16", cpu) == torch.bfloat16
    assert build.precision_note("none", cpu) == "fp32"


def test_synthetic_size_and_channels_last(tmp_path):
    import torch

    from bevtrain.build import build_model

    with pytest.raises(ConfigError, match="synthetic_size"):
        resolve_config({"synthetic_size": [800]})
    with pytest.raises(ConfigError, match="synthetic_size"):
        resolve_config({"synthetic_size": [16, 9]})
    cfg, _ = resolve_config({"config": "configs/quickstart.yaml"})
    assert cfg.synthetic_size == [800, 450] and cfg.channels_last and cfg.amp == "bf16_if_native"
    model = build_model(cfg)
    conv = model.decoder.first_conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = build_model(cfg.replace(channels_last=False)).decoder.first_conv.weight
    assert plain.is_contiguous()
