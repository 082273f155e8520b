"""Export a checkpoint for a fixed camera rig as a torch.export program (README "Export").

    python -m bevtrain.export --init_dir=checkpoints/<run> --rig=rig.yaml --out=model.pt2

``model.pt2`` takes only the images, (B, S, 3, H, W) float RGB in [0, 1] (B free), S cameras in
the rig's model order (reference camera first, then the others in the file's order), each resized
to H x W as ``bevtrain.predict`` does (a plain resize of the whole frame); it returns (B, C, Z, X)
probabilities of the checkpoint's classes. The rig's intrinsics (scaled to H x W) and extrinsics
are constants inside. ``model.json`` beside it records the rig, the grid, the classes and the
input layout.

The network's default lift (a sparse matrix built per batch from the visible voxel/pixel pairs)
has data-dependent sizes, which torch.export cannot trace; the program uses the dense reference
lift (``lift_impl='reference'``, the same numbers, grid_sample over every voxel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch

from bevtrain.data import augment
from bevtrain.predict import PredictError, check_rig_fits, grid_record, load_model, run_tool
from bevtrain.rig import Rig, read_rig

EXPORT_FORMAT = 1


def input_intrinsics(rig: Rig, final_dim: Tuple[int, int], compat: str = "none") -> np.ndarray:
    """(S, 4, 4) float64 pix_T_cams of the resized inputs, as ``load_frame_images`` computes them."""
    fH, fW = final_dim
    out = []
    for cam in rig.model_order():
        src_wh = (cam.width, cam.height)
        if compat == "simplebev":
            steps = [("scale", fW / float(cam.width), fH / float(cam.height))]
            out.append(augment.transform_intrinsics(cam.pix_T_cam, steps, "simplebev"))
            continue
        f = augment.decode_factor(src_wh, (fW, fH))
        dec_w, dec_h = augment.decoded_size(src_wh, f)
        steps = [("scale", 1.0 / f, 1.0 / f)] if f > 1 else []
        if (dec_w, dec_h) != (fW, fH):
            steps.append(("scale", fW / dec_w, fH / dec_h))
        out.append(augment.transform_intrinsics(cam.pix_T_cam, steps))
    return np.stack(out)


class RigNet(torch.nn.Module):
    """The network with one rig's matrices inside: images (B, S, 3, H, W) -> probabilities (B, C, Z, X)."""

    def __init__(self, model: torch.nn.Module, pix_T_cams: np.ndarray, cams_T_ref: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("pix_T_cams", torch.from_numpy(pix_T_cams.astype(np.float32)))  # (S,4,4)
        self.register_buffer("cams_T_ref", torch.from_numpy(cams_T_ref.astype(np.float32)))  # (S,4,4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        pix = self.pix_T_cams.unsqueeze(0).expand(B, -1, -1, -1)
        cams = self.cams_T_ref.unsqueeze(0).expand(B, -1, -1, -1)
        return torch.sigmoid(self.model(images, pix, cams)["seg"].float())


def export(init_dir: str = "", rig: str = "", out: str = "model.pt2", load_step: Any = None,
           batch: int = 2) -> Dict[str, Any]:
    if not (init_dir and rig):
        raise PredictError("--init_dir=<run or model-*.pth> and --rig=<rig.yaml> are required")
    the_rig = read_rig(rig)
    loaded = load_model(init_dir, load_step, torch.device("cpu"))
    cfg = loaded.cfg
    check_rig_fits(the_rig, cfg, loaded.file, rig)
    final_dim = augment.final_dim_for(cfg.res_scale)
    loaded.model.lift_impl = "reference"  # the sparse lift's sizes depend on the data: not traceable
    net = RigNet(loaded.model, input_intrinsics(the_rig, final_dim, cfg.compat), the_rig.cams_T_ref()).eval()
    S = len(the_rig.cameras)
    example = torch.rand(int(batch), S, 3, *final_dim)  # (B,S,3,H,W)
    dims = {"images": {0: torch.export.Dim("batch", min=1, max=1024)}}
    batch_note = "any batch size 1..1024"
    with torch.no_grad():
        try:
            program = torch.export.export(net, (example,), dynamic_shapes=dims)
        except torch._dynamo.exc.UserError as e:  # a batch-size guard (compat='simplebev' lift)
            first = str(e).strip().splitlines()[0]
            batch_note = f"batch size {int(batch)} only (--batch): the network fixes it ({first})"
            program = torch.export.export(net, (example,))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    record = {
        "format": EXPORT_FORMAT,
        "program": path.name,
        "checkpoint": str(loaded.file.resolve()), "step": loaded.step,
        "batch": batch_note,
        "input": {"name": "images", "shape": ["B", S, 3, final_dim[0], final_dim[1]], "dtype": "float32",
                  "range": [0.0, 1.0], "channels": "RGB", "cameras": the_rig.names_in_model_order(),
                  "resize": f"each whole frame resized to {final_dim[1]}x{final_dim[0]} (no crop), as "
                            f"python -m bevtrain.predict does"},
        "output": {"shape": ["B", len(cfg.model.outputs), int(cfg.Z), int(cfg.X)], "what": "probabilities",
                   "classes": [c.name for c in cfg.model.outputs]},
        "grid": grid_record(cfg), "compat": cfg.compat, "rig": the_rig.to_dict(),
    }
    side = path.with_suffix(".json")
    side.write_text(json.dumps(record, indent=2))
    print(f"[export] {path} (torch.export program, {batch_note}) and {side} (rig, grid, classes); "
          f"input {record['input']['shape']}, output {record['output']['shape']}")
    return record


def main(*args: Any, **flags: Any) -> Dict[str, Any]:
    return run_tool(export, args, flags, doc=__doc__, prog="export", flag_for_path="out")


def cli(*args: Any, **flags: Any) -> None:
    main(*args, **flags)


if __name__ == "__main__":
    from bevtrain.cli import fire_main

    fire_main(cli)
