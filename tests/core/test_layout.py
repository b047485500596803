"""FlatLayout: alignment, padding, pack/unpack, groups."""

from __future__ import annotations

import math

import array_api_strict as xps
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref.layout import ALIGNMENT_BYTES

shapes_strategy = st.lists(st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(shapes=shapes_strategy, dtype=st.sampled_from(["float32", "float64"]))
def test_segments_are_aligned_contiguous_and_padded_with_zeros(shapes, dtype):
    layout = upgd_ref.FlatLayout(shapes, dtype=dtype)
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]
    flat = layout.pack(arrays)
    assert flat.size == 0 or flat.ctypes.data % ALIGNMENT_BYTES == 0  # an empty buffer has no address
    assert flat.dtype == np.dtype(dtype)
    assert flat.shape == (layout.size,) and layout.size % (ALIGNMENT_BYTES // itemsize) == 0
    assert layout.num_logical == sum(math.prod(s) for s in shapes)
    covered = np.zeros(layout.size, bool)
    for i, (shape, view) in enumerate(zip(shapes, layout.unpack(flat))):
        assert (layout.offsets[i] * itemsize) % ALIGNMENT_BYTES == 0
        assert layout.logical_offsets[i] == sum(math.prod(s) for s in shapes[:i])
        assert view.shape == shape
        assert view.size == 0 or np.shares_memory(view, flat)
        np.testing.assert_array_equal(view, arrays[i].astype(dtype))
        covered[layout.segment_slice(i)] = True
    assert np.all(flat[~covered] == 0)


def test_unpack_gives_writable_views():
    layout = upgd_ref.FlatLayout([(2, 3), (4,)], dtype="float64")
    flat = layout.zeros()
    a, b = layout.unpack(flat)
    a[1, 2] = 5.0
    b[...] = 1.0
    assert flat[layout.offsets[0] + 5] == 5.0 and np.all(flat[layout.segment_slice(1)] == 1.0)


def test_pack_of_other_array_types_keeps_the_type():
    layout = upgd_ref.FlatLayout([(3,), (0,), (2, 2)], dtype="float32")
    arrays = [xps.asarray(np.arange(3.0)), xps.asarray(np.zeros(0)), xps.asarray(np.ones((2, 2)))]
    flat = layout.pack(arrays)
    assert type(flat) is type(arrays[0]) and flat.dtype == xps.float32 and flat.shape == (layout.size,)
    np.testing.assert_array_equal(np.asarray(flat), layout.pack([np.asarray(a) for a in arrays]))


def test_groups_accept_ids_or_member_lists():
    by_ids = upgd_ref.FlatLayout([(1,), (2,), (3,)], groups=[1, 0, 1])
    by_lists = upgd_ref.FlatLayout([(1,), (2,), (3,)], groups=[[1], [0, 2]])
    assert by_ids.groups == by_lists.groups == (1, 0, 1)
    assert by_ids == by_lists and upgd_ref.FlatLayout.from_dict(by_ids.to_dict()) == by_ids


@pytest.mark.parametrize("kwargs,error", [
    (dict(shapes=[]), ValueError),
    (dict(shapes=[(2,)], dtype="int32"), TypeError),
    (dict(shapes=[(2,)], dtype="complex64"), TypeError),
    (dict(shapes=[(-1,)]), ValueError),
    (dict(shapes=[(1.5,)]), ValueError),
    (dict(shapes=[(2,), (3,)], groups=[0]), ValueError),
    (dict(shapes=[(2,), (3,)], groups=[[0, 1], [1]]), ValueError),
    (dict(shapes=[(2,), (3,)], groups=[[0]]), ValueError),
    (dict(shapes=[(2,)], groups=[[5]]), ValueError),
])
def test_invalid_layouts_are_rejected(kwargs, error):
    with pytest.raises(error):
        upgd_ref.FlatLayout(**kwargs)


def test_pack_and_unpack_reject_mismatches():
    layout = upgd_ref.FlatLayout([(2, 2), (3,)])
    with pytest.raises(ValueError, match="segment 1"):
        layout.pack([np.zeros((2, 2)), np.zeros(4)])
    with pytest.raises(ValueError, match="3 arrays for 2 segments"):
        layout.pack([np.zeros((2, 2)), np.zeros(3), np.zeros(1)])
    with pytest.raises(TypeError, match="segment 0"):
        layout.pack([np.zeros((2, 2), dtype=np.int64), np.zeros(3)])
    with pytest.raises(ValueError, match="shape"):
        layout.unpack(np.zeros(layout.size + 1, dtype=np.float32))
