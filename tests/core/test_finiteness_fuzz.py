"""Fuzzing the finiteness contract (``specs/algorithm.md`` §8) on every NumPy backend.

Random finite values across the whole float range (parameters, gradients), random accepted
hyper-parameters (up to ``lr = 1e38``, ``noise_ema_init = 1e300``, ``eps`` down to 1e-30),
every family member, fused VGS or not, both policies, several steps. Every step either
raises a documented error (``NonFiniteStepError``, or a ``ValueError`` for settings the
dtype cannot represent) with everything bit-identical, or is skipped with everything
bit-identical but the counter, or leaves parameters, state and VGS statistics finite; and
every state that exists saves and loads back bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.snapshots import assert_unchanged, snapshot
from upgd_ref import UPGD, UPGDW, AdaptiveUPGD, FlatLayout, VarianceGradientScaler

MEMBERS = ("AdaptiveUPGD", "AdaptiveUPGD-paper", "UPGD", "UPGD-paper", "UPGDW")


def _log_uniform(low, high):
    return st.floats(min_value=low, max_value=high).map(lambda e: float(10.0**e))


def _unit():
    return st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def optimizers(draw, layout, backend):
    member = draw(st.sampled_from(MEMBERS))
    common = dict(
        lr=draw(st.one_of(st.just(0.0), _log_uniform(-30, 38))),
        weight_decay=draw(st.one_of(st.just(0.0), _log_uniform(-30, 3))),
        sigma=draw(st.one_of(st.just(0.0), _log_uniform(-30, 30))),
        adaptive_noise=draw(st.booleans()), instant_noise_scale=draw(st.booleans()),
        noise_beta=draw(_unit()), min_noise_std=draw(st.one_of(st.just(0.0), _log_uniform(-30, 10))),
        noise_ema_init=draw(st.one_of(st.just(0.0), _log_uniform(-30, 300))),
        noise_norm=draw(st.sampled_from(["segment", "global"])), seed=draw(st.integers(0, 2**64 - 1)),
        backend=backend, nonfinite=draw(st.sampled_from(["raise", "skip"])),
    )
    betas = (draw(_unit()), draw(_unit()))
    eps = draw(_log_uniform(-30, 0))
    if member == "UPGDW":
        return UPGDW(layout, betas=betas, eps=eps, **common)
    cls, profile = (AdaptiveUPGD if member.startswith("Adaptive") else UPGD), member.partition("-")[2] or "production"
    if cls is AdaptiveUPGD:
        common.update(beta1=betas[0], beta2=betas[1], eps=eps)
    return cls(layout, beta_utility=draw(_unit()), profile=profile, **common)


def _buffer(draw, layout):
    floats = st.floats(allow_nan=False, allow_infinity=False, width=layout.dtype.itemsize * 8)
    values = draw(st.lists(floats, min_size=layout.num_logical, max_size=layout.num_logical))
    return layout.pack(np.split(np.asarray(values, dtype=layout.dtype), np.cumsum(layout.sizes)[:-1]))


def _state(opt, vgs):
    return snapshot(opt.state_dict(), None if vgs is None else vgs.state_dict())


def _finite(opt, params, vgs):
    arrays = [params, opt.state.utility, opt.state.first_moment, opt.state.second_moment, opt.state.grad_norm_ema]
    if vgs is not None:
        arrays += [vgs.state.grad_mean_avg, vgs.state.grad_sq_avg]
    return all(np.isfinite(a).all() for a in arrays)


def _round_trip(opt, vgs, directory: Path):
    """Save and load (a file and a state dict) into fresh objects: bit-identical states."""
    opt.save(directory / "opt.npz")
    loaded = type(opt)(opt.layout, backend=opt.backend, **({"profile": "paper"} if opt.variant.update_factor == 2 else {}))
    loaded.load(directory / "opt.npz")
    assert _state(loaded, None) == _state(opt, None)
    if vgs is not None:
        vgs.save(directory / "vgs.npz")
        again = VarianceGradientScaler(vgs.layout)
        again.load(directory / "vgs.npz")
        assert snapshot(again.state_dict()) == snapshot(vgs.state_dict())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_every_step_is_finite_or_refused_with_nothing_changed(backend, data):
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    sizes = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    layout = FlatLayout([(n,) for n in sizes], dtype=dtype)
    opt = data.draw(optimizers(layout, backend))
    vgs = (VarianceGradientScaler(layout, warmup_steps=0, alpha=data.draw(_log_uniform(-3, 3)), backend=backend)
           if data.draw(st.booleans()) else None)
    params = _buffer(data.draw, layout)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(data.draw(st.integers(1, 4))):
            grads = _buffer(data.draw, layout)
            present = data.draw(st.lists(st.booleans(), min_size=layout.num_segments, max_size=layout.num_segments))
            before = snapshot(_state(opt, vgs), params, grads)
            skipped_before = opt.state.skipped_steps
            try:
                info = opt.step(params, grads, present, vgs=vgs)
            except ValueError:  # NonFiniteStepError, or settings the dtype cannot hold
                assert_unchanged(before, snapshot(_state(opt, vgs), params, grads))
                continue
            if info.skipped:
                assert opt.nonfinite == "skip" and opt.state.skipped_steps == skipped_before + 1
                opt.state.skipped_steps -= 1
                assert_unchanged(before, snapshot(_state(opt, vgs), params, grads))
                opt.state.skipped_steps += 1
            else:
                assert _finite(opt, params, vgs)
            _round_trip(opt, vgs, Path(tmp))
