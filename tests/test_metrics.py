"""IoU accumulation: integer counts over the split, both protocols, distance bands, ranks."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bevtrain.geometry import Vox_util
from bevtrain.metrics import BevIoUEvaluator, ego_distance_bev, format_table

BIG = 20.0  # a logit far on either side of the 0.5 threshold


def _logits(pred_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(pred_mask > 0, torch.tensor(BIG), torch.tensor(-BIG))


def _reference_counts(preds, gts, valids):
    """Intersection/union by walking every pixel in Python: an independent reference."""
    counts = {"simplebev": [0, 0], "lss": [0, 0]}
    for pred, gt, valid in zip(preds, gts, valids):
        for p, g, v in zip(pred.flatten().tolist(), gt.flatten().tolist(), valid.flatten().tolist()):
            for protocol, use in (("simplebev", v > 0.5), ("lss", True)):
                if use:
                    counts[protocol][0] += int(p > 0 and g > 0)
                    counts[protocol][1] += int(p > 0 or g > 0)
    return counts


def test_counts_are_summed_over_batches_not_averaged():
    # Batch 1: one sample, a 4x4 grid; prediction and truth overlap in 1 of 3 union pixels.
    gt1 = torch.zeros(1, 1, 4, 4)
    gt1[0, 0, 0, 0:2] = 1
    pred1 = torch.zeros(1, 1, 4, 4)
    pred1[0, 0, 0, 1:3] = 1
    # Batch 2: two samples, a perfect 5-pixel hit plus a 3-pixel hit whose truth is half ignored.
    gt2 = torch.zeros(2, 1, 4, 4)
    gt2[0, 0, 1, 0:4] = 1
    gt2[0, 0, 2, 0] = 1
    gt2[1, 0, 3, 0:3] = 1
    pred2 = gt2.clone()
    pred2[1, 0, 0, 3] = 1  # one false positive
    valid1 = torch.ones_like(gt1)
    valid2 = torch.ones_like(gt2)
    valid2[1, 0, 3, 0:2] = 0  # a visibility-1 footprint: ignored by the Simple-BEV protocol

    ev = BevIoUEvaluator(vox_util=None)
    ev.update(_logits(pred1), gt1, valid1)
    ev.update(_logits(pred2), gt2, valid2)
    result = ev.compute()

    # By hand: LSS  I = 1 + 5 + 3 = 9, U = 3 + 5 + 4 = 12.
    #          SBEV I = 1 + 5 + 1 = 7, U = 3 + 5 + 2 = 10 (two ignored pixels drop from both).
    assert (result["lss"]["intersection"], result["lss"]["union"]) == (9, 12)
    assert (result["simplebev"]["intersection"], result["simplebev"]["union"]) == (7, 10)
    ref = _reference_counts([pred1, pred2], [gt1, gt2], [valid1, valid2])
    assert [result["lss"]["intersection"], result["lss"]["union"]] == ref["lss"]
    assert [result["simplebev"]["intersection"], result["simplebev"]["union"]] == ref["simplebev"]
    assert result["lss"]["iou"] == pytest.approx(9 / 12)
    assert result["simplebev"]["iou"] == pytest.approx(7 / 10)
    assert result["samples"] == 3

    # Averaging per-batch IoUs would give a different number on the same data.
    per_batch = []
    for pred, gt in ((pred1, gt1), (pred2, gt2)):
        ev_b = BevIoUEvaluator(vox_util=None)
        ev_b.update(_logits(pred), gt, torch.ones_like(gt))
        per_batch.append(ev_b.compute()["lss"]["iou"])
    assert per_batch == pytest.approx([1 / 3, 8 / 9])
    assert abs(np.mean(per_batch) - result["lss"]["iou"]) > 0.1

    # Counts are int64 and reset clears them.
    assert ev.counts()[0].dtype == torch.int64
    ev.reset()
    assert ev.compute()["samples"] == 0 and math.isnan(ev.compute()["lss"]["iou"])


def test_threshold_is_on_the_sigmoid_and_random_data_matches_reference():
    g = torch.Generator().manual_seed(0)
    gts = [(torch.rand(3, 1, 6, 7, generator=g) > 0.6).float() for _ in range(3)]
    valids = [(torch.rand(3, 1, 6, 7, generator=g) > 0.2).float() for _ in range(3)]
    logits = [torch.randn(3, 1, 6, 7, generator=g) * 3 for _ in range(3)]
    ev = BevIoUEvaluator(vox_util=None)
    for lg, gt, va in zip(logits, gts, valids):
        ev.update(lg.half(), gt, va)  # half-precision logits as under autocast
    result = ev.compute()
    ref = _reference_counts([(torch.sigmoid(lg) > 0.5).float() for lg in logits], gts, valids)
    assert [result["lss"]["intersection"], result["lss"]["union"]] == ref["lss"]
    assert [result["simplebev"]["intersection"], result["simplebev"]["union"]] == ref["simplebev"]

    # A different threshold moves pixels: 0.9 keeps only logits above logit(0.9) ~ 2.197.
    ev9 = BevIoUEvaluator(vox_util=None, threshold=0.9)
    for lg, gt, va in zip(logits, gts, valids):
        ev9.update(lg, gt, va)
    ref9 = _reference_counts([(torch.sigmoid(lg) > 0.9).float() for lg in logits], gts, valids)
    assert [ev9.compute()["lss"]["intersection"], ev9.compute()["lss"]["union"]] == ref9["lss"]
    assert ref9["lss"] != ref["lss"]


def test_keep_mask_drops_padded_duplicates():
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, 0, 0, 0] = 1
    pred = torch.zeros(2, 1, 4, 4)
    pred[1, 0, 3, 3] = 1  # the duplicate (sample 1) is wrong everywhere
    ev = BevIoUEvaluator(vox_util=None)
    ev.update(_logits(gt), gt, torch.ones_like(gt), keep=torch.tensor([True, False]))
    ev.update(_logits(pred[1:]), gt[1:], torch.ones_like(gt[1:]), keep=torch.tensor([False]))
    result = ev.compute()
    assert result["samples"] == 1
    assert (result["lss"]["intersection"], result["lss"]["union"]) == (1, 1)


def _ego_at_origin(B: int) -> torch.Tensor:
    return torch.eye(4).expand(B, 4, 4).clone()


def test_distance_bands_partition_a_grid_within_50m():
    # +-30 m around the ego: every cell centre is closer than 50 m, so the bands cover it all.
    vox_util = Vox_util(Z=60, Y=4, X=60, scene_centroid=(0.0, 0.0, 0.0), bounds=(-30, 30, -2, 2, -30, 30))
    g = torch.Generator().manual_seed(1)
    gt = (torch.rand(2, 1, 60, 60, generator=g) > 0.7).float()
    logits = torch.randn(2, 1, 60, 60, generator=g)
    valid = (torch.rand(2, 1, 60, 60, generator=g) > 0.1).float()
    ev = BevIoUEvaluator(vox_util=vox_util)
    ev.update(logits, gt, valid, _ego_at_origin(2))
    result = ev.compute()
    for protocol in ("simplebev", "lss"):
        bands = result[protocol]["bands"]
        assert list(bands) == ["0-20m", "20-35m", "35-50m"]
        assert sum(b["union"] for b in bands.values()) == result[protocol]["union"]
        assert sum(b["intersection"] for b in bands.values()) == result[protocol]["intersection"]
        assert all(b["union"] > 0 for b in bands.values())

    # On the default +-50 m grid the corners lie beyond 50 m: the bands cover less than the grid.
    vox_util = Vox_util()
    gt = torch.ones(1, 1, 200, 200)
    ev = BevIoUEvaluator(vox_util=vox_util)
    ev.update(_logits(gt), gt, torch.ones_like(gt), _ego_at_origin(1))
    result = ev.compute()
    covered = sum(b["union"] for b in result["lss"]["bands"].values())
    dist_m = ego_distance_bev(vox_util, _ego_at_origin(1))[0]
    assert covered == int((dist_m < 50).sum()) < result["lss"]["union"] == 200 * 200


def test_distance_bands_follow_the_ego_position():
    # A single true pixel 25 m ahead of the grid centre: band 20-35 m with the ego at the centre,
    # band 0-20 m when the ego stands 10 m further forward (ref_T_ego translation).
    vox_util = Vox_util()
    gt = torch.zeros(1, 1, 200, 200)
    centers = vox_util.bev_centers_ref()
    row = int(torch.argmin((centers[:, 0, 1] - 25.25).abs()))
    col = int(torch.argmin((centers[0, :, 0] - 0.25).abs()))
    gt[0, 0, row, col] = 1
    for ego_z, expected in ((0.0, "20-35m"), (10.0, "0-20m"), (-20.0, "35-50m")):
        ref_T_ego = _ego_at_origin(1)
        ref_T_ego[0, 2, 3] = ego_z
        ev = BevIoUEvaluator(vox_util=vox_util)
        ev.update(_logits(gt), gt, torch.ones_like(gt), ref_T_ego)
        bands = ev.compute()["lss"]["bands"]
        assert {name: b["union"] for name, b in bands.items()} == {
            name: int(name == expected) for name in bands
        }


def test_format_table_labels_both_protocols():
    vox_util = Vox_util(Z=40, Y=2, X=40)
    gt = torch.zeros(1, 1, 40, 40)
    gt[0, 0, 20, 20] = 1
    ev = BevIoUEvaluator(vox_util=vox_util)
    ev.update(_logits(gt), gt, torch.ones_like(gt), _ego_at_origin(1))
    table = format_table(ev.compute())
    assert "Simple-BEV" in table and "LSS" in table and "100.00" in table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        gt = torch.zeros(1, 1, 4, 4)
        pred = torch.zeros(1, 1, 4, 4)
        if rank == 0:
            gt[0, 0, 0, :2] = 1
            pred[0, 0, 0, 1:3] = 1  # I=1 U=3
        else:
            gt[0, 0, 1, :] = 1
            pred[0, 0, 1, :] = 1  # I=4 U=4
        ev = BevIoUEvaluator(vox_util=None)
        ev.update(_logits(pred), gt, torch.ones_like(gt))
        queue.put((rank, ev.compute()))
    finally:
        dist.destroy_process_group()


def test_counts_are_summed_across_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        r = results[rank]
        assert (r["lss"]["intersection"], r["lss"]["union"], r["samples"]) == (5, 7, 2)


# ------------------------------------------------------------------------------ several classes
def _classes(*names):
    from bevtrain.classes import resolve_classes

    return resolve_classes(list(names))


def test_per_class_iou_by_hand_under_both_protocols():
    # A 3x4 grid, one sample: channel 0 = vehicle (an object with one ignored cell), 1 = pedestrian,
    # 2 = drivable_area (a map layer: valid everywhere).
    gt = torch.zeros(1, 3, 3, 4)
    pred = torch.zeros(1, 3, 3, 4)
    valid = torch.ones(1, 3, 3, 4)
    gt[0, 0, 0, 0:3] = 1  # vehicle: 3 cells, the third of a visibility-1 box
    valid[0, 0, 0, 2] = 0
    pred[0, 0, 0, 1:4] = 1  # hits (0,1), (0,2) [ignored]; false positive (0,3)
    gt[0, 1, 2, 0] = 1  # pedestrian: one cell, missed; false positives at (1,1) and at (0,2), where
    pred[0, 1, 1, 1] = 1  # only the vehicle channel ignores a cell
    pred[0, 1, 0, 2] = 1
    gt[0, 2, 1:3, :] = 1  # drivable area: the lower two rows (8 cells), predicted on the lower 1.5 rows
    pred[0, 2, 2, :] = 1
    pred[0, 2, 1, 0:2] = 1
    ev = BevIoUEvaluator(classes=_classes("vehicle", "pedestrian", "drivable_area"), map_thresholds=())
    ev.update(_logits(pred), gt, valid)
    r = ev.compute()
    assert r["classes"] == ["vehicle", "pedestrian", "drivable_area"]
    pc = r["per_class"]
    # vehicle, LSS: I = {(0,1), (0,2)} = 2, U = {(0,0)..(0,3)} = 4; Simple-BEV drops (0,2): I = 1, U = 3.
    assert (pc["vehicle"]["lss"]["intersection"], pc["vehicle"]["lss"]["union"]) == (2, 4)
    assert (pc["vehicle"]["simplebev"]["intersection"], pc["vehicle"]["simplebev"]["union"]) == (1, 3)
    # pedestrian: I = 0, U = 3 under both (nothing ignored in its channel: vehicle's mask is not its own).
    for p in ("lss", "simplebev"):
        assert (pc["pedestrian"][p]["intersection"], pc["pedestrian"][p]["union"]) == (0, 3)
        assert (pc["drivable_area"][p]["intersection"], pc["drivable_area"][p]["union"]) == (6, 8)
        assert pc["drivable_area"]["kind"] == "map" and pc["vehicle"]["kind"] == "object"
    assert r["mean_iou"]["lss"] == pytest.approx((2 / 4 + 0 + 6 / 8) / 3)
    assert r["mean_iou"]["simplebev"] == pytest.approx((1 / 3 + 0 + 6 / 8) / 3)
    # The first class keeps the places a one-class evaluation had.
    assert r["simplebev"] == pc["vehicle"]["simplebev"] and r["lss"] == pc["vehicle"]["lss"]
    ref = _reference_counts([pred[:, 0:1]], [gt[:, 0:1]], [valid[:, 0:1]])
    assert [pc["vehicle"]["lss"]["intersection"], pc["vehicle"]["lss"]["union"]] == ref["lss"]
    with pytest.raises(ValueError, match="expected equal"):
        ev.update(_logits(pred[:, :2]), gt[:, :2], valid[:, :2])


def _probability_logits(prob: torch.Tensor) -> torch.Tensor:
    return torch.logit(prob.double()).float()


def test_bevfusion_protocol_by_hand():
    # One map layer, four cells with probabilities 0.30, 0.42, 0.58, 0.70; ground truth on the last three.
    prob = torch.tensor([0.30, 0.42, 0.58, 0.70]).view(1, 1, 1, 4)
    gt = torch.tensor([0.0, 1.0, 1.0, 1.0]).view(1, 1, 1, 4)
    ev = BevIoUEvaluator(classes=_classes("walkway"))
    ev.update(_probability_logits(prob), gt, torch.ones_like(gt))
    e = ev.compute()["per_class"]["walkway"]["bevfusion"]
    # t = 0.35, 0.40: predicted {0.42, 0.58, 0.70} = the truth: IoU 1. t = 0.45 ... 0.55: {0.58, 0.70},
    # tp 2, fn 1: IoU 2/3. t = 0.60, 0.65: {0.70}: IoU 1/3.
    assert e["tp"] == [3, 3, 2, 2, 2, 1, 1] and e["fp"] == [0] * 7 and e["fn"] == [0, 0, 1, 1, 1, 2, 2]
    assert [e[f"iou@{t:.2f}"] for t in (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)] == pytest.approx(
        [1, 1, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert e["iou@max"] == 1.0 and e["best_threshold"] == 0.40  # ties go to the larger threshold
    # A probability exactly at a threshold counts as positive (BEVFusion's >=), unlike the 0.5 protocols.
    at = BevIoUEvaluator(classes=_classes("walkway"))
    half = torch.full((1, 1, 1, 1), 0.5)
    at.update(_probability_logits(half), torch.ones_like(half), torch.ones_like(half))
    r = at.compute()
    assert r["per_class"]["walkway"]["bevfusion"]["iou@0.50"] == 1.0 and r["simplebev"]["iou"] == 0.0


def test_bevfusion_max_over_thresholds_matches_a_direct_recomputation():
    """BEVFusion's evaluate_map rewritten directly (float probabilities, counts over all samples at once,
    tp / (tp + fp + fn)) against the evaluator fed in batches, with a vehicle channel in between."""
    g = torch.Generator().manual_seed(3)
    classes = _classes("drivable_area", "vehicle", "divider", "stop_line")
    maps = [0, 2, 3]
    batches = []
    for _ in range(4):
        gt = (torch.rand(2, 4, 9, 11, generator=g) > 0.6).float()
        # Probabilities near the ground truth so that the best threshold differs between layers.
        prob = (0.5 * gt + torch.rand(2, 4, 9, 11, generator=g) * 0.6).clamp(0.01, 0.99)
        batches.append((_probability_logits(prob), gt))
    ev = BevIoUEvaluator(classes=classes)
    for logits, gt in batches:
        ev.update(logits, gt, torch.ones_like(gt))
    r = ev.compute()

    thresholds = np.array([0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65], dtype=np.float32)
    prob = torch.sigmoid(torch.cat([lg for lg, _ in batches])).numpy()[:, maps]  # (N, 3, Z, X)
    label = torch.cat([gt for _, gt in batches]).numpy()[:, maps] > 0.5
    maxima = []
    for m, name in enumerate(["drivable_area", "divider", "stop_line"]):
        p = prob[:, m].reshape(-1)[:, None] >= thresholds  # (pixels, T)
        lab = label[:, m].reshape(-1)[:, None]
        tp, fp, fn = (p & lab).sum(0), (p & ~lab).sum(0), (~p & lab).sum(0)
        ious = tp / (tp + fp + fn)
        e = r["per_class"][name]["bevfusion"]
        assert e["tp"] == tp.tolist() and e["fp"] == fp.tolist() and e["fn"] == fn.tolist()
        assert e["iou@max"] == pytest.approx(float(ious.max()))
        maxima.append(float(ious.max()))
    assert r["bevfusion"]["miou"] == pytest.approx(np.mean(maxima))
    assert r["bevfusion"]["layers"] == ["drivable_area", "divider", "stop_line"]
    assert "bevfusion" not in r["per_class"]["vehicle"]
    best = {r["per_class"][n]["bevfusion"]["best_threshold"] for n in r["bevfusion"]["layers"]}
    assert len(best) > 1  # the case exercises the per-layer choice


def test_tables_one_per_protocol_with_a_row_per_class():
    classes = _classes("vehicle", "drivable_area")
    gt = torch.zeros(1, 2, 40, 40)
    gt[0, 0, 20, 20] = 1
    gt[0, 1, :10] = 1
    ev = BevIoUEvaluator(vox_util=Vox_util(Z=40, Y=2, X=40), classes=classes)
    ev.update(_logits(gt), gt, torch.ones_like(gt), _ego_at_origin(1))
    table = format_table(ev.compute(), raster="simplebev")
    sections = table.split("\n\n")
    assert sections[0].startswith("Simple-BEV protocol") and sections[1].startswith("LSS protocol")
    assert sections[2].startswith("BEVFusion protocol") and "threshold picked on the evaluated split" in table
    for section in sections[:2]:
        assert {line.split()[0] for line in section.splitlines()[3:]} == {"vehicle", "drivable_area", "mean"}
    assert "mIoU" in sections[2] and "100.00" in sections[2]
