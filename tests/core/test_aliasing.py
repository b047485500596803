"""Aliasing and masked arrays (``specs/step.md`` §1): refused before anything is written.

``params`` or ``grads`` overlapping one of the optimizer's own state buffers (``utility``,
the moments, the per-segment records) or the scaler's statistics, or each other, raise a
``ValueError`` naming both buffers; NumPy masked arrays raise the same ``TypeError`` on every
backend. Params, grads and both objects are bit-identical afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref.step import vgs_update_step

from tests.helpers.snapshots import assert_unchanged, random_buffers, snapshot

SHAPES = [(5, 3), (0,), (9,)]
STATE_BUFFERS = ("utility", "first_moment", "second_moment")


def _trained(backend, dtype="float64"):
    layout = FlatLayout(SHAPES, dtype=dtype)
    opt = AdaptiveUPGD(layout, lr=1e-2, sigma=0.05, adaptive_noise=True, seed=4, backend=backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend=backend)
    params, grads = random_buffers(layout, 2)
    for _ in range(3):
        opt.step(params, grads.copy(), vgs=vgs)
    return layout, opt, vgs, params, grads


@pytest.mark.parametrize("role", ["params", "grads"])
@pytest.mark.parametrize("buffer", STATE_BUFFERS)
@pytest.mark.parametrize("how", ["same", "shifted view"])
def test_input_overlapping_a_state_buffer_is_refused(backend, role, buffer, how):
    layout, opt, vgs, params, grads = _trained(backend)
    owned = getattr(opt.state, buffer)
    if how == "same":
        alias = owned
    else:  # a buffer of the layout's length that starts inside the state buffer
        base = np.zeros(2 * layout.size, dtype=layout.dtype)
        base[3 : 3 + layout.size] = owned
        setattr(opt.state, buffer, base[3 : 3 + layout.size])
        alias = base[5 : 5 + layout.size]
    inputs = {"params": params, "grads": grads, role: alias}
    before = snapshot(opt, vgs, params, grads, alias)
    with pytest.raises(ValueError, match=rf"{role} shares memory with state\.{buffer}"):
        opt.step(inputs["params"], inputs["grads"], vgs=vgs)
    assert_unchanged(before, snapshot(opt, vgs, params, grads, alias))


@pytest.mark.parametrize("record", ["segment_step", "grad_norm_ema"])
def test_input_overlapping_a_per_segment_record_is_refused(backend, record):
    """The int64 and float64 records of the state, placed inside the parameter buffer."""
    layout, opt, vgs, params, grads = _trained(backend)
    values = getattr(opt.state, record)
    hosted = params.copy()
    setattr(opt.state, record, hosted[: layout.num_segments].view(values.dtype))
    getattr(opt.state, record)[...] = values
    before = snapshot(opt, vgs, hosted, grads)
    with pytest.raises(ValueError, match=rf"params shares memory with state\.{record}"):
        opt.step(hosted, grads, vgs=vgs)
    assert_unchanged(before, snapshot(opt, vgs, hosted, grads))


@pytest.mark.parametrize("statistic", ["grad_mean_avg", "grad_sq_avg"])
def test_grads_overlapping_the_scalers_statistics_are_refused(backend, statistic):
    layout, opt, vgs, params, grads = _trained(backend)
    values = getattr(vgs.state, statistic)
    hosted = grads.copy()
    setattr(vgs.state, statistic, hosted[: layout.num_segments])
    hosted[: layout.num_segments] = values
    before = snapshot(opt, vgs, params, hosted)
    with pytest.raises(ValueError, match=rf"grads shares memory with vgs\.state\.{statistic}"):
        opt.step(params, hosted, vgs=vgs)
    with pytest.raises(ValueError, match=rf"grads shares memory with state\.{statistic}"):
        vgs.update(hosted)
    with pytest.raises(ValueError, match=rf"grads shares memory with state\.{statistic}"):
        vgs_update_step(layout, hosted, vgs.state, 0.99, backend=backend)
    assert_unchanged(before, snapshot(opt, vgs, params, hosted))


def test_params_and_grads_overlapping_each_other_are_refused(backend):
    layout, opt, vgs, params, grads = _trained(backend)
    base = np.concatenate([params, grads])
    shifted = base[8 : 8 + layout.size]  # overlaps both halves
    before = snapshot(opt, vgs, base)
    for p, g in ((base[: layout.size], shifted), (shifted, base[layout.size :]), (params, params)):
        with pytest.raises(ValueError, match=r"params and grads share memory"):
            opt.step(p, g, vgs=vgs)
    assert_unchanged(before, snapshot(opt, vgs, base))


def test_disjoint_slices_of_one_allocation_are_accepted(backend):
    """Adjacent halves of one buffer do not overlap: accepted, and the step is the usual one."""
    layout, opt, vgs, params, grads = _trained(backend)
    _, ref_opt, ref_vgs, ref_params, ref_grads = _trained(backend)
    base = np.concatenate([params, grads])
    opt.step(base[: layout.size], base[layout.size :], vgs=vgs)
    ref_opt.step(ref_params, ref_grads, vgs=ref_vgs)
    assert snapshot(base[: layout.size], base[layout.size :], opt, vgs) == snapshot(ref_params, ref_grads, ref_opt,
                                                                                    ref_vgs)


@pytest.mark.parametrize("role", ["params", "grads"])
@pytest.mark.parametrize("mask", ["none masked", "one masked"])
def test_masked_arrays_are_refused_on_every_backend(backend, role, mask):
    layout, opt, vgs, params, grads = _trained(backend)
    flags = np.zeros(layout.size, dtype=bool)
    flags[1] = mask == "one masked"
    masked = np.ma.masked_array((params if role == "params" else grads).copy(), mask=flags)
    inputs = {"params": params, "grads": grads, role: masked}
    before = snapshot(opt, vgs, params, grads, masked.data, masked.mask)
    with pytest.raises(TypeError, match=rf"{role} is a NumPy masked array"):
        opt.step(inputs["params"], inputs["grads"], vgs=vgs)
    with pytest.raises(TypeError, match=rf"{role} is a NumPy masked array"):
        opt.step(inputs["params"], inputs["grads"])
    if role == "grads":
        with pytest.raises(TypeError, match=r"grads is a NumPy masked array"):
            vgs.scale(masked)
        with pytest.raises(TypeError, match=r"grads is a NumPy masked array"):
            vgs.update(masked)
    assert_unchanged(before, snapshot(opt, vgs, params, grads, masked.data, masked.mask))
