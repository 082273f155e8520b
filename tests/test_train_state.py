"""TrainState: what a checkpoint holds of a run, and the one restore path used by --resume and
--init_dir (with --load_optimizer / --load_step / --ignore_load)."""

import pytest
import torch

from bevtrain import build
from bevtrain.checkpoint import CheckpointError, atomic_save, capture_rng, load_checkpoint
from bevtrain.config import resolve_config
from bevtrain.train_state import TrainState

CFG, _ = resolve_config({"lr": 1e-2, "max_iters": 20, "pct_start": 0.2, "amp": "none"})


def fresh_state(seed=0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = build.build_optimizer(CFG, model)
    _, scaler, _ = build.build_precision(CFG.amp, torch.device("cpu"))
    return TrainState(model, optimizer, build.build_scheduler(CFG, optimizer), scaler)


def train_steps(state: TrainState, n: int) -> None:
    for _ in range(n):
        state.model(torch.randn(8, 3)).pow(2).mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad()
        state.step += 1


def saved(state: TrainState, tmp_path, **extra):
    body = state.state_dict([capture_rng()], {"epoch": 1, "consumed": 4}, {"epoch": 0, "consumed": 2}, True)
    return load_checkpoint(atomic_save({**body, **extra}, tmp_path / f"model-{state.step:09d}.pth"))


def test_resume_restores_everything_and_continues_identically(tmp_path):
    state = fresh_state()
    train_steps(state, 5)
    state.nonfinite_total = 2
    ckpt = saved(state, tmp_path)
    back = fresh_state(seed=1)  # other weights: everything must come from the checkpoint
    back.load_state_dict(ckpt, tmp_path / "x.pth")
    assert (back.step, back.nonfinite_total, back.val_pending) == (5, 2, True)
    assert back.data_pos == {"train": {"epoch": 1, "consumed": 4}, "val": {"epoch": 0, "consumed": 2}}
    torch.manual_seed(7)
    train_steps(state, 3)
    torch.manual_seed(7)
    train_steps(back, 3)
    for a, b in zip(state.model.parameters(), back.model.parameters()):
        assert torch.equal(a, b)  # same weights, moments and schedule: the same three updates
    assert back.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]


def test_init_with_load_step_fast_forwards_the_schedule_and_keeps_a_fresh_optimiser(tmp_path):
    state = fresh_state()
    train_steps(state, 6)
    ckpt = saved(state, tmp_path)
    init = fresh_state(seed=1)
    init.load_state_dict(ckpt, "src.pth", optimizer=False, step=True, progress=False)
    assert init.step == 6 and init.data_pos == {} and not init.val_pending
    assert init.optimizer.param_groups[0]["lr"] == pytest.approx(state.optimizer.param_groups[0]["lr"])
    assert not init.optimizer.state  # no Adam moments taken over
    weights_only = fresh_state(seed=1)
    weights_only.load_state_dict(ckpt, "src.pth", optimizer=False, step=False, progress=False)
    assert weights_only.step == 0 and weights_only.optimizer.param_groups[0]["lr"] == pytest.approx(
        fresh_state().optimizer.param_groups[0]["lr"])


def test_init_options_ignore_load_and_a_missing_optimiser(tmp_path):
    state = fresh_state()
    train_steps(state, 2)
    ckpt = saved(state, tmp_path)
    target = fresh_state(seed=1)
    before = target.model[2].weight.detach().clone()
    skipped = target.load_state_dict(ckpt, "src.pth", ignore_load=["2."], optimizer=False, step=False,
                                     progress=False)
    assert sorted(skipped) == ["2.bias", "2.weight"]
    assert torch.equal(target.model[2].weight, before)
    assert torch.equal(target.model[0].weight, state.model[0].weight)
    no_optimiser = {k: v for k, v in ckpt.items() if k != "optimizer"}
    with pytest.raises(CheckpointError, match="src.pth holds no bevtrain optimiser state"):
        fresh_state().load_state_dict(no_optimiser, "src.pth", optimizer=True, step=False, progress=False)
