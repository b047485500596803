"""Bad input through the numba backend behaves exactly as through the reference backend.

The only validation the backends do themselves is the finiteness scan (the Numba backend scans
in parallel and, on a hit, lets :func:`upgd_ref.checks.check_finite` word the error), so every
position of a non-finite value is compared: same exception type, same message, and params,
grads, optimizer and scaler bit-identical afterwards. ``tests/core/test_bad_input.py`` runs the
rest of the bad-input catalogue on every registered backend, numba included.
"""

from __future__ import annotations

import numpy as np
import pytest

from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref.kernels.numba_step import CHUNK

from tests.helpers.snapshots import assert_unchanged, random_buffers, snapshot
from tests.helpers.lockstep import numba_kernels

SHAPES = [(CHUNK + 10,), (3, 4), (0,), (2 * CHUNK + 1,)]


def outcome(backend, dtype, which, segment, element, value, present, with_scaler):
    """``(exception type, message)`` of one bad step (None if it succeeds), state checked."""
    layout = FlatLayout(SHAPES, dtype=dtype)
    opt = AdaptiveUPGD(layout, lr=1e-2, adaptive_noise=True, sigma=0.1, seed=2, backend=backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend=backend)
    params, grads = random_buffers(layout, 0)
    opt.step(params, grads, vgs=vgs)  # non-trivial state first
    params, grads = random_buffers(layout, 1)
    (params if which == "params" else grads)[layout.segment_slice(segment)][element] = value
    before = snapshot(opt, vgs, params, grads)
    try:
        opt.step(params, grads, present, vgs=vgs if with_scaler else None)
    except Exception as error:  # noqa: BLE001 - the point is to compare whatever is raised
        assert_unchanged(before, snapshot(opt, vgs, params, grads))
        return type(error), str(error)
    return None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("which", ["params", "grads"])
@pytest.mark.parametrize(("segment", "element"), [(0, 0), (0, CHUNK + 9), (1, 5), (3, CHUNK), (3, 2 * CHUNK)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("with_scaler", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_non_finite_input_is_rejected_identically(dtype, which, segment, element, value, with_scaler, parallel):
    args = (dtype, which, segment, element, value, None, with_scaler)
    with numba_kernels(parallel):
        got = outcome("numba", *args)
    want = outcome("reference", *args)
    assert got is not None and got == want


@pytest.mark.parametrize("parallel", [False, True])
def test_non_finite_values_in_frozen_segments_are_ignored_identically(parallel):
    present = [True, False, True, True]
    args = ("float32", "grads", 1, 3, np.nan, present, True)
    with numba_kernels(parallel):
        assert outcome("numba", *args) is None
    assert outcome("reference", *args) is None


def test_all_present_segments_checked_when_several_are_bad():
    """The first bad segment (in segment order) is named, as by the reference."""
    layout = FlatLayout(SHAPES, dtype="float32")
    messages = []
    for backend in ("numba", "reference"):
        opt = AdaptiveUPGD(layout, backend=backend)
        params, grads = random_buffers(layout, 0)
        grads[layout.segment_slice(3)][7] = np.inf
        grads[layout.segment_slice(1)][2] = np.nan
        with pytest.raises(ValueError) as error:
            opt.step(params, grads)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "segment 1" in messages[0]
