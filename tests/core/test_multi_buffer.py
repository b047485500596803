"""One step over several flat buffers (``specs/step.md`` §3): the grouping of segments into
buffers changes no bit of the result, on every NumPy backend, with and without VGS."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from tests.helpers.backend_names import BACKEND_NAMES
from upgd_ref.checks import NonFiniteStepError
from upgd_ref.hyperparams import UPGD_DEFAULTS
from upgd_ref.multi import MultiLayout, MultiUPGDState
from upgd_ref.state import FlatUPGDState, FlatVGSState
from upgd_ref.step import StepRequest, VGSRequest, upgd_step


shapes_strategy = st.lists(
    st.one_of(st.just((0,)), st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 4), st.integers(1, 5))),
    min_size=1, max_size=6,
)


def _values(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes], [rng.standard_normal(s) * 10 ** rng.uniform(-2, 1) for s in shapes]


def _run(layout, state, params, grads, present, backend, noise_norm, with_vgs, steps=3):
    hyper = [dict(UPGD_DEFAULTS, adaptive_noise=True)] * layout.num_segments
    request = StepRequest(hyper=hyper, present=present, seed=11, noise_norm=noise_norm)
    vgs_state = FlatVGSState.zeros(layout.num_segments)
    stats = []
    for _ in range(steps):
        vgs = VGSRequest(vgs_state, 0.75, 0.9) if with_vgs else None
        stats.append(upgd_step(layout, params, grads, state, request, vgs=vgs, backend=backend))
    return stats, vgs_state


def _bits(arrays):
    return [np.asarray(a).tobytes() for a in arrays]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=25, deadline=None)
@given(shapes=shapes_strategy, data=st.data(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16"]), noise_norm=st.sampled_from(["segment", "global"]),
       with_vgs=st.booleans())
def test_grouping_into_buffers_changes_no_bit(backend, shapes, data, seed, dtype, noise_norm, with_vgs):
    """16-bit buffers too: each is widened to float32 and rounded back per buffer."""
    n = len(shapes)
    buffers = data.draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))
    buffers = [sorted(set(buffers)).index(b) for b in buffers]  # number the buffers 0 .. B-1
    present = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    params, grads = _values(seed, shapes)

    flat = upgd_ref.FlatLayout(shapes, dtype=dtype)
    p, g, state = flat.pack(params), flat.pack(grads), FlatUPGDState.zeros(flat, [1.0] * n)
    one, one_vgs = _run(flat, state, p, g, present, backend, noise_norm, with_vgs)

    multi = MultiLayout(shapes, buffers, dtype)
    mp, mg, mstate = multi.pack(params), multi.pack(grads), MultiUPGDState.zeros(multi, [1.0] * n)
    many, many_vgs = _run(multi, mstate, mp, mg, present, backend, noise_norm, with_vgs)

    assert _bits(flat.unpack(p)) == _bits(multi.unpack(mp))
    assert _bits(flat.unpack(g)) == _bits(multi.unpack(mg))  # VGS scales them in place
    for name in FlatUPGDState.BUFFERS:
        assert _bits(flat.unpack(getattr(state, name))) == _bits(
            multi.unpack([getattr(part, name) for part in mstate.parts]))
    assert _bits([state.segment_step, state.grad_norm_ema]) == _bits([mstate.segment_step, mstate.grad_norm_ema])
    assert state.step == mstate.step == 3
    assert _bits([one_vgs.grad_mean_avg, one_vgs.grad_sq_avg]) == _bits([many_vgs.grad_mean_avg, many_vgs.grad_sq_avg])
    for a, b in zip(one, many):
        assert _bits([a.grad_norm, a.noise_std]) == _bits([b.grad_norm, b.noise_std])
        assert _bits([np.float64(a.utility_min), np.float64(a.utility_max)]) == _bits(
            [np.float64(b.utility_min), np.float64(b.utility_max)])


def test_noise_of_a_part_is_indexed_by_the_whole_model():
    multi = MultiLayout([(5,), (3,), (4,)], [1, 0, 1], "float64")
    whole = upgd_ref.FlatLayout(multi.shapes, "float64")
    expected = whole.unpack(upgd_ref.rng.noise(whole, 7, 2))
    parts = [upgd_ref.rng.noise(part, 7, 2) for part in multi.parts]
    for got, want in zip(multi.unpack(parts), expected):
        np.testing.assert_array_equal(got, want)
    assert multi.parts[1].noise_offsets == (0, 8)
    assert upgd_ref.FlatLayout.from_dict(multi.parts[1].to_dict()) == multi.parts[1]
    assert "noise_offsets" not in whole.to_dict()  # single-buffer dicts are as before


def test_mixed_dtypes_each_buffer_in_its_dtype_and_numbering_of_buffers_is_free():
    shapes = [(6,), (4,), (3,), (5,)]
    params, grads = _values(3, shapes)
    results = []
    for buffers, dtypes in (([0, 1, 0, 1], ["float64", "float32"]), ([1, 0, 1, 0], ["float32", "float64"])):
        multi = MultiLayout(shapes, buffers, dtypes)
        mp, mg, state = multi.pack(params), multi.pack(grads), MultiUPGDState.zeros(multi, [1.0] * 4)
        stats, _ = _run(multi, state, mp, mg, None, "auto", "global", True, steps=2)
        assert [multi.unpack(mp)[i].dtype.name for i in range(4)] == ["float64", "float32", "float64", "float32"]
        assert state.step == 2 and (state.segment_step == 2).all()
        results.append(_bits(multi.unpack(mp)) + _bits([state.grad_norm_ema, stats[-1].noise_std]))
    assert results[0] == results[1]


def test_bad_multi_input_names_the_part_and_changes_nothing():
    shapes = [(4,), (3,)]
    params, grads = _values(0, shapes)
    multi = MultiLayout(shapes, [0, 1], "float64")
    mp, mg, state = multi.pack(params), multi.pack(grads), MultiUPGDState.zeros(multi, [1.0, 1.0])
    before = _bits(mp)
    request = StepRequest(hyper=[UPGD_DEFAULTS] * 2)
    with pytest.raises(TypeError, match=r"grads\[1\] has a dtype float32"):
        upgd_step(multi, mp, [mg[0], mg[1].astype(np.float32)], state, request)
    with pytest.raises(ValueError, match="one per part"):
        upgd_step(multi, mp, mg[:1], state, request)
    with pytest.raises(TypeError, match="MultiUPGDState"):
        upgd_step(multi, mp, mg, FlatUPGDState.zeros(multi.parts[0], [1.0]), request)
    mg[1][1] = np.inf
    with pytest.raises(NonFiniteStepError, match="grads: segment 1 ") as error:
        upgd_step(multi, mp, mg, state, request)
    assert error.value.segment == 1 and _bits(mp) == before and state.step == 0
    with pytest.raises(ValueError, match="buffers"):
        MultiLayout(shapes, [0, 2], "float64")


def test_multi_state_save_and_load_resume_bit_exactly():
    shapes = [(6,), (4,), (3,), (5,)]
    params, grads = _values(5, shapes)
    multi = MultiLayout(shapes, [0, 1, 2, 1], ["float32", "bfloat16", "float16"])
    mp, mg, state = multi.pack(params), multi.pack(grads), MultiUPGDState.zeros(multi, [1.0] * 4)
    _run(multi, state, mp, mg, None, "auto", "global", False, steps=2)
    saved = state.to_state(multi)
    again = MultiUPGDState.from_state(saved, multi)
    ap, ag = [b.copy() for b in mp], [b.copy() for b in mg]
    _run(multi, state, mp, mg, None, "auto", "global", False, steps=2)
    _run(multi, again, ap, ag, None, "auto", "global", False, steps=2)
    assert _bits(mp) == _bits(ap) and _bits([state.grad_norm_ema]) == _bits([again.grad_norm_ema])
    saved["parts"][1]["step"] = 7
    with pytest.raises(ValueError, match="part 1"):
        MultiUPGDState.from_state(saved, multi)
