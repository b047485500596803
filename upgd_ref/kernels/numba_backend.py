r"""``NumbaBackend``: the flat-buffer operations of :mod:`upgd_ref.backends` on Numba kernels.

One AdaptiveUPGD step (optionally fused with the VGS scale and update) is two kernel
launches and a little float64 arithmetic on per-segment scalars in between
(``specs/kernels.md`` §1):

1. pass 1 (:func:`~upgd_ref.kernels.numba_step.pass1_parallel`, or ``scaled_pass1_*``
   which also writes ``g <- f g`` back for the fused VGS): the utility trace and moments,
   per-chunk ``sum g``, ``sum g^2``, ``min u``, ``max u``;
2. per segment, in float64: chunk partials added in chunk order, ``t_i``, bias corrections,
   ``||g_i||``, the norm average ``n_i``, ``std_i``, the VGS statistics;
3. pass 2 (:func:`~upgd_ref.kernels.numba_step.pass2_parallel`): the update, with the
   normals of step ``T = state.step + 1`` generated inside the kernel.

Every member of the UPGD family (``variant``) runs in the kernels: without moments pass 1
is ``utility_pass1_*`` (``m``, ``v`` untouched); any non-production member's pass 2 is
``family_pass2_*`` with the member's mode bits (``specs/kernels.md`` §1.1).

The per-segment formulas are the reference's (:mod:`upgd_ref.reference`) applied to the
reduced values; only the element-wise work runs in the kernels.
"""

from __future__ import annotations

import time

import numpy as np

from .. import reference as ref
from ..checks import check_finite
from ..layout import FlatLayout
from ..rng import _check_u64
from ..state import FlatUPGDState, FlatVGSState
from . import numba_step as k
from .segments import (
    TwoPassSteps, check_noise_request, chunk_table, commit, family_mode, pass1_coefficients, plan_pass2, split_u64,
    vgs_statistics_update, zero_padding,
)

__all__ = ["NumbaBackend", "PARALLEL_MIN_SIZE", "chunk_table", "kernel_cache_stats"]

#: Below this many logical elements a step runs the serial kernels (thread start-up costs
#: more than it saves). Serial and parallel kernels give identical bits.
PARALLEL_MIN_SIZE = 1 << 15



def kernel_cache_stats() -> tuple[int, int]:
    """``(hits, misses)`` of Numba's on-disk cache over every kernel, this process."""
    hits = sum(sum(kernel.stats.cache_hits.values()) for kernel in k.KERNELS)
    misses = sum(sum(kernel.stats.cache_misses.values()) for kernel in k.KERNELS)
    return hits, misses


def _read_only(buffer: np.ndarray) -> np.ndarray:
    """A read-only view: kernels that only read a buffer get one Numba type (and one compiled
    version) whether the caller's buffer is writable or not."""
    view = buffer.view()
    view.flags.writeable = False
    return view


def _split_u64(value: int) -> tuple[np.uint64, np.uint64]:
    """``(low 32 bits, high 32 bits)`` as the uint64 words the Philox kernels take."""
    return tuple(np.uint64(word) for word in split_u64(value))


class NumbaBackend(TwoPassSteps):
    """Fused Numba kernels on NumPy flat buffers (float32 and float64 layouts).

    ``parallel_min_size``: layouts with at least this many elements use the parallel
    kernels (``numba.set_num_threads`` sets how many threads); smaller ones the serial ones.
    Results are bit-identical either way and for any thread count.
    """

    name = "numba"
    array_kind = "numpy"

    def __init__(self, parallel_min_size: int = PARALLEL_MIN_SIZE):
        self.parallel_min_size = parallel_min_size

    def __repr__(self) -> str:
        return f"NumbaBackend(parallel_min_size={self.parallel_min_size})"

    def _pick(self, layout, serial, parallel):
        return parallel if layout.num_logical >= self.parallel_min_size else serial

    # --- noise --------------------------------------------------------------------------

    def noise(self, layout, seed: int, step: int, dtype=None, out=None) -> np.ndarray:
        """As :func:`upgd_ref.rng.noise`, bit for bit, with the same errors; into ``out`` (a
        checked buffer of the layout, padding then set to 0) when given."""
        dtype, seed, step = check_noise_request(layout, dtype, seed, step)
        if out is None:
            out = layout.zeros(dtype=dtype)
        else:
            zero_padding(layout, out)
        kernel = self._pick(layout, k.noise_serial, k.noise_parallel)
        kernel(out, chunk_table(layout), *_split_u64(step), *_split_u64(seed))
        return out

    # --- validation ---------------------------------------------------------------------

    def check_finite(self, name: str, buffer: np.ndarray, layout, present) -> None:
        """:func:`upgd_ref.checks.check_finite` with a parallel scan; the error (naming the
        first bad element) comes from the same function, so messages are identical."""
        table = chunk_table(layout)
        counts = np.zeros(table.shape[0], dtype=np.int64)
        kernel = self._pick(layout, k.nonfinite_serial, k.nonfinite_parallel)
        kernel(_read_only(buffer), table, np.asarray(present, dtype=np.bool_), counts)
        if counts.any():
            check_finite(name, buffer, layout, present)

    # --- VGS ----------------------------------------------------------------------------

    def vgs_scale(self, layout, grads, factor: float, present) -> None:
        kernel = self._pick(layout, k.scale_serial, k.scale_parallel)
        kernel(grads, chunk_table(layout), np.asarray(present, dtype=np.bool_), layout.dtype.type(factor))

    def vgs_update(self, layout, grads, state: FlatVGSState, beta: float, present) -> None:
        table = chunk_table(layout)
        flags = np.asarray(present, dtype=np.bool_)
        partial = np.empty((table.shape[0], 4))
        self._pick(layout, k.moments_serial, k.moments_parallel)(_read_only(grads), table, flags, partial)
        sums = k.segment_sums(table, flags, partial, layout.num_segments)
        vgs_statistics_update(state, sums, layout.sizes, flags, beta)

    # --- the step -----------------------------------------------------------------------

    def _step(self, layout, params, grads, state, present, hyper, seed, noise_norm, vgs_factor, variant):
        variant = ref.check_variant(variant)
        dtype = layout.dtype
        step = _check_u64("step", state.step + 1)  # the noise counter T
        table = chunk_table(layout)
        flags = np.asarray(present, dtype=np.bool_)

        partial = np.empty((table.shape[0], 4))
        factor = dtype.type(vgs_factor)
        if variant.moments == "adam":
            buffers = (params, state.utility, state.first_moment, state.second_moment, table, flags,
                       pass1_coefficients(hyper, dtype))
            scaled_kernels = (k.scaled_pass1_serial, k.scaled_pass1_parallel)
            kernels = (k.pass1_serial, k.pass1_parallel)
        else:  # no moments: m and v are neither read nor written
            buffers = (params, state.utility, table, flags, pass1_coefficients(hyper, dtype))
            scaled_kernels = (k.scaled_utility_pass1_serial, k.scaled_utility_pass1_parallel)
            kernels = (k.utility_pass1_serial, k.utility_pass1_parallel)
        if factor != 1:  # g <- f g inside pass 1: the gradient is read once for both
            self._pick(layout, *scaled_kernels)(grads, *buffers, factor, partial)
        else:
            self._pick(layout, *kernels)(_read_only(grads), *buffers, partial)
        sums = k.segment_sums(table, flags, partial, layout.num_segments)
        u_lo, u_hi = k.utility_extrema(table, flags, partial)
        plan = plan_pass2(layout, state, flags, hyper, sums, u_lo, u_hi, noise_norm, variant)
        if plan.run:
            if variant == ref.PRODUCTION:
                pass2 = self._pick(layout, k.pass2_serial, k.pass2_parallel)
                pass2(params, state.utility, state.first_moment, state.second_moment, table, flags,
                      plan.coefficients, plan.u_lo, plan.inv_range, *_split_u64(step), *_split_u64(seed))
            else:
                pass2 = self._pick(layout, k.family_pass2_serial, k.family_pass2_parallel)
                pass2(params, _read_only(grads), state.utility, state.first_moment, state.second_moment, table,
                      flags, plan.coefficients, plan.u_lo, plan.inv_range, plan.u_hi, family_mode(variant),
                      *_split_u64(step), *_split_u64(seed))

        commit(state, step, plan)
        return plan.stats, sums

    # --- compilation --------------------------------------------------------------------

    def warmup(self, dtypes=("float32", "float64")) -> float:
        """Compile (or load from Numba's cache) every kernel, serial and parallel, for
        ``dtypes``; returns the seconds it took."""
        start = time.perf_counter()
        for dtype in dtypes:
            layout = FlatLayout([(3,), (0,), (4, 2)], dtype=dtype)
            hyper = [dict(ref.UPGD_DEFAULTS, adaptive_noise=True)] * layout.num_segments
            present = [True, True, False]
            family = ref.UPGDVariant(moments="none", protection="max", update_factor=2.0, noise_placement="terms")
            for backend in (NumbaBackend(parallel_min_size=0), NumbaBackend(parallel_min_size=layout.num_logical + 1)):
                params, grads = layout.zeros(), layout.zeros()
                params[...] = 0.5
                grads[...] = 0.25
                state = FlatUPGDState.zeros(layout, [1.0] * layout.num_segments)
                vgs_state = FlatVGSState.zeros(layout.num_segments)
                backend.noise(layout, 0, 1)
                backend.check_finite("grads", grads, layout, present)
                backend.vgs_scale(layout, grads, 0.5, present)
                backend.vgs_update(layout, grads, vgs_state, 0.99, present)
                for member in (ref.PRODUCTION, family):  # the mode is a run-time argument: one compilation
                    backend.upgd_step(layout, params, grads, state, present, hyper, 0, "segment", member)
                    backend.fused_step(layout, params, grads, state, present, hyper, 0, "segment", vgs_state, 0.5,
                                       0.99, member)
        return time.perf_counter() - start
