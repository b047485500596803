"""Pass 1 writes nothing and reduces the finiteness checks identically on every backend
(``specs/algorithm.md`` §8.1, ``specs/kernels.md`` §1): ``max |p|`` and the non-finite count
exactly, ``max |d|`` exactly between the kernels (the same expression) and within the
dtype's rounding of the reference's; the Numba serial and parallel kernels bit for bit.
(Where a segment holds a non-finite element its ``max |d|`` is not read.)"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.backend_names import BACKEND_NAMES
from upgd_ref import FlatLayout
from upgd_ref.backends import BACKENDS
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.kernels.numba_backend import NumbaBackend
from upgd_ref.kernels.numba_step import CHUNK
from upgd_ref.reference import PRODUCTION, UPGDVariant
from upgd_ref.stages import SegmentReductions
from upgd_ref.state import FlatUPGDState

NO_MOMENTS = UPGDVariant(moments="none")


def _case(dtype):
    layout = FlatLayout([(CHUNK + 9,), (0,), (7,), (3 * CHUNK,)], dtype=dtype)
    data = np.random.default_rng(11)
    params = layout.pack([data.standard_normal(s) * 3 for s in layout.shapes])
    grads = layout.pack([data.standard_normal(s) for s in layout.shapes])
    state = FlatUPGDState.zeros(layout, [1.0] * layout.num_segments)
    state.step, state.segment_step[...] = 3, [3, 0, 2, 3]
    for name in FlatUPGDState.BUFFERS:
        getattr(state, name)[...] = np.abs(layout.pack([data.standard_normal(s) for s in layout.shapes]))
    big = np.finfo(dtype).max
    grads[layout.offsets[0] + 5] = np.nan  # non-finite input
    grads[layout.offsets[3] + CHUNK + 3] = np.sqrt(big) * 4  # (f g)^2 overflows v, f = 1 or 0.5
    params[layout.offsets[3] + 17] = big / 3  # the largest |p|
    return layout, params, grads, state


def _first_pass(backend, layout, params, grads, state, variant, factor):
    hyper = [validate_upgd({"lr": 1e-2})] * layout.num_segments
    return backend.first_pass(layout=layout, params=params, grads=grads, state=state, present=[True, True, True, True],
                              hyper=hyper, vgs_factor=factor, variant=variant)


@pytest.mark.parametrize("variant", [PRODUCTION, NO_MOMENTS], ids=["adam", "no-moments"])
@pytest.mark.parametrize("factor", [1.0, 0.5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pass1_is_read_only_and_its_checks_agree(dtype, factor, variant):
    layout, params, grads, state = _case(dtype)
    before = [b.copy() for b in (params, grads, state.utility, state.first_moment, state.second_moment)]
    results = {}
    backends = {name: BACKENDS[name] for name in BACKEND_NAMES}
    backends["numba-serial"] = NumbaBackend(parallel_min_size=2**62)
    backends["numba-parallel"] = NumbaBackend(parallel_min_size=0)
    for name, backend in backends.items():
        results[name] = _first_pass(backend, layout, params, grads, state, variant, factor)
        after = (params, grads, state.utility, state.first_moment, state.second_moment)
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after)), name
    reference = results.pop("reference")
    present = [0, 2, 3]  # segment 1 is empty; 0 holds a NaN, 3 an overflowing g*g (read only with moments)
    expected = [1.0, 0.0, 1.0 if variant.moments == "adam" else 0.0]
    for name, r in results.items():
        assert r.nonfinite[present].tolist() == reference.nonfinite[present].tolist() == expected, name
        assert np.array_equal(r.param_max[present], reference.param_max[present]), name
        assert r.param_max[3] == np.float64(np.asarray(np.finfo(dtype).max / 3, dtype=dtype))
        # max |d| is read only where nothing is non-finite (the reference's max propagates NaN)
        np.testing.assert_allclose(r.direction_max[2], reference.direction_max[2], rtol=4 * np.finfo(dtype).eps,
                                   err_msg=name)
    # the Numba kernels, serial or parallel: every field bit for bit; the CUDA source (its own
    # summation order, specs/kernels-cuda.md §2): the extrema and the checks bit for bit
    for name, r in results.items():
        fields = SegmentReductions._fields if name.startswith("numba") else (
            "utility_min", "utility_max", "param_max", "direction_max", "nonfinite")
        for field in fields:
            assert np.array_equal(getattr(r, field)[present], getattr(results["numba"], field)[present],
                                  equal_nan=True), (name, field)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lane_extremes_are_numbas_ndarray_min_and_max_bit_for_bit(dtype):
    """Pass 1's lane minima and maxima reduce as Numba's ``ndarray.min``, ``max`` (which they
    replace) do: the first NaN when there is one (its sign kept), else the first of equal
    extremes (so ``-0.0`` and ``+0.0`` in their order)."""
    from numba import njit

    from upgd_ref.kernels.numba_step import LANES, lane_extremes

    array_min_max = njit(lambda lows, highs: (lows.min(), highs.max()))
    data = np.random.default_rng(5)
    nans = np.array([np.nan, -np.nan], dtype=dtype)
    for case in range(200):
        lows = data.choice([-1.0, -0.0, 0.0, 1.0, 2.0], LANES).astype(dtype)
        highs = data.choice([-1.0, -0.0, 0.0, 1.0, 2.0], LANES).astype(dtype)
        if case % 3 == 0:
            lows[data.integers(LANES, size=2)] = nans
        if case % 4 == 0:
            highs[data.integers(LANES, size=2)] = nans[::-1]
        got, expected = lane_extremes(lows, highs), array_min_max(lows, highs)
        assert np.array(got, dtype=dtype).tobytes() == np.array(expected, dtype=dtype).tobytes()
