"""Mixed precision with ``torch.autocast`` and ``torch.amp.GradScaler`` (issue: robustness).

The loop of the README's AMP example, with the VGS scaler in it, trains through overflow
steps exactly as the same loop with ``torch.optim.Adam`` does: ``GradScaler`` skips the
optimizer step of an overflow step, and the scaler with ``nonfinite="skip"`` leaves the
gradients, its statistics and its step count as they were (``specs/adapters-torch.md`` §3.7).
"""

from __future__ import annotations

import copy

import pytest
import torch

from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler

from tests.helpers.snapshots import snapshot


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _batches(count: int, overflow_at=()):
    data = torch.Generator().manual_seed(1)
    for step in range(count):
        x = torch.randn(32, 8, generator=data)
        y = torch.randn(32, 1, generator=data)
        if step in overflow_at:
            x = x * 6e4  # float16 activations overflow under autocast: inf/NaN gradients
        yield x, y


def _train(model, optimizer, vgs, batches, *, init_scale=2.0**10):
    """The README's AMP loop; returns (GradScaler scales, whether each step was applied)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    applied = []
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)            # true gradients (inf/NaN on an overflow step)
        if vgs is not None:
            vgs.scale_gradients()             # "skip": leaves non-finite gradients alone
        before = scaler.get_scale()
        scaler.step(optimizer)                # skipped by GradScaler on an overflow step
        if vgs is not None:
            vgs.step()                        # "skip": statistics and k unchanged
        scaler.update()
        applied.append(scaler.get_scale() >= before)
    return applied


def test_overflow_steps_are_skipped_as_with_adam():
    overflow = {3, 7}
    model, reference_model = _model(), _model()
    optimizer = AdaptiveUPGD(model.parameters(), lr=1e-3, sigma=1e-3, seed=5)
    vgs = VarianceGradientScaler(model.parameters(), warmup_steps=2, nonfinite="skip")
    adam = torch.optim.Adam(reference_model.parameters(), lr=1e-3)
    applied = _train(model, optimizer, vgs, _batches(10, overflow))
    applied_adam = _train(reference_model, adam, None, _batches(10, overflow))
    assert applied == applied_adam  # GradScaler saw the same overflow steps in both loops
    assert [i for i, ok in enumerate(applied) if not ok] == sorted(overflow)
    assert optimizer.last_step_info.step == 10 - len(overflow)
    assert vgs.stats.step == 10 - len(overflow) and vgs.skipped_steps == len(overflow)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("overflow_at", [0, 4])
def test_an_overflow_step_changes_nothing(overflow_at):
    """The same loop with and without the overflow batch: the overflow step leaves parameters,
    optimizer state and VGS statistics bit-identical to before it."""
    model = _model()
    optimizer = AdaptiveUPGD(model.parameters(), lr=1e-3, sigma=1e-3, seed=5)
    vgs = VarianceGradientScaler(model.parameters(), warmup_steps=2, nonfinite="skip")
    batches = list(_batches(overflow_at + 1, overflow_at=(overflow_at,)))
    _train(model, optimizer, vgs, batches[:overflow_at])
    before = snapshot(*[p.detach().numpy().copy() for p in model.parameters()],
                      optimizer.flat_state, vgs.stats)
    saved = copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, vgs, batches[overflow_at:])
    after = snapshot(*[p.detach().numpy().copy() for p in model.parameters()], optimizer.flat_state, vgs.stats)
    assert before[:-1] == after[:-1]  # parameters and optimizer state
    assert before[-1] != after[-1]  # only the VGS record's skipped-steps counter moved
    assert vgs.skipped_steps == 1
    assert optimizer.state_dict()["state"].keys() == saved["state"].keys()


def test_optimizer_skip_policy_skips_nonfinite_gradients():
    model = _model()
    optimizer = AdaptiveUPGD(model.parameters(), lr=1e-3, seed=5, nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    info = optimizer.last_step_info
    assert info.skipped and info.skipped_steps == 1 and info.step == 0
    raising = AdaptiveUPGD(_model().parameters(), lr=1e-3, seed=5)
    for p in raising.param_groups[0]["params"]:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        raising.step()


def test_nonfinite_policy_is_validated_and_pickled():
    with pytest.raises(ValueError, match="nonfinite"):
        AdaptiveUPGD(_model().parameters(), nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite"):
        VarianceGradientScaler(_model().parameters(), nonfinite="ignore")
    optimizer = AdaptiveUPGD(_model().parameters(), seed=1, nonfinite="skip")
    assert copy.deepcopy(optimizer)._nonfinite == "skip"
