"""Pictures people want to look at: camera rig with projected boxes, BEV truth, prediction, errors.

``render_composite(batch, out, i, vox_util, classes=..., viz_class=...)`` returns one RGB uint8 image
for sample ``i`` of a collated batch (README batch contract) and the model output (``out['seg']``
logits, (B, C, Z, X), one channel per class of ``classes``, default ``[vehicle]``). The training loop
and the evaluator both use it. With one class the prediction panel is its probability heat-map; with
several, the ground-truth and prediction panels draw every class in its registry colour
(``bevtrain.classes``): map layers as a coloured underlay (prediction: strength = probability), objects
as outlines over a light fill, and the legend lists them. The error panel shows ``viz_class``. Layout::

    +-----------------+-----------------+-----------------+
    | CAM_FRONT_LEFT  | CAM_FRONT       | CAM_FRONT_RIGHT |   GT boxes projected, coloured by
    | CAM_BACK_LEFT   | CAM_BACK        | CAM_BACK_RIGHT  |   visibility token
    +-----------------+-----------------+-----------------+
    | ground truth    | prediction p    | errors          |   BEV, forward up, ego + metre scale
    +-----------------+-----------------+-----------------+
    | legend                                              |
    +-----------------------------------------------------+

Drawing uses OpenCV on RGB arrays (colours below are RGB). GIFs are written with Pillow
(``write_gif``), imported only there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from bevtrain.classes import DEFAULT_CLASSES, OutputClass, resolve_classes
from bevtrain.data.index import CAMERA_NAMES
from bevtrain.disk import atomic_write, atomic_write_bytes
from bevtrain.geometry import apply_4x4, project_to_pixels, scale_intrinsics

CAM_NAMES = tuple(CAMERA_NAMES)  # cam_ids of a batch without cam_names index this list
# (row, col) of each camera in nuScenes' rig layout: front row on top, seen as if standing in the car.
# Other rigs: a grid of up to 3 columns in the batch's camera order (``rig_grid``).
RIG_LAYOUT = {name: divmod(k, 3) for k, name in enumerate(CAM_NAMES)}

# Visibility token -> colour: 1 = 0-40 % visible (ignored by Simple-BEV's protocol) ... 4 = 80-100 %.
VISIBILITY_COLORS = {1: (255, 60, 60), 2: (255, 160, 0), 3: (255, 235, 60), 4: (60, 220, 60)}
VISIBILITY_LABELS = {1: "vis 0-40%", 2: "vis 40-60%", 3: "vis 60-80%", 4: "vis 80-100%"}
UNKNOWN_VIS_COLOR = (200, 200, 200)

ERROR_COLORS = {
    "true positive": (40, 200, 70),
    "false positive": (235, 50, 50),
    "false negative": (50, 130, 255),
    "ignored (vis 0-40%)": (128, 128, 128),
}
GT_COLOR = (255, 255, 255)
BACKGROUND = (18, 18, 18)
EGO_COLOR = (0, 230, 230)
RING_COLOR = (70, 70, 70)
TEXT_COLOR = (235, 235, 235)
FONT = cv2.FONT_HERSHEY_SIMPLEX

# 12 edges of a box with the devkit's corner order (Box.corners(): 0-3 front face, 4-7 rear face).
BOX_EDGES = np.array(
    [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
)
# Ego footprint in the ego (body) frame: x forward, y left, origin at the rear axle (Renault Zoe).
EGO_FOOTPRINT = np.array([[3.1, 0.87, 0.0], [3.1, -0.87, 0.0], [-0.95, -0.87, 0.0], [-0.95, 0.87, 0.0]])
RANGE_RINGS_M = (20.0, 35.0, 50.0)  # the metric's distance bands
NEAR_PLANE_M = 0.2


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _put_text(
    img: np.ndarray, text: str, org: Tuple[int, int], scale: float = 0.5, color=TEXT_COLOR, max_width: int = 0
) -> int:
    """Outlined text (reads on any background), shrunk to fit ``max_width`` px; returns its width."""
    if max_width > 0:
        width = cv2.getTextSize(text, FONT, scale, 1)[0][0]
        if width > max_width:
            scale = max(0.25, scale * max_width / width)
    cv2.putText(img, text, org, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, FONT, scale, color, 1, cv2.LINE_AA)
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def _ui_scale(cell_width: int) -> float:
    """Text size relative to the 400-px cells the layout was drawn for."""
    return float(np.clip(cell_width / 400, 0.7, 1.5))


def _label_bar(width: int, height: int, text: str, right_margin: int = 0) -> np.ndarray:
    bar = np.full((height, width, 3), BACKGROUND, np.uint8)
    _put_text(bar, text, (6, height - 8), 0.55, max_width=width - 12 - right_margin)
    return bar


def image_to_uint8(image) -> np.ndarray:
    """(3, H, W) uint8 or float (0-1 or 0-255) -> contiguous (H, W, 3) uint8 RGB."""
    arr = _np(image) if not (torch.is_tensor(image) and image.dtype == torch.uint8) else image.cpu().numpy()
    if arr.dtype != np.uint8:
        arr = arr * 255.0 if arr.max() <= 1.5 else arr
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def camera_names_of(batch: Dict, i: int, ncams: int) -> List[str]:
    """Camera names of sample ``i``, in the batch's camera order.

    From ``cam_names`` (the dataset's JSON list per sample, any rig; or lists of names), else from
    ``cam_ids`` (indices into the nuScenes camera list), else the nuScenes order.
    """
    names = batch.get("cam_names")
    if isinstance(names, str) or (isinstance(names, (list, tuple)) and names and isinstance(names[0], str)
                                  and names[0].startswith("[")):
        one = names if isinstance(names, str) else names[i]
        decoded = json.loads(one)
        if len(decoded) == ncams:
            return [str(n) for n in decoded]
    if "cam_ids" in batch:
        ids = _np(batch["cam_ids"][i]).astype(int).tolist()
        return [CAM_NAMES[c] if 0 <= c < len(CAM_NAMES) else f"cam{c}" for c in ids]
    if names is not None:
        # Default collate turns a per-sample list of S names into S tuples of B names.
        if len(names) == ncams and isinstance(names[0], (list, tuple)):
            return [str(n[i]) for n in names]
        if len(names) == ncams and isinstance(names[0], str):
            return [str(n) for n in names]
    return list(CAM_NAMES[:ncams]) if ncams <= len(CAM_NAMES) else [f"cam{k}" for k in range(ncams)]


def project_box_edges(
    corners_ref: np.ndarray, cam_T_ref: np.ndarray, pix_T_cam: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel segments of box edges in one camera, clipped to the near plane.

    corners_ref (N, 8, 3) -> segments (N, 12, 2, 2) pixel xy, visible (N, 12) bool.
    """
    corners = torch.as_tensor(corners_ref, dtype=torch.float32)
    n = corners.shape[0]
    if n == 0:
        return np.zeros((0, 12, 2, 2), np.float32), np.zeros((0, 12), bool)
    xyz_cam = apply_4x4(torch.as_tensor(cam_T_ref, dtype=torch.float32), corners.reshape(-1, 3)).reshape(
        n, 8, 3
    )
    a = xyz_cam[:, BOX_EDGES[:, 0]]  # (N, 12, 3)
    b = xyz_cam[:, BOX_EDGES[:, 1]]
    za, zb = a[..., 2:3], b[..., 2:3]
    visible = ((za > NEAR_PLANE_M) | (zb > NEAR_PLANE_M))[..., 0]
    # Move the endpoint behind the near plane onto it, along the edge.
    t = ((NEAR_PLANE_M - za) / (zb - za).where((zb - za).abs() > 1e-9, torch.ones_like(za))).clamp(0, 1)
    a_clip = torch.where(za < NEAR_PLANE_M, a + t * (b - a), a)
    b_clip = torch.where(zb < NEAR_PLANE_M, a + t * (b - a), b)
    ends = torch.stack([a_clip, b_clip], dim=2).reshape(n, 24, 3)
    xy, _ = project_to_pixels(torch.as_tensor(pix_T_cam, dtype=torch.float32), ends)
    return xy.reshape(n, 12, 2, 2).numpy(), visible.numpy()


def draw_boxes_on_camera(
    image: np.ndarray,
    corners_ref: np.ndarray,
    visibility: np.ndarray,
    cam_T_ref: np.ndarray,
    pix_T_cam: np.ndarray,
    thickness: int = 1,
) -> np.ndarray:
    """Draws projected 3D boxes in place on an (H, W, 3) uint8 image; returns it."""
    segments, visible = project_box_edges(corners_ref, cam_T_ref, pix_T_cam)
    limit = 1e5  # keeps cv2's int32 points sane; cv2 clips lines to the image itself
    for box in range(segments.shape[0]):
        color = VISIBILITY_COLORS.get(int(visibility[box]), UNKNOWN_VIS_COLOR)
        for e in np.flatnonzero(visible[box]):
            p0 = np.clip(segments[box, e, 0], -limit, limit)
            p1 = np.clip(segments[box, e, 1], -limit, limit)
            # Sub-pixel endpoints via cv2's fixed-point shift.
            cv2.line(
                image,
                tuple((p0 * 16).round().astype(int)),
                tuple((p1 * 16).round().astype(int)),
                color,
                thickness,
                cv2.LINE_AA,
                shift=4,
            )
    return image


def rig_grid(ncams: int) -> Tuple[int, int]:
    """(rows, columns) of a rig that is not nuScenes': at most 3 columns, rows as even as they go
    (1 -> 1x1, 2 -> 1x2, 4 -> 2x2, 5 -> 2x3, 8 -> 3x3)."""
    rows = -(-ncams // 3)
    return rows, -(-ncams // rows)


def render_cameras(batch: Dict, i: int, cell_width: int = 400) -> np.ndarray:
    """The S camera images of sample ``i`` in the rig layout (2 x 3 for nuScenes' six cameras, else
    ``rig_grid``), boxes drawn; ``3 * cell_width`` wide."""
    images = batch["images"][i]  # (S, 3, H, W)
    S, _, H, W = images.shape
    names = camera_names_of(batch, i, S)
    cell_h = int(round(H * cell_width / W))
    sx, sy = cell_width / W, cell_h / H
    pix_T_cams = scale_intrinsics(batch["pix_T_cams"][i].float().cpu(), sx, sy)
    cams_T_ref = batch["cams_T_ref"][i].float().cpu()
    corners = _np(batch["box_corners"][i]) if "box_corners" in batch else np.zeros((0, 8, 3), np.float32)
    count = int(batch["box_count"][i]) if "box_count" in batch else corners.shape[0]
    vis = (
        _np(batch["box_visibility"][i]).astype(int)
        if "box_visibility" in batch
        else np.zeros(len(corners), int)
    )
    corners, vis = corners[:count], vis[:count]

    width = 3 * cell_width
    if all(name in RIG_LAYOUT for name in names):
        positions, free = {}, [divmod(k, 3) for k in range(max(6, S))]
        for s, name in enumerate(names):
            if RIG_LAYOUT[name] not in positions.values():
                positions[s] = RIG_LAYOUT[name]
        for s in range(S):
            if s not in positions:
                positions[s] = next(p for p in free if p not in positions.values())
    else:
        # Another rig: cells widened so that the row still spans 3 * cell_width (the BEV panels' width).
        rows, cols = rig_grid(S)
        positions = {s: divmod(s, cols) for s in range(S)}
        cell_width = width // cols
        cell_h = int(round(H * cell_width / W))
        pix_T_cams = scale_intrinsics(batch["pix_T_cams"][i].float().cpu(), cell_width / W, cell_h / H)
    rows = 1 + max(r for r, _ in positions.values())
    canvas = np.full((rows * cell_h, width, 3), BACKGROUND, np.uint8)
    for s in range(S):
        img = cv2.resize(image_to_uint8(images[s]), (cell_width, cell_h), interpolation=cv2.INTER_AREA)
        draw_boxes_on_camera(
            img,
            corners,
            vis,
            cams_T_ref[s].numpy(),
            pix_T_cams[s].numpy(),
            thickness=max(1, cell_width // 300),
        )
        _put_text(img, names[s], (6, 18), 0.5 * _ui_scale(cell_width), max_width=cell_width - 12)
        r, c = positions[s]
        canvas[r * cell_h : (r + 1) * cell_h, c * cell_width : (c + 1) * cell_width] = img
    return canvas


class BevCanvas:
    """Maps ref-frame ground metres (x, z) to pixels of a BEV panel drawn forward (+z) up."""

    def __init__(self, vox_util, width: int):
        self.vox_util = vox_util
        self.width = int(width)
        extent_x = vox_util.xmax - vox_util.xmin
        extent_z = vox_util.zmax - vox_util.zmin
        self.px_per_m = self.width / extent_x
        self.height = int(round(extent_z * self.px_per_m))

    def to_panel(self, bev: np.ndarray, nearest: bool = True) -> np.ndarray:
        """(Z, X[, C]) map, row = +z -> panel (height, width[, C]), forward up."""
        flipped = np.ascontiguousarray(bev[::-1])
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.resize(flipped, (self.width, self.height), interpolation=interp)

    def pixels(self, xz: np.ndarray) -> np.ndarray:
        """(..., 2) metres (x, z) -> (..., 2) float pixel (col, row)."""
        col = (xz[..., 0] - self.vox_util.xmin) * self.px_per_m
        row = (self.vox_util.zmax - xz[..., 1]) * self.px_per_m
        return np.stack([col, row], axis=-1)

    def draw_ego(self, panel: np.ndarray, ref_T_ego: np.ndarray) -> None:
        foot = apply_4x4(
            torch.as_tensor(ref_T_ego, dtype=torch.float32),
            torch.as_tensor(EGO_FOOTPRINT, dtype=torch.float32),
        ).numpy()
        poly = self.pixels(foot[:, [0, 2]])
        cv2.fillPoly(panel, [(poly * 16).round().astype(np.int32)], EGO_COLOR, cv2.LINE_AA, shift=4)
        # A nose line shows the ego heading even when the reference camera is not CAM_FRONT.
        nose = apply_4x4(
            torch.as_tensor(ref_T_ego, dtype=torch.float32), torch.tensor([[1.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
        ).numpy()
        p = self.pixels(nose[:, [0, 2]])
        cv2.arrowedLine(
            panel,
            tuple(p[0].round().astype(int)),
            tuple(p[1].round().astype(int)),
            EGO_COLOR,
            1,
            cv2.LINE_AA,
            tipLength=0.4,
        )

    def draw_rings(
        self, panel: np.ndarray, ref_T_ego: np.ndarray, radii: Sequence[float] = RANGE_RINGS_M
    ) -> None:
        ego = self.pixels(np.asarray(ref_T_ego)[[0, 2], 3])
        for r in radii:
            cv2.circle(
                panel,
                tuple((ego * 16).round().astype(int)),
                int(round(r * self.px_per_m * 16)),
                RING_COLOR,
                1,
                cv2.LINE_AA,
                shift=4,
            )

    def draw_scale(self, panel: np.ndarray, metres: float = 10.0) -> None:
        length = int(round(metres * self.px_per_m))
        x0, y0 = 10, self.height - 12
        cv2.line(panel, (x0, y0), (x0 + length, y0), TEXT_COLOR, 2)
        for x in (x0, x0 + length):
            cv2.line(panel, (x, y0 - 5), (x, y0 + 5), TEXT_COLOR, 2)
        _put_text(panel, f"{metres:g} m", (x0 + length + 6, y0 + 5), 0.45 * _ui_scale(self.width))


def sample_iou(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        pred, gt = pred & mask, gt & mask
    union = int((pred | gt).sum())
    return float((pred & gt).sum()) / union if union else float("nan")


def _seg_logits(out, i: int) -> torch.Tensor:
    """(C, Z, X) logits of sample ``i``."""
    seg = out["seg"] if isinstance(out, dict) else out
    return seg[i].detach().float().cpu()


def class_index(classes: Sequence[OutputClass], viz_class: str = "") -> int:
    """Channel of ``viz_class`` among ``classes`` (0 for ''); ValueError naming the classes otherwise."""
    names = [c.name for c in classes]
    if not viz_class:
        return 0
    if viz_class not in names:
        raise ValueError(f"viz_class={viz_class!r} is not one of the model's classes {names}")
    return names.index(viz_class)


LAYER_ALPHA = 0.8  # a map layer's colour over what lies below it (prediction: times its probability)
OBJECT_FILL_ALPHA = 0.35  # object footprints in the ground truth, under their outline


def _paint(rgb: np.ndarray, alpha: np.ndarray, color) -> None:
    """rgb (H, W, 3) float <- colour over it with per-pixel ``alpha`` (H, W) in [0, 1], in place."""
    a = alpha[..., None].astype(np.float32)
    rgb *= 1 - a
    rgb += a * np.asarray(color, np.float32)


def _draw_order(classes: Sequence[OutputClass]) -> List[int]:
    """Map polygons first (channel order), then line layers on top, then objects."""
    return ([k for k, c in enumerate(classes) if c.is_map and not c.line]
            + [k for k, c in enumerate(classes) if c.is_map and c.line]
            + [k for k, c in enumerate(classes) if c.is_object])


def _outline(panel: np.ndarray, mask_up: np.ndarray, color, thickness: int = 1) -> None:
    contours, _ = cv2.findContours(mask_up.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(panel, contours, -1, color, thickness, cv2.LINE_AA)


def _class_panels(canvas: BevCanvas, classes, gt_all, valid_all, prob_all) -> List[np.ndarray]:
    """Ground truth and prediction panels of every class: map layers as a coloured underlay (the
    prediction's strength = its probability), objects as outlines (ground truth: over a light fill;
    prediction: filled by probability, the ground truth outlined); cells a class ignores in grey."""
    gt_rgb = np.zeros(gt_all.shape[1:] + (3,), np.float32)
    gt_rgb[:] = BACKGROUND
    pred_rgb = gt_rgb.copy()
    order = _draw_order(classes)
    for k in order:
        c = classes[k]
        fill = LAYER_ALPHA if c.is_map else OBJECT_FILL_ALPHA
        _paint(gt_rgb, gt_all[k] * fill, c.color)
        _paint(pred_rgb, prob_all[k] * LAYER_ALPHA, c.color)
    ignored = ~valid_all.all(axis=0)
    gt_rgb[ignored] = ERROR_COLORS["ignored (vis 0-40%)"]
    gt_panel = canvas.to_panel(np.clip(gt_rgb, 0, 255).astype(np.uint8))
    pred_panel = canvas.to_panel(np.clip(pred_rgb, 0, 255).astype(np.uint8), nearest=False)
    for k in order:
        if classes[k].is_object:
            gt_up = canvas.to_panel(gt_all[k].astype(np.uint8))
            _outline(gt_panel, gt_up, classes[k].color)
            _outline(pred_panel, gt_up, classes[k].color)
    return [gt_panel, pred_panel]


def render_bev_panels(
    batch: Dict, out, i: int, vox_util, panel_width: int = 400, threshold: float = 0.5,
    classes: Sequence[OutputClass] | None = None, viz_class: str = "",
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Ground truth | prediction | error overlay of ``viz_class`` for sample ``i``, with titles.

    ``classes``: the outputs of ``out['seg']``'s channels (default ``[vehicle]``); one class gives the
    ground truth in white and its probability as a heat-map, several draw every class in its colour.
    Returns the strip and the sample's IoU of ``viz_class`` under both protocols."""
    classes = tuple(classes) if classes else resolve_classes(DEFAULT_CLASSES)
    k = class_index(classes, viz_class)
    prob_all = torch.sigmoid(_seg_logits(out, i)).numpy()  # (C, Z, X)
    gt_all = _np(batch["seg_bev"][i]) > 0.5
    valid_all = _np(batch["valid_bev"][i]) > 0.5 if "valid_bev" in batch else np.ones_like(gt_all)
    if prob_all.shape[0] != len(classes) or gt_all.shape[0] != len(classes):
        raise ValueError(f"{len(classes)} classes {[c.name for c in classes]}, but the prediction has "
                         f"{prob_all.shape[0]} channels and the ground truth {gt_all.shape[0]}")
    prob, gt, valid = prob_all[k], gt_all[k], valid_all[k]
    ref_T_ego = _np(batch["ref_T_ego"][i]) if "ref_T_ego" in batch else np.eye(4, dtype=np.float32)
    pred = prob > threshold
    canvas = BevCanvas(vox_util, panel_width)
    if prob.shape != (vox_util.Z, vox_util.X):
        raise ValueError(f"prediction grid {prob.shape} != vox_util grid {(vox_util.Z, vox_util.X)}")

    err = np.zeros(gt.shape + (3,), np.uint8)
    err[:] = BACKGROUND
    err[pred & gt] = ERROR_COLORS["true positive"]
    err[pred & ~gt] = ERROR_COLORS["false positive"]
    err[~pred & gt] = ERROR_COLORS["false negative"]
    err[~valid] = ERROR_COLORS["ignored (vis 0-40%)"]

    single = len(classes) == 1
    if single:
        gt_rgb = np.zeros(gt.shape + (3,), np.uint8)
        gt_rgb[:] = BACKGROUND
        gt_rgb[gt & valid] = GT_COLOR
        gt_rgb[~valid] = ERROR_COLORS["ignored (vis 0-40%)"]
        heat = cv2.applyColorMap(np.clip(prob * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
        panels = [canvas.to_panel(gt_rgb), canvas.to_panel(heat, nearest=False)]
        # Ground-truth outlines on the heat-map show where the prediction should be.
        _outline(panels[1], canvas.to_panel(gt.astype(np.uint8)), (80, 220, 255))
    else:
        panels = _class_panels(canvas, classes, gt_all, valid_all, prob_all)
    panels.append(canvas.to_panel(err))
    for panel in panels:
        canvas.draw_rings(panel, ref_T_ego)
        canvas.draw_ego(panel, ref_T_ego)
        canvas.draw_scale(panel)

    ious = {"simplebev": sample_iou(pred, gt, valid), "lss": sample_iou(pred, gt)}

    def fmt(v: float) -> str:
        return "n/a" if np.isnan(v) else f"{100 * v:.1f}"

    name = classes[k].name
    titles = [
        "ground truth (grey: ignored)",
        f"prediction p({name})" if single else "prediction (colour strength = p)",
        f"errors{'' if single else ' ' + name}  IoU {fmt(ious['simplebev'])} / LSS {fmt(ious['lss'])}",
    ]
    bar_h = 28
    ramp_w = max(24, min(80, canvas.width // 5))  # the heat-map's colour bar, in the prediction's title bar
    cols = []
    for col, (panel, title) in enumerate(zip(panels, titles)):
        margin = ramp_w + 36 if col == 1 and single else 0
        bar = _label_bar(canvas.width, bar_h, title, right_margin=margin)
        cols.append(np.concatenate([bar, panel], axis=0))
    if single:
        ramp = cv2.applyColorMap(
            np.tile(np.linspace(0, 255, ramp_w).astype(np.uint8), (10, 1)), cv2.COLORMAP_INFERNO
        )
        x0 = canvas.width - ramp_w - 16
        cols[1][9:19, x0 : x0 + ramp_w] = cv2.cvtColor(ramp, cv2.COLOR_BGR2RGB)
        _put_text(cols[1], "0", (x0 - 12, 19), 0.4)
        _put_text(cols[1], "1", (x0 + ramp_w + 3, 19), 0.4)
    return np.concatenate(cols, axis=1), ious


LEGEND_ROW_H = 22
HEADER_H = 26


def render_legend(width: int, classes: Sequence[OutputClass] = ()) -> np.ndarray:
    """Two rows: box colours in the cameras; pixel colours in the BEV panels; with several ``classes``
    a third: each class's colour. Fits any width."""
    rows = [
        ("boxes:", [(VISIBILITY_LABELS[v], VISIBILITY_COLORS[v]) for v in (1, 2, 3, 4)]),
        ("BEV:", [
            ("true pos.", ERROR_COLORS["true positive"]), ("false pos.", ERROR_COLORS["false positive"]),
            ("false neg.", ERROR_COLORS["false negative"]), ("ignored", ERROR_COLORS["ignored (vis 0-40%)"]),
            ("ego", EGO_COLOR), ("rings 20/35/50 m", RING_COLOR),
        ]),
    ]  # fmt: skip
    if len(classes) > 1:
        rows.append(("classes:", [(c.name.replace("_", " "), c.color) for c in classes]))
    bar = np.full((LEGEND_ROW_H * len(rows) + 4, width, 3), BACKGROUND, np.uint8)
    for r, (head, items) in enumerate(rows):
        # Lay the row out at a nominal size, then scale it to the width if it does not fit.
        scale = 0.42
        natural = cv2.getTextSize(head, FONT, scale, 1)[0][0] + sum(
            16 + cv2.getTextSize(label, FONT, scale, 1)[0][0] + 14 for label, _ in items
        )
        scale = max(0.25, scale * min(1.0, (width - 16) / natural))
        y = r * LEGEND_ROW_H + LEGEND_ROW_H // 2 + 2
        x = 8 + _put_text(bar, head, (8, y + 5), scale, (170, 170, 170)) + 8
        for label, color in items:
            cv2.rectangle(bar, (x, y - 5), (x + 10, y + 5), color, -1)
            x += 14 + _put_text(bar, label, (x + 14, y + 5), scale) + 12
    return bar


def _str_of(batch: Dict, key: str, i: int) -> str:
    value = batch.get(key)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return str(value[i])
    return str(value[i].item() if torch.is_tensor(value) else value)


def render_composite(
    batch: Dict, out, i: int, vox_util, cell_width: int = 400, threshold: float = 0.5,
    classes: Sequence[OutputClass] | None = None, viz_class: str = "",
) -> np.ndarray:
    """Camera rig + BEV ground truth / prediction / errors + legend for sample ``i``: (H, W, 3) uint8 RGB.

    ``out`` is the model output dict (``out['seg']`` (B, C, Z, X) logits) or that tensor itself;
    ``classes`` its channels' outputs (default ``[vehicle]``); ``viz_class`` the class of the error panel
    ('' = the first). Image width is ``3 * cell_width``.
    """
    classes = tuple(classes) if classes else resolve_classes(DEFAULT_CLASSES)
    cams = render_cameras(batch, i, cell_width)
    bev, _ = render_bev_panels(batch, out, i, vox_util, cell_width, threshold, classes, viz_class)
    width = 3 * cell_width
    token = _str_of(batch, "sample_token", i)
    header = f"{_str_of(batch, 'scene_name', i)}   sample {_str_of(batch, 'index', i)}   {token}"
    parts = [_label_bar(width, HEADER_H, header.strip()), cams, bev, render_legend(width, classes)]
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


def write_png(path: Union[str, Path], image_rgb: np.ndarray) -> None:
    """Encoded in memory, then written atomically (a full disk raises DiskFullError, no torn file)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, encoded.tobytes(), what=f"picture {Path(path).name}")


def read_png(path: Union[str, Path]) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"could not read {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_gif(
    path: Union[str, Path], frames: Sequence[np.ndarray], fps: float = 2.0, scale: float = 1.0
) -> None:
    """Animated GIF (loops forever) from RGB uint8 frames of one size. Needs Pillow."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with the devkit's matplotlib
        raise ImportError("writing GIFs needs Pillow: pip install pillow") from e
    if not frames:
        raise ValueError(f"no frames for {path}")
    pil = []
    for frame in frames:
        if scale != 1.0:
            frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        pil.append(_gif_frame(Image, frame))
    atomic_write(path, lambda tmp: pil[0].save(
        tmp, format="GIF", save_all=True, append_images=pil[1:], duration=int(round(1000 / fps)), loop=0,
        disposal=1,
    ), what=f"GIF {Path(path).name}")


def gif_reserved_colors() -> List[Tuple[int, int, int]]:
    """Colours that carry a meaning in the pictures (legend, ego, errors, boxes, text): a GIF keeps them
    exact, so that a palette fitted to the camera images cannot turn the ego's cyan into the green of
    a true positive."""
    colors = [BACKGROUND, GT_COLOR, EGO_COLOR, RING_COLOR, TEXT_COLOR, UNKNOWN_VIS_COLOR, (0, 0, 0),
              (170, 170, 170), *VISIBILITY_COLORS.values(), *ERROR_COLORS.values()]
    return list(dict.fromkeys(tuple(int(v) for v in c) for c in colors))


def _gif_frame(Image, frame: np.ndarray):
    """One GIF frame: a median-cut palette fitted to the frame, after the reserved colours; pixels of a
    reserved colour keep it exactly, the others take their median-cut colour."""
    reserved = gif_reserved_colors()
    fitted = Image.fromarray(frame).quantize(colors=256 - len(reserved), method=Image.Quantize.MEDIANCUT)
    index = np.asarray(fitted, dtype=np.uint8) + len(reserved)
    for k, color in enumerate(reserved):
        index[(frame == np.asarray(color, np.uint8)).all(-1)] = k
    palette = [v for c in reserved for v in c] + fitted.getpalette()[: 3 * (256 - len(reserved))]
    out = Image.frombytes("P", (index.shape[1], index.shape[0]), np.ascontiguousarray(index).tobytes())
    out.putpalette(palette + [0] * (768 - len(palette)))
    return out
