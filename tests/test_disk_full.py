"""A full disk loses nothing that was written before and never hides the scores (issue 26 item 2,
issue 25 item 12). ENOSPC is simulated where bytes reach the disk: the first write into the folder
under test writes half of its bytes, then fails as the kernel does."""

from __future__ import annotations

import contextlib
import errno
import io
import json
from pathlib import Path

import pytest
import torch

from bevtrain.checkpoint import CheckpointManager, list_checkpoints, load_checkpoint
from bevtrain.disk import DiskFullError, atomic_write_text
from bevtrain.evaluate import main as eval_main
from bevtrain.train import main as train_main

TINY = dict(
    encoder_type="res18", encoder_weights="none", res_scale=0.25, Z=50, Y=4, X=50, latent_dim=16,
    batch_size=2, grad_acc=1, nworkers=0, device="cpu", dset="mini", amp="none",
)  # fmt: skip


@contextlib.contextmanager
def disk_full_under(monkeypatch, folder: Path, suffix: str = ""):
    """Writes of files in ``folder`` (whose name ends in ``suffix``) write half, then raise ENOSPC."""
    real_text, real_bytes = Path.write_text, Path.write_bytes

    def full(real):
        def write(self, data, *a, **k):
            if Path(self).parent == folder and Path(self).name.split(".tmp.")[0].endswith(suffix):
                real(self, data[: len(data) // 2], *a, **k)
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real(self, data, *a, **k)
        return write

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full(real_text))
        m.setattr(Path, "write_bytes", full(real_bytes))
        yield


@pytest.fixture(scope="module")
def run_dir(synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(**TINY, data_dir=str(synthetic_root), cache_dir=str(root / "cache"), max_iters=2,
                   do_val=False, viz_freq=0, log_freq=1, save_freq=2, exp_name="full",
                   ckpt_dir=str(root / "ckpt"), log_dir=str(root / "logs"))  # fmt: skip
    return next((root / "ckpt").iterdir())


def _eval(run_dir, capsys, **kw):
    with pytest.raises(SystemExit) as exit_:
        flags = {"init_dir": str(run_dir), "nworkers": 0, "viz_every": 2, "max_viz": 3, "tensorboard": False}
        eval_main(**{**flags, **kw})
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_pictures_on_a_full_disk_keep_the_scores_and_say_where(run_dir, capsys, monkeypatch):
    viz_dir = run_dir.parent / "viz-full"
    (run_dir / "metrics.json").unlink(missing_ok=True)
    with disk_full_under(monkeypatch, viz_dir, ".png"):
        code, out, err = _eval(run_dir, capsys, viz_dir=str(viz_dir))
    assert code == 75, (out, err)
    assert "IoU" in out or "iou" in out.lower(), out  # the table was printed
    metrics = json.loads((viz_dir / "metrics.json").read_text())  # and written
    assert metrics["samples"] > 0 and "simplebev" in metrics["protocols"]
    lines = [line for line in err.splitlines() if not line.startswith("[eval] |")]  # progress bar
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), err
    assert str(viz_dir) in lines[0] and "free there" in lines[0] and "Traceback" not in err
    assert not list(viz_dir.glob("*.png")) and not list(viz_dir.glob(".*.tmp.*")), "no torn picture left"


def test_metrics_json_on_a_full_disk_stays_the_earlier_one(run_dir, capsys, monkeypatch):
    viz_dir = run_dir.parent / "viz-metrics"
    viz_dir.mkdir(exist_ok=True)
    earlier = json.dumps({"earlier": True})
    (viz_dir / "metrics.json").write_text(earlier)
    with disk_full_under(monkeypatch, viz_dir, "metrics.json"):
        code, out, err = _eval(run_dir, capsys, viz_dir=str(viz_dir), max_viz=0)
    assert code == 75, (out, err)
    assert (viz_dir / "metrics.json").read_text() == earlier, "a full disk never truncates metrics.json"
    lines = [line for line in err.splitlines() if not line.startswith("[eval] |")]
    assert len(lines) == 1 and "metrics.json" in lines[0] and "unchanged" in lines[0], err
    assert not list(viz_dir.glob(".*.tmp.*"))


def test_a_checkpoint_on_a_full_disk_says_what_stands(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "run")
    manager.save({"model": {"w": torch.zeros(3)}, "step": 1}, 1)
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as err:
        manager.save({"model": {"w": torch.ones(3)}, "step": 2}, 2)
    message = str(err.value)
    assert "no space left on device writing checkpoint model-000000002.pth" in message
    assert "the checkpoint of step 1" in message and "--resume=" in message and "free there" in message
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["model-000000001.pth"]
    assert load_checkpoint(tmp_path / "run" / "model-000000001.pth")["step"] == 1
    assert not list((tmp_path / "run").glob(".*.tmp.*"))


def test_atomic_write_leaves_the_old_file_on_any_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with disk_full_under(monkeypatch, tmp_path, "a.txt"):
        with pytest.raises(DiskFullError, match="needs about"):
            atomic_write_text(target, "new" * 1000)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
