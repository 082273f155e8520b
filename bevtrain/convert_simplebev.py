"""Simple-BEV checkpoints in bevtrain: the settings they need, and conversion to a bevtrain checkpoint.

    python -m bevtrain.convert_simplebev SRC DST [--load_step=N] [--use_radar=True --use_metaradar=True ...]

SRC is a Simple-BEV checkpoint folder (``checkpoints/8x5_5e-4_rgb12_22:43:46``, newest
``model-*.pth`` unless ``--load_step``) or one ``.pth`` file, as written by its
``saverloader.save`` (``module.`` prefixes or not). DST is a folder (``DST/model-<step>.pth`` +
``config.yaml``) or a ``.pth`` path. The file holds no config: model settings come from the flags,
defaulting to Simple-BEV's, and the converted checkpoint records them with ``compat='simplebev'``.
``eval_nuscenes.py`` and ``train_nuscenes.py --init_dir`` also read Simple-BEV folders directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

from bevtrain import __version__
from bevtrain.checkpoint import CheckpointError, atomic_save, is_simplebev, load_checkpoint, resolve_init
from bevtrain.config import DEFAULTS, FLAG_BY_NAME, Config, ConfigError, dump_yaml, resolve_config

# What a Simple-BEV checkpoint needs besides its model flags: its forward pass and inputs, and
# (where the flags exist) its ground truth and radar features. Flags given explicitly win.
SIMPLEBEV_MODE: Dict[str, Any] = {
    "compat": "simplebev",
    "target_raster": "simplebev",
    "radar_features": "simplebev",
}


def simplebev_mode(explicit: Mapping[str, Any] | set = ()) -> Dict[str, Any]:
    """The SIMPLEBEV_MODE values for flags that exist and were not set explicitly."""
    return {k: v for k, v in SIMPLEBEV_MODE.items() if k in FLAG_BY_NAME and k not in explicit}


def simplebev_base_config() -> Dict[str, Any]:
    """The config a Simple-BEV checkpoint is read with before flags: Simple-BEV's defaults + its mode."""
    return {**DEFAULTS, **simplebev_mode()}


def convert_weights(model: torch.nn.Module, ckpt: Mapping[str, Any], source: Any) -> Dict[str, torch.Tensor]:
    """The checkpoint's weights with ``model``'s names: converted for a Simple-BEV file, as is otherwise."""
    if not is_simplebev(ckpt):
        return ckpt["model"]
    from bevtrain.model.simplebev_compat import SimplebevCheckpointError, convert_state_dict

    try:
        return convert_state_dict(ckpt["model"], model, source=f"Simple-BEV checkpoint {source}")
    except SimplebevCheckpointError as e:
        raise CheckpointError(str(e)) from None


def check_simplebev_settings(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], source: Any) -> None:
    """Fail early (before data or model are built) when the flags do not fit a Simple-BEV file."""
    from bevtrain.model.simplebev_compat import SimplebevCheckpointError, check_settings

    if cfg.get("compat") != "simplebev":
        return
    try:
        check_settings(ckpt["model"], cfg, f"Simple-BEV checkpoint {source}")
    except SimplebevCheckpointError as e:
        raise CheckpointError(str(e)) from None


def _source_file(src: str, load_step: Any) -> Path:
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"SRC {src} does not exist (a Simple-BEV checkpoint folder or a .pth file)")
    if load_step not in (None, False, True, ""):
        if not path.is_dir():
            raise CheckpointError(f"--load_step={load_step} needs SRC to be a checkpoint folder, not {src}")
        path = path / f"model-{int(load_step):09d}.pth"
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist")
        return path
    return resolve_init(src)


def convert(src: str, dst: str, load_step: Any = None, **flags: Any) -> Tuple[Path, Config]:
    """Convert a Simple-BEV checkpoint into a bevtrain checkpoint; returns (written file, config)."""
    from bevtrain.build import build_model

    src_file = _source_file(src, load_step)
    ckpt = load_checkpoint(src_file, pick="another SRC")
    if not is_simplebev(ckpt):
        raise CheckpointError(f"{src_file} is already a bevtrain checkpoint (it holds 'model')")
    cfg, explicit = resolve_config(flags, base=simplebev_base_config())
    if cfg.compat != "simplebev":
        raise ConfigError("a converted Simple-BEV checkpoint needs --compat=simplebev (its forward pass)")
    cfg = cfg.replace(init_dir="", encoder_weights="none")
    check_simplebev_settings(ckpt, cfg, src_file)
    model = build_model(cfg)
    state = convert_weights(model, ckpt, src_file)
    model.load_state_dict(state, strict=True)
    out = Path(dst)
    target = out if out.suffix == ".pth" else out / f"model-{ckpt['step']:09d}.pth"
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": None,
            "scheduler": None,
            "scaler": None,
            "step": ckpt["step"],
            "rng": [],
            "data": {},
            "config": Config(cfg).to_dict(),
            "run_name": target.parent.name,
            "version": __version__,
            "world_size": 1,
            "nonfinite_total": 0,
            "converted_from": str(src_file.resolve()),
        },
        target,
    )
    if out.suffix != ".pth":
        (out / "config.yaml").write_text(dump_yaml(cfg))
    return target, cfg


def main(*args: Any, **flags: Any) -> None:
    """``python -m bevtrain.convert_simplebev SRC DST [--load_step=N] [model flags]``: every argument
    checked first, errors as one ``error:`` line (bevtrain.cli)."""
    from bevtrain.cli import run_command

    if flags.pop("help", False) or flags.pop("h", False):
        print(__doc__.strip())
        return
    debug = str(flags.get("debug", False)).lower() == "true"

    def command():
        if len(args) > 2:
            raise ConfigError(f"unexpected argument '{args[2]}': give SRC and DST, then --name=value flags")
        src = str(args[0]) if args else flags.pop("src", "")
        dst = str(args[1]) if len(args) > 1 else flags.pop("dst", "")
        if not src or not dst:
            raise ConfigError(
                "SRC and DST are required: python -m bevtrain.convert_simplebev SRC DST [--load_step=N] "
                "[--use_radar=True ...] (SRC: a Simple-BEV checkpoint folder or .pth; DST: a folder or .pth)"
            )
        load_step = flags.pop("load_step", None)
        if load_step is not None and (isinstance(load_step, bool) or not isinstance(load_step, int)):
            raise ConfigError(f"flag 'load_step' expects a step number, got {load_step!r}")
        flags.pop("debug", None)
        resolve_config(flags)  # every flag checked before the checkpoint is read
        target, cfg = convert(src, dst, load_step, **flags)
        keys = ("encoder_type", "latent_dim", "Y", "use_radar", "use_metaradar", "use_lidar",
                "do_rgbcompress")
        settings = ", ".join(f"{k}={cfg[k]}" for k in keys)
        print(f"[bevtrain] wrote {target} ({settings}, compat={cfg.compat})")

    run_command(command, debug=debug, usage_errors=(CheckpointError,))


if __name__ == "__main__":
    from bevtrain.cli import fire_main

    fire_main(main)
