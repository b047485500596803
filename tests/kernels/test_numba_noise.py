"""The Numba noise kernels are bit-identical to the NumPy definition (``upgd_ref.rng``).

Tolerance: 0 (``upgd_ref.tolerances``: normals are compared bit for bit), float32 and float64,
serial and parallel kernels, any thread count, any layout, seed and step, including Philox
counters whose low block word wraps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref import FlatLayout, rng
from upgd_ref.backends import BACKENDS
from upgd_ref.kernels import NumbaBackend
from upgd_ref.kernels import numba_noise, numba_step
from upgd_ref.kernels.numba_step import CHUNK, versioned_chunk_normals

SERIAL = NumbaBackend(parallel_min_size=2**62)
PARALLEL = NumbaBackend(parallel_min_size=0)
U64_MAX = 2**64 - 1

sizes = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]), st.integers(0, 300))
layouts = st.builds(
    lambda shapes, dtype: FlatLayout(shapes, dtype=dtype),
    st.lists(sizes.map(lambda n: (n,)), min_size=1, max_size=6),
    st.sampled_from(["float32", "float64"]),
)
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32, U64_MAX]))


def bits(array: np.ndarray) -> bytes:
    return array.tobytes()


def split(value: int) -> tuple[np.uint64, np.uint64]:
    """(low, high) 32-bit words as the kernels take them."""
    return np.uint64(value & 0xFFFFFFFF), np.uint64(value >> 32)


@settings(max_examples=40, deadline=None)
@given(layout=layouts, seed=u64, step=u64, out_dtype=st.sampled_from([None, "float32", "float64"]),
       backend=st.sampled_from([SERIAL, PARALLEL]))
def test_noise_is_bit_identical_to_the_reference(layout, seed, step, out_dtype, backend):
    got = backend.noise(layout=layout, seed=seed, step=step, dtype=out_dtype)
    want = rng.noise(layout, seed, step, out_dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert bits(got) == bits(want)  # padding zero included
    assert got.size == 0 or got.ctypes.data % 64 == 0


@settings(max_examples=25, deadline=None)
@given(first_block=st.one_of(st.sampled_from([2**32 - 3, 2**33 - 1, 2**62 - 8]), st.integers(0, 2**62 - 8)),
       num_blocks=st.integers(1, 8), seed=u64, step=u64, dtype=st.sampled_from([np.float32, np.float64]))
def test_blocks_at_huge_counters_match_the_reference(first_block, num_blocks, seed, step, dtype):
    """Counters whose low word wraps (block 2**32 - 1 -> 2**32), up to the last logical
    index 2**64 - 1: beyond any layout that fits in memory."""
    tile, words = np.empty(4 * num_blocks, dtype), np.empty(4 * num_blocks, np.uint32)
    numba_noise.fill_words(words, np.uint64(first_block), *split(step), *split(seed))  # the chunk tile's two loops
    numba_noise.fill_normals(tile, words)
    assert bits(tile) == bits(rng.standard_normals(seed, step, 4 * first_block, 4 * num_blocks, dtype=dtype))


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 2**40), count=st.integers(1, 3 * CHUNK), seed=u64, step=u64)
def test_chunk_tiles_start_at_any_lane(start, count, seed, step):
    tile, skip = versioned_chunk_normals(None, start, count, np.empty(0), *split(step), *split(seed))
    assert skip == start % 4 and tile.size % 4 == 0 and tile.size - 4 < skip + count <= tile.size
    assert bits(tile[skip : skip + count]) == bits(rng.standard_normals(seed, step, start, count))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")
def test_noise_is_identical_for_one_and_two_threads():
    layout = FlatLayout([(3 * CHUNK + 7,), (5,), (0,), (CHUNK - 2, 3)], dtype="float32")
    runs = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            runs.append(bits(PARALLEL.noise(layout=layout, seed=123, step=456)))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert runs[0] == runs[1] == bits(SERIAL.noise(layout=layout, seed=123, step=456))


def test_float32_noise_is_the_float64_noise_rounded_once():
    layout = FlatLayout([(CHUNK + 9,), (4, 4)], dtype="float64")
    wide = PARALLEL.noise(layout=layout, seed=5, step=6, dtype="float64")
    assert bits(PARALLEL.noise(layout=layout, seed=5, step=6, dtype="float32")) == bits(wide.astype(np.float32))


def test_auto_dispatch_uses_numba_and_matches_the_definition():
    assert "numba" in BACKENDS
    layout = FlatLayout([(7,), (2, 3)], dtype="float32")
    assert bits(upgd_ref.noise(layout, 9, 10)) == bits(rng.noise(layout, 9, 10))
    by_name = {name: bits(upgd_ref.noise(layout, 9, 10, backend=name)) for name in ("numba", "reference")}
    assert by_name["numba"] == by_name["reference"]
    opt = upgd_ref.AdaptiveUPGD(layout, seed=9, backend="numba")
    assert bits(opt.noise(10)) == bits(rng.noise(layout, 9, 10))


@pytest.mark.parametrize(("seed", "step", "dtype"), [
    (-1, 1, None), (2**64, 1, None), (1.5, 1, None), (True, 1, None), ("7", 1, None),
    (0, -1, None), (0, 2**64, None), (0, 2.0, None), (0, 1, "float16"), (0, 1, "int32"), (0, 1, "no-such-dtype"),
])
def test_bad_noise_arguments_raise_as_the_reference(seed, step, dtype):
    layout = FlatLayout([(3,)], dtype="float32")
    with pytest.raises(Exception) as reference_error:
        rng.noise(layout, seed, step, dtype)
    with pytest.raises(type(reference_error.value)) as numba_error:
        PARALLEL.noise(layout=layout, seed=seed, step=step, dtype=dtype)
    assert str(numba_error.value) == str(reference_error.value)


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("out_dtype", [None, "float64"])
def test_noise_into_a_given_buffer(backend, out_dtype):
    layout = FlatLayout([(5,), (0,), (CHUNK + 3,), (7, 3)], dtype="float32")
    want = rng.noise(layout, 4, 5, out_dtype)
    out = np.full(layout.size, 7.0, dtype=want.dtype)  # padding must come back 0
    assert upgd_ref.noise(layout, 4, 5, out_dtype, out=out, backend=backend) is out
    assert bits(out) == bits(want)


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize(("make_out", "seed", "exc"), [
    (lambda layout: np.zeros(3, np.float32), 0, ValueError),
    (lambda layout: layout.zeros(dtype="float64"), 0, TypeError),
    (lambda layout: list(layout.zeros()), 0, TypeError),
    (lambda layout: layout.zeros()[::-1], 0, ValueError),
    (lambda layout: np.frombuffer(layout.zeros().tobytes(), dtype=np.float32), 0, ValueError),
    (lambda layout: layout.zeros() + 7.0, -1, ValueError),
])
def test_bad_noise_output_raises_and_writes_nothing(backend, make_out, seed, exc):
    layout = FlatLayout([(5,), (3, 2)], dtype="float32")
    out = make_out(layout)
    before = bits(np.asarray(out))
    with pytest.raises(exc):
        upgd_ref.noise(layout, seed, 1, out=out, backend=backend)
    assert bits(np.asarray(out)) == before


def test_the_cached_kernels_record_the_noise_source_they_compile_in():
    """Numba's cache of the kernels in ``numba_step.py`` is keyed by that file's content only;
    ``NOISE_SOURCE_SHA256`` there ties it to ``numba_noise.py``, whose code they compile in."""
    digest = hashlib.sha256(Path(numba_noise.__file__).read_bytes()).hexdigest()
    assert numba_step.NOISE_SOURCE_SHA256 == digest, (
        f"numba_noise.py changed: set NOISE_SOURCE_SHA256 = {digest!r} in numba_step.py so that Numba "
        "recompiles the cached kernels")
