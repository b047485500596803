r"""``CudaBackend``: the stages of :class:`upgd_ref.backends.Backend` on the CUDA kernels.

One step is the same plan as the Numba backend's (``specs/kernels-cuda.md``, ``specs/step.md``):

1. validation: a count of non-finite elements per chunk and per segment, one small copy to
   the host (it must be known before anything is written);
2. pass 1 (``pass1_*``), read-only: the new ``u`` (and ``m``, ``v``) of ``f g`` in registers,
   per chunk ``sum g``, ``sum g^2``, ``min u``, ``max u``, ``max |p|``, ``max |d|`` and the
   non-finite count; ``segment_reduce`` combines them per segment in a fixed order, and the
   ``(S, 7)`` result goes to the host;
3. on the host, float64 per segment: the core's plan and finiteness checks
   (:mod:`upgd_ref.stages`, shared with every backend);
4. pass 2 (``pass2_*`` or ``family_pass2_*``): pass 1's values again (same bits), written
   with ``g <- f g``, and the update with the Philox normals generated in registers.

The kernels are launched by a *launcher*: :class:`CupyLauncher` (CuPy arrays on a GPU,
``backend="cupy"``) or :class:`~upgd_ref.kernels.cuda_emulator.EmulatorLauncher` (the same
source compiled for the CPU, NumPy arrays, ``backend="cuda-emulator"``). This module holds
no arithmetic of the step; the launch layer is all that differs between the two.
"""

from __future__ import annotations

import time

import numpy as np

from .. import reference as ref
from ..rng import check_noise_version
from ..layout import FlatLayout
from ..stages import SegmentReductions
from .chunk_abi import (
    NUM_PARTIALS, check_noise_request, chunk_table, family_mode, segment_chunk_offsets, split_u64, step_coefficients,
    update_tables, zero_padding,
)
from .cuda_source import KERNEL_SIGNATURES, THREADS, cached_cubin, checked_arguments, kernel_name

__all__ = ["CudaBackend", "CupyLauncher"]

_MAX_CACHED_LAYOUTS = 16  # device copies of chunk tables kept at once


class CupyLauncher:
    """Loads the CUDA source compiled by NVRTC with exactly the options of
    :data:`~upgd_ref.kernels.cuda_source.COMPILE_OPTIONS` for each device's architecture
    (:func:`~upgd_ref.kernels.cuda_source.cached_cubin`) and launches on CuPy's current stream.

    ``grid_limit``: most blocks per launch (default 32 per multiprocessor); kernels loop over
    their chunks, and results do not depend on it.
    """

    array_kind = "cupy"

    def __init__(self, grid_limit: int | None = None):
        self.grid_limit = grid_limit
        self._modules: dict[int, object] = {}

    @property
    def array_module(self):
        import cupy  # on first use: importing upgd_ref does not import CuPy

        return cupy

    def available(self) -> bool:
        """Whether CuPy sees a GPU."""
        return self.array_module.is_available()

    def _module(self):
        cupy = self.array_module
        device = cupy.cuda.Device()
        module = self._modules.get(device.id)
        if module is None:
            module = cupy.RawModule(path=str(cached_cubin(f"sm_{device.compute_capability}")))
            self._modules[device.id] = module
        return module, device

    def compile(self) -> None:
        """Compile (or load from CuPy's cache) every entry point for the current device."""
        module, _ = self._module()
        for name in KERNEL_SIGNATURES:
            module.get_function(name)

    def launch(self, name: str, items: int, *args) -> None:
        if items == 0:
            return
        module, device = self._module()

        def on_this_device(array):
            if array.device.id != device.id:
                raise ValueError(f"{name}: a buffer is on GPU {array.device.id}, the current device is GPU {device.id}")
            return array

        converted = checked_arguments(name, args, self.array_module.ndarray, on_this_device)
        limit = self.grid_limit or 32 * device.attributes["MultiProcessorCount"]
        module.get_function(name)((min(items, limit),), (THREADS,), tuple(converted))

    def to_host(self, array) -> np.ndarray:
        return self.array_module.asnumpy(array)


class CudaBackend:
    """The CUDA kernels behind :mod:`upgd_ref.backends` (float32 and float64 layouts).

    ``launcher``: a :class:`CupyLauncher` (buffers are CuPy arrays) or an
    :class:`~upgd_ref.kernels.cuda_emulator.EmulatorLauncher` (NumPy arrays). Device copies
    of a layout's tables are cached per layout.
    """

    def __init__(self, name: str, launcher):
        self.name = name
        self.launcher = launcher
        self._tables: dict = {}

    def __repr__(self) -> str:
        return f"CudaBackend({self.name!r}, {type(self.launcher).__name__})"

    @property
    def array_module(self):
        return self.launcher.array_module

    @property
    def array_kind(self) -> str:
        return self.launcher.array_kind

    def available(self) -> bool:
        """Whether the kernels can run here (a GPU for CuPy, a C++ compiler for the emulator)."""
        return self.launcher.available()

    def _device(self, host: np.ndarray):
        return self.array_module.ascontiguousarray(self.array_module.asarray(host))

    def _chunks(self, layout: FlatLayout):
        """``(chunk table, segment chunk offsets)`` on the device, built once per layout (and device)."""
        xp = self.array_module
        device = xp.cuda.Device().id if hasattr(xp, "cuda") else None
        key = (layout.offsets, layout.noise_offsets, layout.sizes, device)
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= _MAX_CACHED_LAYOUTS:
                self._tables.clear()
            tables = (self._device(np.ascontiguousarray(chunk_table(layout))),
                      self._device(segment_chunk_offsets(layout)))
            self._tables[key] = tables
        return tables

    def _flags(self, present):
        return self._device(np.asarray(present, dtype=np.bool_))

    def _segment_partials(self, layout, flags, partial) -> np.ndarray:
        """Per-segment ``(sum, sum_sq, min, max)`` of the chunk partials, on the host."""
        _, segment_chunks = self._chunks(layout)
        out = self.array_module.empty((layout.num_segments, NUM_PARTIALS), dtype=np.float64)
        self.launcher.launch("segment_reduce", layout.num_segments, partial, segment_chunks, flags,
                             layout.num_segments, out)
        return SegmentReductions.from_columns(self.launcher.to_host(out))

    def _new_partial(self, chunks):
        return self.array_module.empty((chunks.shape[0], NUM_PARTIALS), dtype=np.float64)  # every row is written

    # --- noise --------------------------------------------------------------------------

    def noise(self, *, layout, seed, step, dtype=None, out=None, noise_version=1):
        """As :func:`upgd_ref.rng.noise`, bit for bit, into ``out`` (a checked buffer) or a new
        device buffer; padding set to 0."""
        dtype, seed, step = check_noise_request(layout, dtype, seed, step)
        noise_version = check_noise_version(noise_version)
        if out is None:
            out = self.array_module.zeros(layout.size, dtype=dtype)
        else:
            zero_padding(layout, out)
        chunks, _ = self._chunks(layout)
        self.launcher.launch(kernel_name("noise", dtype), chunks.shape[0], out, chunks, chunks.shape[0],
                             *split_u64(step), *split_u64(seed), noise_version)
        return out

    # --- local reductions ---------------------------------------------------------------

    def nonfinite_counts(self, *, layout, buffer, present) -> np.ndarray:
        """Per-segment count of NaN and Inf elements of the present segments: a count on the
        device, one small copy to the host."""
        chunks, _ = self._chunks(layout)
        flags = self._flags(present)
        partial = self._new_partial(chunks)
        self.launcher.launch(kernel_name("nonfinite", layout.dtype), chunks.shape[0], buffer, chunks, flags,
                             chunks.shape[0], partial)
        return self._segment_partials(layout, flags, partial).grad_sum.astype(np.int64)

    def gradient_sums(self, *, layout, grads, present) -> SegmentReductions:
        chunks, _ = self._chunks(layout)
        flags = self._flags(present)
        partial = self._new_partial(chunks)
        self.launcher.launch(kernel_name("moments", layout.dtype), chunks.shape[0], grads, chunks, flags,
                             chunks.shape[0], partial)
        sums = self._segment_partials(layout, flags, partial)
        return sums._replace(utility_min=np.full(layout.num_segments, np.inf),
                             utility_max=np.full(layout.num_segments, -np.inf))

    # --- element-wise -------------------------------------------------------------------

    def scale(self, *, layout, grads, factor, present) -> None:
        chunks, _ = self._chunks(layout)
        self.launcher.launch(kernel_name("scale", layout.dtype), chunks.shape[0], grads, chunks,
                             self._flags(present), chunks.shape[0], layout.dtype.type(factor))

    def first_pass(self, *, layout, params, grads, state, present, hyper, vgs_factor, variant) -> SegmentReductions:
        dtype = layout.dtype
        chunks, _ = self._chunks(layout)
        num_chunks = chunks.shape[0]
        flags = self._flags(present)
        t = state.segment_step + np.asarray(present, dtype=np.int64)
        coefficients = self._device(step_coefficients(hyper, t, np.zeros(layout.num_segments), dtype,
                                                      variant.update_factor))
        partial = self._new_partial(chunks)
        self.launcher.launch(kernel_name("pass1", dtype), num_chunks, grads, params, state.utility,
                             state.first_moment, state.second_moment, chunks, flags, coefficients, num_chunks,
                             dtype.type(vgs_factor), int(variant.moments == "adam"), partial)
        return self._segment_partials(layout, flags, partial)

    def second_pass(self, *, layout, params, grads, state, present, hyper, plan, seed, variant,
                    vgs_factor=1.0, noise_version=1) -> None:
        dtype = layout.dtype
        chunks, _ = self._chunks(layout)
        num_chunks = chunks.shape[0]
        flags = self._flags(present)
        coefficients, inv_range = update_tables(plan, hyper, dtype, variant)
        coefficients = self._device(coefficients)
        words = (*split_u64(plan.step), *split_u64(seed), check_noise_version(noise_version))
        factor = dtype.type(vgs_factor)
        common = (params, grads, state.utility, state.first_moment, state.second_moment, chunks, flags, coefficients,
                  num_chunks, factor, int(factor != 1), plan.utility_min, inv_range)
        if variant == ref.PRODUCTION:
            self.launcher.launch(kernel_name("pass2", dtype), num_chunks, *common, *words)
        else:
            self.launcher.launch(kernel_name("family_pass2", dtype), num_chunks, *common, plan.utility_max,
                                 family_mode(variant), *words)

    # --- compilation --------------------------------------------------------------------

    def warmup(self, dtypes=("float32", "float64")) -> float:
        """Compile (or load) every entry point; returns the seconds it took."""
        start = time.perf_counter()
        self.launcher.compile()
        return time.perf_counter() - start
