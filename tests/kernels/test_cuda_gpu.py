"""The CUDA kernels on a GPU (``backend="cupy"``, ``specs/kernels-cuda.md``). Marked ``gpu``;
skipped where CuPy sees no GPU (as in CI). Run on a GPU machine with::

    python -m pytest -m gpu tests/kernels/test_cuda_gpu.py -v

Checked here: the noise is bit-identical to the CPU definition; every step is bit-identical
to the CUDA emulator (same source, same reduction order; the paper's "max" protection,
which calls CUDA's exp, is held to the contract instead); every golden case passes the
tolerance contract on the GPU; the launch configuration does not change a bit; bad input
leaves everything unchanged; torch CUDA tensors and JAX GPU arrays reach the kernels
through DLPack without host copies.
"""

from __future__ import annotations

import cupy
import jax
import numpy as np
import pytest
import torch

import upgd_ref
from upgd_ref.backends import BACKENDS
from upgd_ref.golden import compare, format_comparison, load_case, load_manifest, replay
from upgd_ref.kernels.cuda_backend import CudaBackend, CupyLauncher
from upgd_ref.kernels.chunk_abi import CHUNK
from upgd_ref.rng import noise as reference_noise

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cupy.is_available(), reason="no CUDA GPU")]

MEMBERS = {
    "adaptive": dict(cls=upgd_ref.AdaptiveUPGD),
    "upgd": dict(cls=upgd_ref.UPGD),
    "upgdw": dict(cls=upgd_ref.UPGDW),
    "adaptive_paper": dict(cls=upgd_ref.AdaptiveUPGD, profile="paper"),
    "upgd_paper": dict(cls=upgd_ref.UPGD, profile="paper"),
}
SHAPES = [(3, CHUNK + 1), (0,), (7,), (2 * CHUNK - 3,), (1,), (5000,)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed, step", [(0, 1), (7, 2**32 - 1), (7, 2**32), (2**64 - 1, 2**64 - 1), (123, 99)])
def test_noise_is_bit_identical_to_the_cpu(dtype, seed, step):
    layout = upgd_ref.FlatLayout(SHAPES, dtype=dtype)
    out = cupy.full(layout.size, np.nan, dtype=layout.dtype)
    got = upgd_ref.noise(layout, seed, step, out=out)
    assert got is out
    assert cupy.asnumpy(out).tobytes() == reference_noise(layout, seed, step).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_noise_of_a_large_layout_matches_the_numba_kernels(dtype):
    layout = upgd_ref.FlatLayout([(30_000_001,), (4097,), (17, 1000)], dtype=dtype)
    gpu = upgd_ref.noise(layout, 5, 3, backend="cupy")
    assert cupy.asnumpy(gpu).tobytes() == upgd_ref.noise(layout, 5, 3, backend="numba").tobytes()


def _run(member, backend, dtype, steps=6, vgs=True):
    """Params, state and step infos after ``steps`` steps with frozen segments and groups."""
    layout = upgd_ref.FlatLayout(SHAPES, dtype=dtype)
    spec = dict(MEMBERS[member])
    cls = spec.pop("cls")
    groups = [{"segments": [0, 1, 2], "lr": 0.05}, {"segments": [3, 4, 5], "lr": 0.01, "weight_decay": 0.01}]
    opt = cls(layout, seed=11, backend=backend, param_groups=groups, adaptive_noise=True, sigma=0.05, **spec)
    scaler = upgd_ref.VarianceGradientScaler(layout, warmup_steps=2, backend=backend) if vgs else None
    data = np.random.default_rng(3)
    host_params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    params = cupy.asarray(host_params) if backend == "cupy" else host_params
    infos = []
    for k in range(steps):
        host = layout.pack([0.1 * data.standard_normal(s) for s in layout.shapes])
        grads = cupy.asarray(host) if backend == "cupy" else host
        present = [True, True, k % 3 != 1, True, k % 2 == 0, True]
        infos.append(opt.step(params, grads, present, vgs=scaler))
    buffers = [params, opt.state.utility, opt.state.first_moment, opt.state.second_moment]
    return [upgd_ref.arrays.to_numpy(b) for b in buffers], infos


@pytest.mark.parametrize("member", ["adaptive", "upgd", "upgdw"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("vgs", [True, False])
def test_steps_are_bit_identical_to_the_emulator(member, dtype, vgs):
    gpu, gpu_infos = _run(member, "cupy", dtype, vgs=vgs)
    cpu, cpu_infos = _run(member, "cuda-emulator", dtype, vgs=vgs)
    for a, b in zip(gpu, cpu):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(gpu_infos, cpu_infos):
        assert a.grad_norm.tobytes() == b.grad_norm.tobytes() and a.noise_std.tobytes() == b.noise_std.tobytes()
        assert (a.utility_min, a.utility_max) == (b.utility_min, b.utility_max)
        assert np.float64(a.vgs_factor).tobytes() == np.float64(b.vgs_factor).tobytes()  # NaN without a scaler


@pytest.mark.parametrize("entry", load_manifest()["cases"], ids=lambda e: e["name"])
@pytest.mark.parametrize("fused", [True, False])
def test_every_golden_case_passes_the_contract_on_the_gpu(entry, fused):
    case = load_case(entry["name"])
    if not fused and case.vgs is None:
        pytest.skip("no scaler: one path only")
    result = compare(case, replay(case, "cupy", fused=fused))
    assert result.passed, format_comparison(result)


def test_launch_configuration_does_not_change_a_bit(monkeypatch):
    results = []
    for limit in (1, 3, None):
        monkeypatch.setitem(BACKENDS, "cupy", CudaBackend("cupy", CupyLauncher(grid_limit=limit)))
        results.append(_run("adaptive", "cupy", "float32")[0])
    for other in results[1:]:
        assert all(a.tobytes() == b.tobytes() for a, b in zip(results[0], other))


def test_bad_input_leaves_everything_unchanged():
    layout = upgd_ref.FlatLayout(SHAPES, dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, backend="cupy")
    params = cupy.ones(layout.size, dtype=np.float32)
    grads = cupy.full(layout.size, 0.5, dtype=np.float32)
    opt.step(params, grads)
    before = [cupy.asnumpy(b).tobytes() for b in (params, opt.state.utility, opt.state.first_moment)]
    grads[layout.offsets[3] + 5] = np.nan
    with pytest.raises(ValueError, match=r"grads: segment 3 holds a non-finite value \(element 5: nan\)"):
        opt.step(params, grads)
    with pytest.raises(ValueError, match="both must be on one device"):
        opt.step(params, cupy.asnumpy(grads))
    with pytest.raises(ValueError, match="share memory"):
        opt.step(params, params)
    after = [cupy.asnumpy(b).tobytes() for b in (params, opt.state.utility, opt.state.first_moment)]
    assert before == after and opt.state.step == 1


def test_state_follows_the_parameters_and_checkpoints_stay_portable():
    layout = upgd_ref.FlatLayout(SHAPES, dtype="float64")
    gpu = upgd_ref.AdaptiveUPGD(layout, backend="cupy", seed=4)
    params = cupy.ones(layout.size)
    gpu.step(params, cupy.full(layout.size, 0.25))
    assert isinstance(gpu.state.utility, cupy.ndarray)
    saved = gpu.state_dict()
    assert isinstance(saved["state"]["utility"], np.ndarray)
    cpu = upgd_ref.AdaptiveUPGD(layout, backend="cuda-emulator", seed=4)
    cpu.load_state_dict(saved)
    host_params = cupy.asnumpy(params)
    gpu.step(params, cupy.full(layout.size, 0.5))
    cpu.step(host_params, np.full(layout.size, 0.5))
    assert cupy.asnumpy(params).tobytes() == host_params.tobytes()


def test_torch_cuda_tensors_run_on_the_gpu_without_host_copies():
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from upgd_ref.adapters.torch import AdaptiveUPGD

    model = torch.nn.Linear(300, 7).cuda()
    opt = AdaptiveUPGD(model.parameters(), lr=1e-2, adaptive_noise=True, seed=1)
    pointers = [p.data_ptr() for p in model.parameters()]
    bucket = opt._partition.buckets[0]
    assert bucket.param_flat.data.ptr == bucket.param_views[0].data_ptr()  # a CuPy view of the torch buffer
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 300, device="cuda")).square().sum().backward()
        opt.step()
    assert [p.data_ptr() for p in model.parameters()] == pointers and all(p.is_cuda for p in model.parameters())
    assert isinstance(opt.flat_state.utility, cupy.ndarray)  # the optimizer's own state record
    state = opt.state[model.weight]["avg_utility"]
    assert state.is_cuda and state.data_ptr() == opt.flat_state.utility.data.ptr


def test_jax_gpu_arrays_share_memory_with_cupy():
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX without a GPU")
    x = jax.device_put(jax.numpy.arange(1024, dtype=jax.numpy.float32), gpu)
    view = cupy.from_dlpack(x)
    assert view.data.ptr == x.unsafe_buffer_pointer()
    from upgd_ref.adapters.jax import adaptive_upgd

    params = {"w": jax.device_put(jax.numpy.ones((64, 3), dtype=jax.numpy.float32), gpu)}
    grads = {"w": jax.device_put(jax.numpy.full((64, 3), 0.1, dtype=jax.numpy.float32), gpu)}
    tx = adaptive_upgd(1e-2, seed=3, backend="kernels")
    updates, _ = tx.update(grads, tx.init(params), params)
    assert next(iter(updates["w"].devices())).platform in ("gpu", "cuda")
