"""The CUDA kernels' source run on the CPU (``backend="cuda-emulator"``, ``specs/kernels-cuda.md``).

The emulator compiles ``upgd_step.cu`` with the host C++ compiler; it computes what the GPU
computes (same expressions, no contraction, the reductions' fixed order). Here: the noise is
bit-identical to the definition, the reductions follow the order the spec writes down, and
every member of the family stays within the tolerance contract in lockstep against the
reference. The generic tests (bad input, properties, golden vectors) run it too, as one of
the registered NumPy backends.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref.backends import BACKENDS, auto_order, select_backend
from upgd_ref.kernels.cuda_backend import CudaBackend, CupyLauncher
from upgd_ref.kernels.cuda_emulator import host_compiler
from upgd_ref.kernels.cuda_source import THREADS
from upgd_ref.kernels.chunk_abi import CHUNK, NUM_PARTIALS, chunk_table
from upgd_ref.rng import noise as reference_noise

from tests.helpers.lockstep import cases, run_member_case
from tests.helpers.members import MEMBER_IDS

if host_compiler() is None:
    raise RuntimeError("the CUDA emulator needs a C++ compiler ($CXX, c++, g++ or clang++ on PATH; README, Install)")

WARP = 32


@pytest.fixture(scope="module")
def emulator():
    return BACKENDS["cuda-emulator"]


def test_registered_for_numpy_and_never_chosen_by_auto(emulator):
    assert emulator.array_kind == "numpy" and "cuda-emulator" not in auto_order()
    for dtype in (np.float32, np.float64):
        assert select_backend("auto", np.zeros(3, dtype=dtype)) is not emulator
    assert select_backend("cuda-emulator", np.zeros(3, dtype=np.float32)) is emulator


def test_the_cupy_backend_refuses_numpy_buffers(monkeypatch):
    """Refused before anything runs (no GPU needed): the backend is named, the buffers are NumPy."""
    monkeypatch.setitem(BACKENDS, "cupy", CudaBackend("cupy", CupyLauncher()))
    layout = upgd_ref.FlatLayout([(3,)], dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, backend="cupy")
    params, grads = layout.zeros(), layout.zeros()
    with pytest.raises(TypeError, match="backend 'cupy' takes cupy arrays, got a numpy array"):
        opt.step(params, grads)
    assert opt.state.step == 0


sizes = st.lists(st.one_of(st.integers(0, 2 * CHUNK + 9), st.sampled_from([0, 1, 3, CHUNK - 1, CHUNK + 1])),
                 min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes, dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**64 - 1),
       step=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**64 - 1])))
def test_noise_is_bit_identical_to_the_definition(emulator, sizes, dtype, seed, step):
    layout = upgd_ref.FlatLayout([(n,) for n in sizes], dtype=dtype)
    expected = reference_noise(layout, seed, step)
    out = layout.zeros()
    out[...] = np.nan  # padding must come back as 0
    got = upgd_ref.noise(layout, seed, step, out=out, backend="cuda-emulator")
    assert got is out and expected.tobytes() == out.tobytes()
    assert emulator.noise(layout=layout, seed=seed, step=step).tobytes() == expected.tobytes()


def _tree(values: list) -> float:
    """specs/kernels-cuda.md §2: per warp offsets 16..1, then over the warp heads."""
    values = list(values)
    for warp in range(THREADS // WARP):
        w = warp * WARP
        offset = WARP // 2
        while offset:
            for lane in range(offset):
                values[w + lane] = values[w + lane] + values[w + lane + offset]
            offset //= 2
    offset = THREADS // WARP // 2
    while offset:
        for head in range(offset):
            values[head * WARP] = values[head * WARP] + values[(head + offset) * WARP]
        offset //= 2
    return values[0]


def _chunk_sums(x: np.ndarray) -> tuple[float, float]:
    """The spec's order for one chunk: thread ``tid`` adds elements ``tid, tid + 256, ...`` in
    turn, from 0.0; then :func:`_tree`."""
    sums, squares = [0.0] * THREADS, [0.0] * THREADS
    for tid in range(THREADS):
        for j in range(tid, x.size, THREADS):
            w = float(x[j])
            sums[tid] = sums[tid] + w
            squares[tid] = squares[tid] + w * w
    return _tree(sums), _tree(squares)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_chunk_sums_follow_the_documented_order(emulator, dtype):
    """Bit for bit, with values spread over 40 binades so that any other order would differ."""
    layout = upgd_ref.FlatLayout([(CHUNK + 700,), (5,), (0,), (300,)], dtype=dtype)
    data = np.random.default_rng(5)
    grads = layout.pack([data.standard_normal(s) * 2.0 ** data.integers(-20, 20, s) for s in layout.shapes])
    table = chunk_table(layout)
    partial = np.zeros((table.shape[0], NUM_PARTIALS))
    present = np.ones(layout.num_segments, dtype=np.bool_)
    emulator.launcher.launch(f"moments_{'f32' if dtype == 'float32' else 'f64'}", table.shape[0], grads,
                             np.ascontiguousarray(table), present, table.shape[0], partial)
    for c, (_, start, length, _) in enumerate(table):
        expected = _chunk_sums(grads[start : start + length])
        assert (partial[c, 0], partial[c, 1]) == expected, c
    # per segment: thread tid adds chunk partials tid, tid + 256, ... (here one per thread), then the tree
    offsets = np.concatenate([[0], np.cumsum(-(-np.asarray(layout.sizes) // CHUNK))])
    out = emulator.gradient_sums(layout=layout, grads=grads, present=present)  # the same kernels, then the tree
    for i in range(layout.num_segments):
        rows = partial[offsets[i] : offsets[i + 1], 0].tolist()
        assert out.grad_sum[i] == _tree(rows + [0.0] * (THREADS - len(rows))), i


@pytest.mark.parametrize("member", MEMBER_IDS)
@settings(max_examples=12, deadline=None)
@given(case=cases())
def test_every_member_is_within_the_contract(member, case):
    worst = run_member_case(member, case, backend="cuda-emulator")
    assert all(v <= 1.0 for v in worst.values()), worst


def test_float32_step_matches_the_numba_kernels_element_for_element():
    """Same element-wise expressions as the Numba kernels: with equal per-segment scalars the
    parameters and state agree bit for bit (here the sums agree too: float64 sums of float32)."""
    layout = upgd_ref.FlatLayout([(3000,), (0,), (5, 7), (1,), (4097,)], dtype="float32")
    results = {}
    for name in ("numba", "cuda-emulator"):
        data = np.random.default_rng(1)
        opt = upgd_ref.AdaptiveUPGD(layout, adaptive_noise=True, sigma=0.1, lr=0.01, backend=name, seed=3)
        vgs = upgd_ref.VarianceGradientScaler(layout, backend=name, warmup_steps=0)
        params = layout.zeros()
        params[...] = data.standard_normal(layout.size)
        for s in range(4):
            grads = layout.zeros()
            grads[...] = 0.1 * data.standard_normal(layout.size)
            opt.step(params, grads, [True, True, s % 2 == 0, True, True], vgs=vgs)
        results[name] = [params, opt.state.utility, opt.state.first_moment, opt.state.second_moment]
    for a, b in zip(results["numba"], results["cuda-emulator"]):
        assert a.tobytes() == b.tobytes()
