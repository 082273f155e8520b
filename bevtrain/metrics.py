"""BEV segmentation IoU accumulated as integer counts over a whole split.

Protocols and outputs: README, "Evaluation and visualisation" (Metric).

``BevIoUEvaluator`` follows detectron2's evaluator shape: ``reset()``, ``update(...)`` once per
batch, ``compute()`` at the end. It keeps int64 intersection / union counts on the device of the
predictions (no host sync per batch) and sums them across ranks with ``all_reduce`` when
``torch.distributed`` is initialised, so the IoU is Σ intersection / Σ union over the split —
never an average of per-batch IoUs.

Two protocols are reported, labelled:
- ``simplebev``: pixels with ``valid_bev == 0`` (footprints of visibility-token-1 boxes, 0–40 %
  visible) are ignored, as in Simple-BEV's evaluation;
- ``lss``: every box counts, no mask, as in Lift-Splat-Shoot.

Both are also split by distance band: the ground-plane distance from the ego position (the ego
origin mapped through ``ref_T_ego``) to each BEV cell centre (``Vox_util.bev_centers_ref``).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.distributed as dist

from bevtrain.distributed import all_reduce_sum

PROTOCOLS = ("simplebev", "lss")
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


class BevIoUEvaluator:
    """Accumulates vehicle IoU under both protocols and by distance band.

    Args:
        vox_util: the grid (``bev_centers_ref``) used for distance bands; None disables bands.
        bands: ``(lo, hi)`` metre ranges, a cell belongs to a band when ``lo <= d < hi``.
        threshold: probability threshold on the sigmoid of the logits.
    """

    def __init__(
        self,
        vox_util=None,
        bands: Sequence[Sequence[float]] = DEFAULT_BANDS,
        threshold: float = 0.5,
    ):
        self.vox_util = vox_util
        self.bands = tuple((float(lo), float(hi)) for lo, hi in bands) if vox_util is not None else ()
        self.threshold = float(threshold)
        # sigmoid(x) > t  <=>  x > logit(t): compare logits directly, exact and cheaper.
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        self._logit_threshold = float(torch.logit(torch.tensor(t, dtype=torch.float64)))
        self.reset()

    # Counts layout: [protocol, region, {intersection, union}], region 0 = whole grid, 1.. = bands.
    def reset(self) -> None:
        self._counts: torch.Tensor | None = None
        self._samples: torch.Tensor | None = None

    def _ensure(self, device) -> None:
        if self._counts is None:
            self._counts = torch.zeros(
                len(PROTOCOLS), 1 + len(self.bands), 2, dtype=torch.int64, device=device
            )
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
            seg_logits: (B, 1, Z, X) logits (any float dtype).
            seg_bev: (B, 1, Z, X) ground truth in {0, 1}.
            valid_bev: (B, 1, Z, X), 0 where the Simple-BEV protocol ignores pixels.
            ref_T_ego: (B, 4, 4), needed when distance bands are enabled.
            keep: (B,) bool, samples to count (False for duplicates a sampler padded in).
        """
        if seg_logits.shape != seg_bev.shape or seg_bev.shape != valid_bev.shape:
            raise ValueError(
                f"shape mismatch: seg_logits {tuple(seg_logits.shape)}, seg_bev {tuple(seg_bev.shape)}, "
                f"valid_bev {tuple(valid_bev.shape)}; expected equal (B, 1, Z, X)"
            )
        device = seg_logits.device
        self._ensure(device)
        B = seg_logits.shape[0]
        pred = seg_logits.detach().float() > self._logit_threshold  # (B, 1, Z, X)
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
        region = torch.stack(regions, dim=1) & keep  # (B, R, Z, X)

        inter = pred & gt  # (B, 1, Z, X)
        union = pred | gt
        for p, protocol in enumerate(PROTOCOLS):
            mask = region & valid if protocol == "simplebev" else region
            self._counts[p, :, 0] += (inter & mask).sum(dim=(0, 2, 3))
            self._counts[p, :, 1] += (union & mask).sum(dim=(0, 2, 3))
        self._samples += keep.sum()

    def counts(self) -> Tuple[torch.Tensor, int]:
        """Counts summed over ranks: (P, 1 + nbands, 2) int64 on CPU, and the sample count."""
        if self._counts is None:
            counts = torch.zeros(len(PROTOCOLS), 1 + len(self.bands), 2, dtype=torch.int64)
            samples = torch.zeros((), dtype=torch.int64)
        else:
            counts, samples = self._counts.clone(), self._samples.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = all_reduce_sum(torch.cat([counts.flatten(), samples.view(1)]).cpu())
            counts, samples = packed[:-1].view_as(counts), packed[-1]
        return counts.cpu(), int(samples)

    def compute(self) -> Dict:
        """IoUs (fractions, NaN for an empty union) and the raw counts, identical on every rank."""
        counts, samples = self.counts()
        result: Dict = {"threshold": self.threshold, "samples": samples}
        for p, protocol in enumerate(PROTOCOLS):
            inter, union = int(counts[p, 0, 0]), int(counts[p, 0, 1])
            bands = {}
            for b, band in enumerate(self.bands):
                bi, bu = int(counts[p, 1 + b, 0]), int(counts[p, 1 + b, 1])
                bands[band_name(band)] = {"iou": iou_from_counts(bi, bu), "intersection": bi, "union": bu}
            result[protocol] = {
                "iou": iou_from_counts(inter, union),
                "intersection": inter,
                "union": union,
                "bands": bands,
            }
        return result


PROTOCOL_LABELS = {"simplebev": "Simple-BEV protocol (vis-1 ignored)", "lss": "LSS protocol (all boxes)"}


def protocol_label(protocol: str, raster: str | None = None) -> str:
    """What a number means: the protocol and, when known, the target raster it was scored against
    (e.g. 'Simple-BEV protocol (vis-1 ignored), simplebev raster')."""
    label = PROTOCOL_LABELS[protocol]
    return f"{label}, {raster} raster" if raster else label


def format_table(result: Dict, raster: str | None = None) -> str:
    """A small text table of ``BevIoUEvaluator.compute()`` output, IoU in percent; ``raster`` (the
    ``target_raster`` the ground truth was made with) is named in every row."""
    band_names = list(result[PROTOCOLS[0]]["bands"].keys())
    header = ["protocol", "IoU %", "inter", "union"] + [f"{b} %" for b in band_names]
    labels = {p: protocol_label(p, raster) for p in PROTOCOLS}
    rows = []

    def pct(iou) -> str:  # a band with no cells of the grid in it (union 0) has no IoU
        return "-" if iou is None or iou != iou else f"{100 * iou:.2f}"

    for protocol in PROTOCOLS:
        r = result[protocol]
        rows.append(
            [labels[protocol], pct(r["iou"]), str(r["intersection"]), str(r["union"])]
            + [pct(r["bands"][b]["iou"]) for b in band_names]
        )
    widths = [max(len(header[c]), *(len(row[c]) for row in rows)) for c in range(len(header))]

    def line(cells):
        padded = [
            cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded)

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
    out.append(f"samples: {result['samples']}   threshold: sigmoid > {result['threshold']}   (-: empty band)")
    return "\n".join(out)
