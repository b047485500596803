"""16-bit parameters (``specs/precision.md``): every backend bit-identical, each step within
``specs/tolerances.md`` §2a of the float64 truth, stochastic rounding as defined, a 16-bit
state's overflow refused before anything changes, mixed dtypes in one step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref import precision, tolerances
from upgd_ref import reference as ref
from tests.helpers.backend_names import BACKEND_NAMES
from upgd_ref.checks import NonFiniteStepError
from upgd_ref.hyperparams import UPGD_DEFAULTS, validate_upgd
from upgd_ref.multi import MultiLayout, MultiUPGDState
from upgd_ref.state import FlatUPGDState
from upgd_ref.step import StepRequest, upgd_step

LOW = ("float16", "bfloat16")
SHAPES = [(300,), (20, 20), (5,), (0,), (2100,)]  # 2100: two kernel chunks


def _run(dtype, backend, rounding, state_dtype, steps=3, vgs=False, seed=3):
    layout = upgd_ref.FlatLayout(SHAPES, dtype)
    rng = np.random.default_rng(0)
    params = layout.pack([rng.standard_normal(s) for s in SHAPES])
    state = FlatUPGDState.zeros(layout, [1.0] * len(SHAPES), state_dtype)
    request = StepRequest(hyper=[dict(UPGD_DEFAULTS, lr=1e-2, adaptive_noise=True)] * len(SHAPES), seed=seed,
                          noise_norm="global", rounding=rounding, present=[True, True, False, True, True])
    scaler = upgd_ref.step.VGSRequest(upgd_ref.state.FlatVGSState.zeros(len(SHAPES)), 0.5, 0.9) if vgs else None
    for _ in range(steps):
        grads = layout.pack([rng.standard_normal(s) for s in SHAPES])
        upgd_step(layout, params, grads, state, request, vgs=scaler, backend=backend)
    return params, state, grads


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rounding", precision.ROUNDINGS)
@pytest.mark.parametrize("keep_16bit_state", [False, True])
def test_every_backend_gives_the_same_bits(dtype, rounding, keep_16bit_state):
    results = {}
    for backend in BACKEND_NAMES:
        params, state, grads = _run(dtype, backend, rounding, dtype if keep_16bit_state else None, vgs=True)
        assert params.dtype == np.dtype(upgd_ref.FlatLayout([(1,)], dtype).dtype)
        assert state.utility.dtype == (params.dtype if keep_16bit_state else np.float32)
        results[backend] = [b.tobytes() for b in (params, grads, state.utility, state.first_moment,
                                                   state.second_moment, state.grad_norm_ema)]
    assert all(r == results["reference"] for r in results.values())


def test_stochastic_rounding_is_seeded_and_differs_from_nearest():
    near, _, _ = _run("bfloat16", "reference", "nearest", None, steps=1)
    a, _, _ = _run("bfloat16", "reference", "stochastic", None, steps=1)
    b, _, _ = _run("bfloat16", "reference", "stochastic", None, steps=1)
    c, _, _ = _run("bfloat16", "reference", "stochastic", None, steps=1, seed=4)
    assert a.tobytes() == b.tobytes() and a.tobytes() != near.tobytes() and a.tobytes() != c.tobytes()


@pytest.mark.parametrize("dtype", LOW)
@settings(max_examples=30, deadline=None)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True), exponent=st.integers(-10, 10), sign=st.sampled_from([-1, 1]))
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype, fraction, exponent, sign):
    """Rounding one float32 ``x`` between neighbours ``lo``, ``hi`` with 2**16 words of the
    stream: every result is ``lo`` or ``hi`` and the share of ``hi`` is ``(x - lo)/(hi - lo)``
    within five standard deviations of a binomial."""
    dtype = upgd_ref.FlatLayout([(1,)], dtype).dtype
    lo = np.asarray(sign * 2.0**exponent * 1.0, dtype=dtype)
    hi = np.nextafter(lo, np.asarray(sign * np.inf, dtype=dtype))
    x = np.float32(float(lo) + fraction * (float(hi) - float(lo)))
    exact = (abs(float(x)) - abs(float(lo))) / (abs(float(hi)) - abs(float(lo)))
    n = 2**16
    words = precision.rounding_words(7, 3, 12345, n)
    rounded = precision.round_stochastic(np.full(n, x, dtype=np.float32), dtype, words).astype(np.float64)
    assert set(np.unique(rounded)) <= {float(lo), float(hi)}
    share = float(np.mean(rounded == float(hi)))
    assert abs(share - exact) <= 5 * math.sqrt(max(exact * (1 - exact), 1 / n) / n) + 2.0**-32


def test_rounding_stream_is_disjoint_from_the_noise_stream():
    """The rounding words at step T are not the noise's words: counter word 3 has bit 31 set."""
    words = precision.rounding_words(5, 1, 0, 8)
    noise_words = np.stack(upgd_ref.rng.philox4x32_10(
        (np.arange(2, dtype=np.uint32), np.zeros(2, np.uint32), np.ones(2, np.uint32), np.zeros(2, np.uint32)),
        (5, 0)), axis=1).reshape(-1)
    assert words.dtype == np.uint32 and not np.array_equal(words, noise_words)
    high = np.stack(upgd_ref.rng.philox4x32_10(
        (np.arange(2, dtype=np.uint32), np.zeros(2, np.uint32), np.ones(2, np.uint32),
         np.full(2, 2**31, np.uint32)), (5, 0)), axis=1).reshape(-1)
    np.testing.assert_array_equal(words, high)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rounding", precision.ROUNDINGS)
@pytest.mark.parametrize("keep_16bit_state", [False, True])
def test_each_16bit_step_is_within_the_contract_of_float64(backend, dtype, rounding, keep_16bit_state):
    """Lockstep (``specs/tolerances.md`` §1): each step from the candidate's own 16-bit
    parameters and its state, against the float64 step; bounds of §2a."""
    shapes = [(64,), (7, 9), (0,), (300,)]
    layout = upgd_ref.FlatLayout(shapes, dtype)
    hyper = [validate_upgd(dict(UPGD_DEFAULTS, lr=0.05, adaptive_noise=True, weight_decay=0.01))] * len(shapes)
    state = FlatUPGDState.zeros(layout, [1.0] * len(shapes), layout.dtype if keep_16bit_state else None)
    rng = np.random.default_rng(1)
    params = layout.pack([rng.standard_normal(s) for s in shapes])
    request = StepRequest(hyper=hyper, seed=9, rounding=rounding)
    view = lambda b: [a.astype(np.float64) for a in layout.unpack(b)]  # noqa: E731
    for step in range(1, 6):
        grads = layout.pack([rng.standard_normal(s) * 10 ** rng.uniform(-2, 0.5) for s in shapes])
        before = ref.UPGDState(np.int64(state.step), state.segment_step.copy(), view(state.utility),
                               view(state.first_moment), view(state.second_moment), state.grad_norm_ema.copy())
        (p64, s64, _), scales = tolerances.upgd_step_scales(
            view(params), view(grads), before, layout.unpack(upgd_ref.rng.noise(layout, 9, step, "float64")), hyper)
        bounds = tolerances.upgd_step_bounds(scales, np.float32, layout.sizes)
        upgd_step(layout, params, grads, state, request, backend=backend)
        for name, got, want in (("params", view(params), p64), ("utility", view(state.utility), s64.utility),
                                ("first_moment", view(state.first_moment), s64.first_moment),
                                ("second_moment", view(state.second_moment), s64.second_moment)):
            low = name == "params" or keep_16bit_state
            for i in range(len(shapes)):
                bound = (tolerances.low_precision_bound(got[i], want[i], bounds[name][i], layout.dtype) if low
                         else bounds[name][i])
                assert tolerances.max_violation(got[i], want[i], bound) <= 1.0, (name, step, i)


def test_a_16bit_state_that_would_overflow_is_refused_and_nothing_changes():
    layout = upgd_ref.FlatLayout([(4,), (3,)], "float16")
    params = layout.pack([np.ones(4), np.ones(3)])
    grads = layout.pack([np.full(4, 0.5), np.full(3, 300.0)])  # v = (1 - beta2) g**2 fits; g**2 alone does not
    state = FlatUPGDState.zeros(layout, [1.0, 1.0], "float16")
    state.second_moment[layout.segment_slice(1)] = 65000.0
    before = [b.tobytes() for b in (params, grads, state.utility, state.first_moment, state.second_moment)]
    hyper = [dict(UPGD_DEFAULTS, beta2=0.5)] * 2
    with pytest.raises(NonFiniteStepError, match="second_moment: segment 1: .*float16") as error:
        upgd_step(layout, params, grads, state, StepRequest(hyper=hyper))
    assert error.value.field == "second_moment" and error.value.segment == 1
    assert before == [b.tobytes() for b in (params, grads, state.utility, state.first_moment, state.second_moment)]
    assert state.step == 0
    stats = upgd_step(layout, params, grads, state, StepRequest(hyper=hyper, nonfinite="skip"))
    assert stats.skipped and state.skipped_steps == 1 and state.step == 0
    assert before == [b.tobytes() for b in (params, grads, state.utility, state.first_moment, state.second_moment)]
    # the float32 state (the default) takes the same step
    state32 = FlatUPGDState.zeros(layout, [1.0, 1.0])
    state32.second_moment[layout.segment_slice(1)] = 65000.0
    upgd_step(layout, params, grads, state32, StepRequest(hyper=hyper))
    assert state32.step == 1 and np.isfinite(params.astype(np.float32)).all()


def test_a_16bit_parameter_that_would_overflow_is_refused_naming_its_dtype():
    layout = upgd_ref.FlatLayout([(4,)], "float16")
    params, grads = layout.pack([np.full(4, 65000.0)]), layout.pack([np.full(4, -1.0)])
    state = FlatUPGDState.zeros(layout, [1.0])
    with pytest.raises(NonFiniteStepError, match="params: segment 0: the update could overflow float16"):
        upgd_step(layout, params, grads, state, StepRequest(hyper=[dict(UPGD_DEFAULTS, lr=1e4)]))
    assert (layout.unpack(params)[0] == np.float16(65000.0)).all() and state.step == 0


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_mixed_dtypes_in_one_step_do_not_depend_on_the_grouping(backend):
    shapes = [(40,), (3, 3), (17,), (5,), (60,)]
    dtypes = ["bfloat16", "float32", "float16", "bfloat16", "float16"]
    rng = np.random.default_rng(2)
    values = [rng.standard_normal(s) for s in shapes]
    gradients = [rng.standard_normal(s) for s in shapes]
    results = []
    for split in (False, True):  # one buffer per dtype, or the bfloat16 segments in two buffers
        kinds = sorted(set(dtypes))
        buffers = [kinds.index(d) for d in dtypes]
        if split:
            buffers[3] = len(kinds)
        multi = MultiLayout(shapes, buffers, [*kinds, "bfloat16"] if split else kinds)
        params, grads = multi.pack(values), multi.pack(gradients)
        state = MultiUPGDState.zeros(multi, [1.0] * len(shapes))
        request = StepRequest(hyper=[dict(UPGD_DEFAULTS, lr=0.01)] * len(shapes), seed=1, noise_norm="global",
                              rounding="stochastic")
        for _ in range(3):
            upgd_step(multi, params, grads, state, request, backend=backend)
        segments = multi.unpack(params)
        assert [s.dtype.name for s in segments] == dtypes
        results.append([s.tobytes() for s in segments] + [state.grad_norm_ema.tobytes()])
    assert results[0] == results[1]


def test_16bit_checkpoint_and_scaler_round_trip():
    layout = upgd_ref.FlatLayout([(5,), (3,)], "bfloat16")
    opt, vgs = upgd_ref.AdaptiveUPGD(layout, seed=1), upgd_ref.VarianceGradientScaler(layout, warmup_steps=0)
    params = layout.pack([np.ones(5), np.ones(3)])
    for k in range(2):
        grads = layout.pack([np.full(5, 0.1 * (k + 1)), np.full(3, -0.2)])
        vgs.scale(grads)
        opt.step(params, grads)
        vgs.update(grads)
    saved = opt.state_dict()
    assert saved["state"]["utility"].dtype == np.float32
    again = upgd_ref.AdaptiveUPGD(layout, seed=1)
    again.load_state_dict(saved)
    a, b = params.copy(), params.copy()
    opt.step(a, grads.copy())
    again.step(b, grads.copy())
    assert a.tobytes() == b.tobytes() and opt.noise().dtype == np.float32
