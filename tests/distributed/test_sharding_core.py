"""Sharded steps in one process (ranks as threads): ``upgd_ref.sharding``, ``specs/distributed.md``.

Every NumPy backend: any world size and any partition (boundaries inside tensors) give the
same bits as one shard; on the chunked kernels (Numba) these are also the single-process
door's bits. Every family member, float32 and float64, VGS on and off, adaptive noise, a
frozen segment on some steps; consolidated state equal to the single-process state.
"""

from __future__ import annotations

import numpy as np
import pytest

from upgd_ref.backends import available_backends
from upgd_ref.layout import FlatLayout
from upgd_ref.sharding import (
    Partition,
    combine_chunk_partials,
    consolidate_states,
    message_length,
    pack_partials,
    unpack_partials,
)

from .sharded_runs import (
    MEMBER_PROFILES,
    inner_bounds,
    layout_of,
    shard_run,
    single_run,
    thread_world,
)

BACKENDS = [b for b in available_backends() if b in ("reference", "numba")]
STEPS = 12


def sharded(layout, world, bounds, member, use_vgs, backend, steps=STEPS, resume=None):
    """The ranks' results put together: full params, consolidated state, VGS state."""
    partition = Partition(layout, world, bounds)
    ranks = thread_world(partition, lambda r, gather: shard_run(partition, r, member, steps, use_vgs, backend,
                                                                gather, resume))
    params = layout.zeros()
    for shard, (values, _, _) in zip(partition.shards, ranks):
        shard.put(values, params)
    for _, _, vgs in ranks[1:]:  # replicated statistics stay identical
        assert all(np.array_equal(a, b) for a, b in zip(vgs.to_state().values(), ranks[0][2].to_state().values()))
    return params, consolidate_states([state for _, state, _ in ranks]), ranks[0][2]


def assert_same(a, b):
    pa, sa, va = a
    pb, sb, vb = b
    assert pa.tobytes() == pb.tobytes()
    for key in ("utility", "first_moment", "second_moment", "segment_step", "grad_norm_ema"):
        assert np.asarray(sa[key]).tobytes() == np.asarray(sb[key]).tobytes(), key
    assert sa["step"] == sb["step"]
    assert np.array_equal(va.grad_mean_avg, vb.grad_mean_avg) and np.array_equal(va.grad_sq_avg, vb.grad_sq_avg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("use_vgs", [False, True])
def test_world_sizes_agree(backend, dtype, use_vgs):
    layout = layout_of(dtype)
    member = MEMBER_PROFILES[0]
    one = sharded(layout, 1, None, member, use_vgs, backend)
    for world in (2, 4):
        assert_same(sharded(layout, world, inner_bounds(layout, world), member, use_vgs, backend), one)
    assert_same(sharded(layout, 3, None, member, use_vgs, backend), one)
    if backend == "numba":  # the kernels' single-process sums are the chunk partials in chunk order
        assert_same(single_run(layout, member, STEPS, use_vgs, backend), one)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("member", MEMBER_PROFILES[1:], ids=lambda m: "-".join(m))
def test_family_members(backend, member):
    layout = layout_of("float32")
    one = sharded(layout, 1, None, member, True, backend, steps=6)
    assert_same(sharded(layout, 4, inner_bounds(layout, 4), member, True, backend, steps=6), one)
    if backend == "numba":
        assert_same(single_run(layout, member, 6, True, backend), one)


def test_more_ranks_than_chunks():
    layout = FlatLayout([(10,), (4000,)], "float64")  # 3 chunks, 5 ranks: two ranks hold nothing
    member = MEMBER_PROFILES[0]
    assert_same(sharded(layout, 5, [0, 10, 2058, 2058, 4010, 4010], member, True, "numba"),
                sharded(layout, 1, None, member, True, "numba"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_at_another_world_size(backend):
    """Save (consolidate) at step 5 with 4 ranks, resume with 2 and with 1: the same bits as
    10 steps without a break."""
    layout, member = layout_of("float32"), MEMBER_PROFILES[0]
    straight = sharded(layout, 4, inner_bounds(layout, 4), member, True, backend, steps=10)
    saved = sharded(layout, 4, inner_bounds(layout, 4), member, True, backend, steps=5)
    for world in (2, 1):
        assert_same(sharded(layout, world, None, member, True, backend, steps=10, resume=saved), straight)


def test_combination_is_the_kernels_chunk_order():
    """Sums add the rows one by one from 0 in rank order; extrema and counts per segment."""
    layout = FlatLayout([(5000,), (3,)], "float64")
    rows = np.array([[1e16, 1, 0.5, 0.6, 1, 2, 0], [1.0, 1, -0.5, 0.1, 3, 1, 1], [-1e16, 1, 0.0, 0.2, 2, 5, 0],
                     [7.0, 2, 1.0, 1.0, 0, 0, 0]])
    combined = combine_chunk_partials(layout, [np.array([0, 0]), np.array([0, 1])], [rows[:2], rows[2:]])
    assert combined.grad_sum[0] == (1e16 + 1.0) + -1e16 == 0.0  # not the exact sum 1.0: the fixed order
    assert combined.grad_sum[1] == 7.0 and combined.nonfinite.tolist() == [1, 0]
    assert combined.utility_min.tolist() == [-0.5, 1.0] and combined.direction_max.tolist() == [5, 0]


def test_partials_messages_combine_to_the_same_bits():
    """A rank sends its two sums per chunk and the order-free columns once per segment
    (``specs/distributed.md`` §4): folded in the same order, the unpacked rows give the same
    bits as the full rows, NaN, signed zeros among the extrema and counts included."""
    layout = FlatLayout([(6000,), (3,), (5000,)], "float64")
    rows = np.array([[1e16, 1, 0.0, 0.6, 1, 2, 0], [1.0, 1, -0.0, 0.1, 3, np.nan, 1], [-1e16, 1, -0.5, 0.2, 2, 5, 0],
                     [7.0, 2, 1.0, 1.0, 0, 0, 0], [2.0, 4, np.inf, -np.inf, 0, 0, 0], [3.0, 9, -0.0, 0.0, 4, 1, 2]])
    parents = [np.array([0, 0]), np.array([0, 1, 2, 2])]
    messages = [pack_partials(rows[:2], parents[0]), pack_partials(rows[2:], parents[1])]
    assert [m.size for m in messages] == [2 * 2 + 5, 2 * 4 + 5 * 3] == [message_length(p) for p in parents]
    unpacked = [unpack_partials(m, p) for m, p in zip(messages, parents)]
    want = combine_chunk_partials(layout, parents, [rows[:2], rows[2:]])
    got = combine_chunk_partials(layout, parents, unpacked)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want))
    assert np.isnan(got.direction_max[0]) and np.signbit(got.utility_min[0]) == np.signbit(want.utility_min[0])
    assert unpacked[1][:, :2].tobytes() == rows[2:, :2].tobytes()  # the sums travel as they are
    with pytest.raises(ValueError, match="partials message of 8 values for 2 pieces"):
        unpack_partials(messages[0][:-1], parents[0])


def test_partition_checks():
    layout = layout_of("float32")
    with pytest.raises(ValueError, match="chunk boundary"):
        Partition(layout, 2, [0, 100, layout.num_logical])
    with pytest.raises(ValueError, match="must not decrease"):
        Partition(layout, 3, [0, 4096, 2048, layout.num_logical])
    with pytest.raises(ValueError, match="world_size"):
        Partition(layout, 0)
    even = Partition(layout, 4)
    assert even.bounds[0] == 0 and even.bounds[-1] == layout.num_logical


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_layout_draws_the_full_layouts_normals(backend):
    """``FlatLayout(logical_start=s)``: every backend's noise is the full layout's at those indices."""
    from upgd_ref.step import noise

    layout = layout_of("float32")
    full = noise(layout, 5, 3, backend=backend)
    for shard in Partition(layout, 4, inner_bounds(layout, 4)).shards:
        assert shard.local.to_dict().get("logical_start", 0) == shard.start == shard.local.logical_start
        assert FlatLayout.from_dict(shard.local.to_dict()) == shard.local
        assert shard.logical(noise(shard.local, 5, 3, backend=backend)).tobytes() == \
            shard.logical(shard.take(full)).tobytes()
    with pytest.raises(ValueError, match="logical_start"):
        FlatLayout([(3,)], logical_start=-1)


def test_bad_input_raises_before_anything_changes():
    """A wrong buffer, request or hyper-parameter raises naming it, before the all-gather:
    parameters and state unchanged."""
    from upgd_ref.sharding import ShardState, sharded_step
    from upgd_ref.step import StepRequest

    from .sharded_runs import inputs, request, start_params

    layout = layout_of("float32")
    partition = Partition(layout, 2, inner_bounds(layout, 2))
    shard = partition.shards[1]
    params, state = shard.take(start_params(layout)), ShardState.zeros(shard, 1.0)
    grads, present = inputs(layout, 1)
    good = request(layout, MEMBER_PROFILES[0], present)
    before = (params.copy(), {k: np.copy(v) for k, v in state.to_state(shard).items()})

    def never(values, lengths):
        raise AssertionError("the all-gather must not be reached")

    cases = [
        (dict(grads=shard.take(grads)[:-1]), ValueError, "grads must have shape"),
        (dict(grads=shard.take(grads).astype(np.float64)), TypeError, "grads has a dtype"),
        (dict(request=StepRequest(hyper=good.hyper[:2])), ValueError, "hyper"),
        (dict(request=StepRequest(hyper=[dict(good.hyper[0], lr=float("nan"))] * layout.num_segments)),
         ValueError, "lr"),
    ]
    for change, error, match in cases:
        args = dict(grads=shard.take(grads), request=good) | change
        with pytest.raises(error, match=match):
            sharded_step(partition, 1, params, args["grads"], state, args["request"], all_gather=never,
                         backend="reference")
        assert params.tobytes() == before[0].tobytes()
        assert all(np.array_equal(v, before[1][k]) for k, v in state.to_state(shard).items())


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nonfinite_gradient_on_one_rank_is_refused_by_every_rank(policy):
    """The refusal is decided on the combined reductions: every rank raises (or skips) the
    same step, and no rank changes anything."""
    from upgd_ref.checks import NonFiniteStepError
    from upgd_ref.sharding import ShardState, sharded_step
    from upgd_ref.step import StepRequest

    from .sharded_runs import inputs, request, start_params

    layout = layout_of("float64")
    partition = Partition(layout, 4, inner_bounds(layout, 4))
    grads, present = inputs(layout, 1)
    grads[layout.offsets[3] + 100] = np.inf  # in one rank's range only
    base = request(layout, MEMBER_PROFILES[0], present)
    req = StepRequest(hyper=base.hyper, present=present, seed=base.seed, variant=base.variant, nonfinite=policy)

    def body(rank, gather):
        shard = partition.shards[rank]
        params, state = shard.take(start_params(layout)), ShardState.zeros(shard, 1.0)
        before = params.copy()
        try:
            stats = sharded_step(partition, rank, params, shard.take(grads), state, req, all_gather=gather,
                                 backend="numba")
            outcome = ("skipped", bool(stats.skipped), state.skipped_steps)
        except NonFiniteStepError as exc:
            outcome = ("raised", exc.field, exc.segment)
        return outcome, params.tobytes() == before.tobytes(), state.step

    results = thread_world(partition, body)
    expected = ("skipped", True, 1) if policy == "skip" else ("raised", "elements", 3)
    assert results == [(expected, True, 0)] * 4
