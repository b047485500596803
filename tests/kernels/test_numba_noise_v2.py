"""Noise format 2 in the kernels: the Numba generator (serial, parallel, any thread count) and
the CUDA source on its CPU emulator are bit-identical to :mod:`upgd_ref.rng_v2`
(``specs/noise-v2.md``); the Numba transform holds no fused multiply-add; format-1 kernels
neither compile nor contain format-2 code.

Tolerance: 0 (normals are compared bit for bit).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref import FlatLayout, rng, rng_v2
from upgd_ref.kernels import NumbaBackend, numba_noise, numba_noise_v2, numba_step
from upgd_ref.kernels.chunk_abi import CHUNK

SERIAL = NumbaBackend(parallel_min_size=2**62)
PARALLEL = NumbaBackend(parallel_min_size=0)

sizes = st.one_of(st.sampled_from([0, 1, 3, 4, 5, CHUNK - 1, CHUNK + 1]), st.integers(0, 300))
layouts = st.builds(lambda shapes, dtype: FlatLayout(shapes, dtype=dtype),
                    st.lists(sizes.map(lambda n: (n,)), min_size=1, max_size=5), st.sampled_from(["float32", "float64"]))
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**32 - 1, 2**32, 2**64 - 1]))


def _words():
    """Edge words (0, 2**32 - 1, the top-bit and octant boundaries, the exact-conversion limits)
    in both positions of a pair, then a million random words."""
    octants = [o * 2**29 + d for o in range(8) for d in (-1, 0, 1) if 0 <= o * 2**29 + d < 2**32]
    edges = [0, 1, 2**23 - 1, 2**23, 2**24 + 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1] + octants
    pairs = [(a, b) for a in edges for b in edges]
    random = np.random.default_rng(7).integers(0, 2**32, 2**20, dtype=np.uint64)
    return np.concatenate([np.asarray(pairs, dtype=np.uint64).reshape(-1), random]).astype(np.uint32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transform_on_edge_and_random_words_is_the_reference(dtype):
    words = _words()
    words = words[: words.size - words.size % 4]
    expected = rng_v2.normals_from_words(np, *(words[k::4] for k in range(4))).reshape(-1)
    tile = np.empty(words.size, dtype)
    numba_noise_v2.fill_normals(tile, words)
    assert np.array_equal(tile, expected.astype(dtype))  # float64 tiles hold the float32 normals exactly
    assert tile.astype(np.float32).tobytes() == expected.tobytes()


@settings(max_examples=15, deadline=None)
@given(layout=layouts, seed=u64, step=u64, backend=st.sampled_from([SERIAL, PARALLEL]))
def test_noise_is_bit_identical_to_the_reference(layout, seed, step, backend):
    got = backend.noise(layout=layout, seed=seed, step=step, noise_version=2)
    assert got.tobytes() == rng.noise(layout, seed, step, version=2).tobytes()


@pytest.mark.parametrize("seed,step,start", [(2**64 - 1, 2**40 + 3, 2**34 - 5), (5, 2**32 + 1, 2**32 * 4 - 3)])
def test_counters_whose_low_block_word_wraps(seed, step, start):
    tile, skip = numba_noise_v2.versioned_chunk_normals(True, start, 4000, np.empty(0, np.float32),
                                                        np.uint64(step & 0xFFFFFFFF), np.uint64(step >> 32),
                                                        np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32))
    expected = rng.standard_normals(seed, step, start, 4000, dtype=np.float32, version=2)
    assert tile[skip:skip + 4000].tobytes() == expected.tobytes()


def test_one_and_two_threads_and_serial_agree():
    layout = FlatLayout([(300_001,), (7, 9)], dtype="float32")
    results = [SERIAL.noise(layout=layout, seed=3, step=11, noise_version=2)]
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        results.append(PARALLEL.noise(layout=layout, seed=3, step=11, noise_version=2))
    assert all(r.tobytes() == results[0].tobytes() for r in results)


def test_the_cuda_emulator_draws_format_2():
    layout = FlatLayout([(1001,), (0,), (3, 7), (2 * CHUNK + 5,)], dtype="float32")
    for dtype in ("float32", "float64"):
        got = upgd_ref.noise(layout, 2**64 - 1, 2**40 + 3, dtype, backend="cuda-emulator", noise_version=2)
        assert got.tobytes() == rng.noise(layout, 2**64 - 1, 2**40 + 3, dtype, version=2).tobytes()


def test_steps_in_format_2_match_between_numba_and_the_cuda_emulator():
    layout = FlatLayout([(3000,), (5, 7), (4097,)], dtype="float32")
    results = {}
    for name in ("numba", "cuda-emulator"):
        data = np.random.default_rng(1)
        opt = upgd_ref.AdaptiveUPGD(layout, adaptive_noise=True, sigma=0.1, lr=0.01, backend=name, seed=3,
                                    noise_version=2)
        params = layout.zeros()
        params[...] = data.standard_normal(layout.size)
        for _ in range(3):
            grads = layout.zeros()
            grads[...] = 0.1 * data.standard_normal(layout.size)
            opt.step(params, grads)
        results[name] = params
    assert results["numba"].tobytes() == results["cuda-emulator"].tobytes()
    format_1 = upgd_ref.AdaptiveUPGD(layout, seed=3).noise()
    assert not np.array_equal(format_1, upgd_ref.AdaptiveUPGD(layout, seed=3, noise_version=2).noise())


def test_the_transform_has_no_fused_multiply_add_and_uses_512_bit_vectors():
    for function in (numba_noise_v2.fill_normals, numba_noise.fill_words):  # the Philox words of both formats
        for asm in function.inspect_asm().values():
            assert not re.search(r"\bv?f(n)?m(add|sub)", asm), function
            if "+avx512f" in _host_features():
                assert "zmm" in asm


def _host_features() -> str:
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_features().flatten()


def test_format_1_kernels_compile_no_format_2_code():
    """The format-1 kernels take ``noise_v2=None``: Numba prunes the format-2 branch, so a
    default step compiles the same specialisations as before format 2, without its code."""
    layout = FlatLayout([(10,)], dtype="float32")
    SERIAL.noise(layout=layout, seed=0, step=1)
    assert any(signature[-1] == numba.types.none for signature in numba_step.noise_chunks.signatures)
    args = (5, 10, np.empty(0, np.float32), *(np.uint64(k) for k in (1, 0, 3, 0)))
    numba_noise_v2.versioned_chunk_normals(None, *args)
    numba_noise_v2.versioned_chunk_normals(True, *args)
    code = {signature[0]: ir for signature, ir in numba_noise_v2.versioned_chunk_normals.inspect_llvm().items()}
    assert "numba_noise_v212fill_normals" not in code[numba.types.none]  # mangled name of format 2's fill_normals
    assert "numba_noise12fill_normals" in code[numba.types.none]
    assert "numba_noise_v212fill_normals" in code[numba.types.boolean]


def test_the_cached_kernels_record_the_format_2_source_they_compile_in():
    digest = hashlib.sha256(Path(numba_noise_v2.__file__).read_bytes()).hexdigest()
    assert numba_step.NOISE_V2_SOURCE_SHA256 == digest, (
        f"numba_noise_v2.py changed: set NOISE_V2_SOURCE_SHA256 = {digest!r} in numba_step.py so that Numba "
        "recompiles the cached kernels")
