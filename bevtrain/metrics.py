"""BEV segmentation IoU accumulated as integer counts over a whole split, per class.

Protocols and outputs: README, "Evaluation and visualisation" (Metric) and "Classes".

``BevIoUEvaluator`` follows detectron2's evaluator shape: ``reset()``, ``update(...)`` once per
batch, ``compute()`` at the end. It keeps int64 intersection / union counts per class on the device
of the predictions (no host sync per batch) and sums them across ranks with ``all_reduce`` when
``torch.distributed`` is initialised, so each IoU is Σ intersection / Σ union over the split —
never an average of per-batch IoUs.

Protocols, labelled, for every class at the fixed threshold sigmoid > 0.5:
- ``simplebev``: pixels with ``valid_bev == 0`` (footprints of visibility-token-1 boxes of that
  class, 0–40 % visible) are ignored, as in Simple-BEV's evaluation (map layers have no such pixels);
- ``lss``: every box counts, no mask, as in Lift-Splat-Shoot.
Both are also split by distance band: the ground-plane distance from the ego position (the ego
origin mapped through ``ref_T_ego``) to each BEV cell centre (``Vox_util.bev_centers_ref``).

For map layers also ``bevfusion``, BEVFusion's ``evaluate_map``: true/false positives and false
negatives over the whole grid at each of the thresholds 0.35, 0.40 … 0.65 (probability >= t),
``iou@t`` per threshold, ``iou@max`` the best of them per layer and mIoU their mean. The threshold is
picked on the split being scored, which flatters the number: the fixed-threshold ``simplebev``/``lss``
IoUs are the honest ones; ``bevfusion`` is for comparison with BEVFusion's tables.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from bevtrain.classes import DEFAULT_CLASSES, OutputClass, resolve_classes
from bevtrain.distributed import all_reduce_sum

PROTOCOLS = ("simplebev", "lss")
MAP_PROTOCOL = "bevfusion"
BEVFUSION_THRESHOLDS: Tuple[float, ...] = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)
DEFAULT_BANDS: Tuple[Tuple[float, float], ...] = ((0.0, 20.0), (20.0, 35.0), (35.0, 50.0))


def band_name(band: Sequence[float]) -> str:
    lo, hi = band
    return f"{lo:g}-{hi:g}m"


def ego_distance_bev(vox_util, ref_T_ego: torch.Tensor) -> torch.Tensor:
    """(B, Z, X) ground-plane metres from the ego origin to every BEV cell centre.

    The ref frame is a camera frame (y down), so the ground plane is (x, z).
    """
    centers_xz = vox_util.bev_centers_ref(device=ref_T_ego.device)  # (Z, X, 2)
    ego_xz = ref_T_ego[:, [0, 2], 3].float()  # (B, 2): ego origin in the ref frame
    diff = centers_xz.unsqueeze(0) - ego_xz[:, None, None, :]  # (B, Z, X, 2)
    return diff.norm(dim=-1)


def iou_from_counts(intersection: int, union: int) -> float:
    """IoU of integer counts; NaN when the union is empty (no target and no prediction)."""
    return float(intersection) / float(union) if union > 0 else float("nan")


def threshold_name(t: float) -> str:
    return f"iou@{t:.2f}"


def _mean(values: Sequence[float]) -> float:
    """Mean of the defined (non-NaN) values; NaN when there are none. One value is returned as is."""
    defined = [v for v in values if v == v]
    return sum(defined) / len(defined) if defined else float("nan")


class BevIoUEvaluator:
    """Accumulates per-class IoU under both protocols and by distance band, and BEVFusion's threshold
    sweep for map layers.

    Args:
        vox_util: the grid (``bev_centers_ref``) used for distance bands; None disables bands.
        bands: ``(lo, hi)`` metre ranges, a cell belongs to a band when ``lo <= d < hi``.
        threshold: probability threshold on the sigmoid of the logits (both protocols).
        classes: the outputs (``bevtrain.classes.OutputClass``) in channel order; default ``[vehicle]``.
        map_thresholds: BEVFusion's thresholds for the map layers (``()`` skips the sweep).
    """

    def __init__(
        self,
        vox_util=None,
        bands: Sequence[Sequence[float]] = DEFAULT_BANDS,
        threshold: float = 0.5,
        classes: Sequence[OutputClass] | None = None,
        map_thresholds: Sequence[float] = BEVFUSION_THRESHOLDS,
    ):
        self.vox_util = vox_util
        self.bands = tuple((float(lo), float(hi)) for lo, hi in bands) if vox_util is not None else ()
        self.threshold = float(threshold)
        self.classes: Tuple[OutputClass, ...] = (
            tuple(classes) if classes else resolve_classes(DEFAULT_CLASSES)
        )
        self.map_channels = [i for i, c in enumerate(self.classes) if c.is_map]
        self.map_thresholds = tuple(float(t) for t in map_thresholds) if self.map_channels else ()
        # sigmoid(x) > t  <=>  x > logit(t): compare logits directly, exact and cheaper.
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        self._logit_threshold = float(torch.logit(torch.tensor(t, dtype=torch.float64)))
        self.reset()

    # Counts layout: [class, protocol, region, {intersection, union}], region 0 = whole grid, 1.. = bands;
    # the sweep: [map layer, threshold, {tp, fp, fn}].
    def reset(self) -> None:
        self._counts: torch.Tensor | None = None
        self._sweep: torch.Tensor | None = None
        self._samples: torch.Tensor | None = None

    def _shapes(self):
        return ((len(self.classes), len(PROTOCOLS), 1 + len(self.bands), 2),
                (len(self.map_channels), len(self.map_thresholds), 3))

    def _ensure(self, device) -> None:
        if self._counts is None:
            counts_shape, sweep_shape = self._shapes()
            self._counts = torch.zeros(counts_shape, dtype=torch.int64, device=device)
            self._sweep = torch.zeros(sweep_shape, dtype=torch.int64, device=device)
            self._samples = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(
        self,
        seg_logits: torch.Tensor,
        seg_bev: torch.Tensor,
        valid_bev: torch.Tensor,
        ref_T_ego: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            seg_logits: (B, C, Z, X) logits (any float dtype), C = len(classes).
            seg_bev: (B, C, Z, X) ground truth in {0, 1}.
            valid_bev: (B, C, Z, X), 0 where the Simple-BEV protocol ignores pixels.
            ref_T_ego: (B, 4, 4), needed when distance bands are enabled.
            keep: (B,) bool, samples to count (False for duplicates a sampler padded in).
        """
        C = len(self.classes)
        if seg_logits.shape != seg_bev.shape or seg_bev.shape != valid_bev.shape or seg_logits.shape[1] != C:
            raise ValueError(
                f"shape mismatch: seg_logits {tuple(seg_logits.shape)}, seg_bev {tuple(seg_bev.shape)}, "
                f"valid_bev {tuple(valid_bev.shape)}; expected equal (B, {C}, Z, X) for the classes "
                f"{[c.name for c in self.classes]}"
            )
        device = seg_logits.device
        self._ensure(device)
        B = seg_logits.shape[0]
        pred = seg_logits.detach().float() > self._logit_threshold  # (B, C, Z, X)
        gt = seg_bev.to(device) > 0.5
        valid = valid_bev.to(device) > 0.5
        if keep is None:
            keep = torch.ones(B, dtype=torch.bool, device=device)
        keep = keep.to(device=device, dtype=torch.bool).view(B, 1, 1, 1)

        # Region masks (B, R, Z, X): the whole grid, then each distance band.
        regions = [torch.ones_like(gt[:, 0])]
        if self.bands:
            if ref_T_ego is None:
                raise ValueError("ref_T_ego is required for distance bands (or build with vox_util=None)")
            dist_m = ego_distance_bev(self.vox_util, ref_T_ego.to(device))  # (B, Z, X)
            if dist_m.shape[1:] != gt.shape[2:]:
                raise ValueError(
                    f"vox_util grid {tuple(dist_m.shape[1:])} != prediction grid {tuple(gt.shape[2:])}"
                )
            regions += [(dist_m >= lo) & (dist_m < hi) for lo, hi in self.bands]
        region = (torch.stack(regions, dim=1) & keep).unsqueeze(1)  # (B, 1, R, Z, X)

        inter = (pred & gt).unsqueeze(2)  # (B, C, 1, Z, X)
        union = (pred | gt).unsqueeze(2)
        for p, protocol in enumerate(PROTOCOLS):
            mask = region & valid.unsqueeze(2) if protocol == "simplebev" else region  # (B, C|1, R, Z, X)
            self._counts[:, p, :, 0] += (inter & mask).sum(dim=(0, 3, 4))
            self._counts[:, p, :, 1] += (union & mask).sum(dim=(0, 3, 4))
        if self.map_thresholds:
            maps = self.map_channels
            self._sweep += bevfusion_counts(
                seg_logits[:, maps], seg_bev[:, maps].to(device), self.map_thresholds, keep.view(B)
            )
        self._samples += keep.sum()

    def counts(self) -> Tuple[torch.Tensor, int, torch.Tensor]:
        """Summed over ranks, on CPU: IoU counts (C, P, 1 + nbands, 2) int64, the sample count and the
        map-layer sweep (M, T, 3) int64 (tp, fp, fn)."""
        counts_shape, sweep_shape = self._shapes()
        if self._counts is None:
            counts = torch.zeros(counts_shape, dtype=torch.int64)
            sweep = torch.zeros(sweep_shape, dtype=torch.int64)
            samples = torch.zeros((), dtype=torch.int64)
        else:
            counts, sweep, samples = self._counts.clone(), self._sweep.clone(), self._samples.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = all_reduce_sum(torch.cat([counts.flatten(), sweep.flatten(), samples.view(1)]).cpu())
            counts = packed[: counts.numel()].view_as(counts)
            sweep = packed[counts.numel() : -1].view_as(sweep)
            samples = packed[-1]
        return counts.cpu(), int(samples), sweep.cpu()

    def _protocol_entry(self, counts: torch.Tensor) -> Dict:
        """One class and protocol: counts (1 + nbands, 2)."""
        inter, union = int(counts[0, 0]), int(counts[0, 1])
        bands = {}
        for b, band in enumerate(self.bands):
            bi, bu = int(counts[1 + b, 0]), int(counts[1 + b, 1])
            bands[band_name(band)] = {"iou": iou_from_counts(bi, bu), "intersection": bi, "union": bu}
        return {"iou": iou_from_counts(inter, union), "intersection": inter, "union": union, "bands": bands}

    def compute(self) -> Dict:
        """IoUs (fractions, NaN for an empty union) and the raw counts, identical on every rank.

        ``per_class[name]``: ``kind`` and each protocol's entry (``iou``, ``intersection``, ``union``,
        ``bands``), map layers also ``bevfusion``; ``mean_iou``: each protocol's mean over the classes;
        ``bevfusion``: the thresholds and mIoU (mean ``iou@max``) of the map layers; top-level
        ``simplebev`` / ``lss``: the first class's entries (what a one-class evaluation always had).
        """
        counts, samples, sweep = self.counts()
        per_class: Dict[str, Dict] = {}
        for c, cls in enumerate(self.classes):
            per_class[cls.name] = {"kind": cls.kind,
                                   **{p: self._protocol_entry(counts[c, k]) for k, p in enumerate(PROTOCOLS)}}
        for m, c in enumerate(self.map_channels):
            if self.map_thresholds:
                per_class[self.classes[c].name][MAP_PROTOCOL] = bevfusion_entry(sweep[m], self.map_thresholds)
        first = per_class[self.classes[0].name]
        result: Dict = {
            "threshold": self.threshold,
            "samples": samples,
            "classes": [c.name for c in self.classes],
            "per_class": per_class,
            "mean_iou": {p: _mean([per_class[c.name][p]["iou"] for c in self.classes]) for p in PROTOCOLS},
            **{p: first[p] for p in PROTOCOLS},
        }
        if self.map_thresholds:
            maps = [per_class[self.classes[c].name][MAP_PROTOCOL] for c in self.map_channels]
            result[MAP_PROTOCOL] = {
                "thresholds": list(self.map_thresholds),
                "miou": _mean([m["iou@max"] for m in maps]),
                "miou_at": {threshold_name(t): _mean([m[threshold_name(t)] for m in maps])
                            for t in self.map_thresholds},
                "layers": [self.classes[c].name for c in self.map_channels],
            }
        return result


def bevfusion_counts(
    seg_logits: torch.Tensor,
    seg_bev: torch.Tensor,
    thresholds: Sequence[float],
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """(L, T, 3) int64 true positives, false positives, false negatives of (B, L, Z, X) logits against
    targets at each probability threshold (``sigmoid >= t``, BEVFusion's rule), over the whole grid of
    the samples in ``keep`` (B,)."""
    B, L = seg_logits.shape[:2]
    prob = torch.sigmoid(seg_logits.detach().float()).reshape(B, L, 1, -1)  # (B, L, 1, Z*X)
    t = torch.tensor(thresholds, dtype=torch.float32, device=prob.device).view(1, 1, -1, 1)
    pred = prob >= t  # (B, L, T, Z*X)
    gt = (seg_bev > 0.5).reshape(B, L, 1, -1)
    if keep is not None:
        pred = pred & keep.view(B, 1, 1, 1)
        gt = gt & keep.view(B, 1, 1, 1)
    tp = (pred & gt).sum(dim=(0, 3))
    fp = (pred & ~gt).sum(dim=(0, 3))
    fn = (~pred & gt).sum(dim=(0, 3))
    return torch.stack([tp, fp, fn], dim=-1)


def bevfusion_entry(sweep: torch.Tensor, thresholds: Sequence[float]) -> Dict:
    """One map layer under BEVFusion's protocol from its (T, 3) tp/fp/fn counts: ``iou@t`` for every
    threshold, ``iou@max`` (the best, NaN-free) and the threshold that gave it."""
    entry: Dict = {}
    ious: List[float] = []
    for k, t in enumerate(thresholds):
        tp, fp, fn = (int(v) for v in sweep[k])
        ious.append(iou_from_counts(tp, tp + fp + fn))
        entry[threshold_name(t)] = ious[-1]
    defined = [(iou, t) for iou, t in zip(ious, thresholds) if iou == iou]
    best_iou, best_t = max(defined) if defined else (float("nan"), None)
    entry.update({"iou@max": best_iou, "best_threshold": best_t,
                  "tp": [int(v) for v in sweep[:, 0]], "fp": [int(v) for v in sweep[:, 1]],
                  "fn": [int(v) for v in sweep[:, 2]]})
    return entry


PROTOCOL_LABELS = {"simplebev": "Simple-BEV protocol (vis-1 ignored)", "lss": "LSS protocol (all boxes)"}


def protocol_label(protocol: str, raster: str | None = None) -> str:
    """What a number means: the protocol and, when known, the target raster it was scored against
    (e.g. 'Simple-BEV protocol (vis-1 ignored), simplebev raster')."""
    label = PROTOCOL_LABELS[protocol]
    return f"{label}, {raster} raster" if raster else label


MAP_PROTOCOL_LABEL = "BEVFusion protocol (map layers; iou@max: threshold picked on the evaluated split)"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(header[c]), *(len(row[c]) for row in rows)) for c in range(len(header))]

    def line(cells):
        padded = [
            cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded)

    return [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]


def _pct(iou) -> str:  # a band with no cells of the grid in it (union 0) has no IoU
    return "-" if iou is None or iou != iou else f"{100 * iou:.2f}"


def format_table(result: Dict, raster: str | None = None) -> str:
    """Text tables of ``BevIoUEvaluator.compute()`` output, IoU in percent: one per protocol (Simple-BEV,
    LSS, and BEVFusion's when there are map layers), one row per class. ``raster`` (the ``target_raster``
    the object ground truth was drawn with) is named in the titles."""
    per_class = result.get("per_class") or {"": {p: result[p] for p in PROTOCOLS}}
    names = list(per_class)
    band_names = list(per_class[names[0]][PROTOCOLS[0]]["bands"].keys())
    out: List[str] = []
    for protocol in PROTOCOLS:
        header = ["class", "IoU %", "inter", "union"] + [f"{b} %" for b in band_names]
        rows = []
        for name in names:
            r = per_class[name][protocol]
            rows.append([name or "-", _pct(r["iou"]), str(r["intersection"]), str(r["union"])]
                        + [_pct(r["bands"][b]["iou"]) for b in band_names])
        if len(names) > 1:
            rows.append(["mean", _pct(result["mean_iou"][protocol]), "", ""] + [""] * len(band_names))
        title = f"{protocol_label(protocol, raster)}, sigmoid > {result['threshold']}:"
        out += [title] + _table(header, rows)
        out.append("")
    sweep = result.get(MAP_PROTOCOL)
    if sweep:
        names_t = [threshold_name(t) for t in sweep["thresholds"]]
        header = ["layer"] + [n[4:] for n in names_t] + ["max %", "at"]
        rows = []
        for name in sweep["layers"]:
            e = per_class[name][MAP_PROTOCOL]
            best = "-" if e["best_threshold"] is None else f"{e['best_threshold']:.2f}"
            rows.append([name] + [_pct(e[n]) for n in names_t] + [_pct(e["iou@max"]), best])
        rows.append(["mIoU"] + [_pct(sweep["miou_at"][n]) for n in names_t] + [_pct(sweep["miou"]), ""])
        out += [f"{MAP_PROTOCOL_LABEL}, IoU % at probability >= t:"] + _table(header, rows) + [""]
    out.append(f"samples: {result['samples']}   (-: empty band or class)")
    return "\n".join(out)
