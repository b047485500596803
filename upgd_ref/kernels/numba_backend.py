r"""``NumbaBackend``: the stages of :class:`upgd_ref.backends.Backend` on Numba kernels.

One AdaptiveUPGD step (optionally fused with the VGS scale) is two kernel launches; the
core (:mod:`upgd_ref.step`) does the float64 per-segment work in between
(``specs/kernels.md`` §1, ``specs/step.md``):

1. :meth:`~NumbaBackend.first_pass` (:func:`~upgd_ref.kernels.numba_step.pass1_chunks`),
   read-only: the traces of ``f g`` in registers, per chunk ``sum g``, ``sum g^2``, ``min u``,
   ``max u``, ``max |p|``, ``max |d|`` and the non-finite count, then per segment in chunk
   order (:class:`~upgd_ref.stages.SegmentReductions`);
2. :meth:`~NumbaBackend.second_pass` (:func:`~upgd_ref.kernels.numba_step.pass2_chunks`):
   the traces again (same bits), written with ``g <- f g``, and the update, with the normals
   of step ``T = state.step + 1`` generated inside the kernel.

Every member of the UPGD family (``variant``) runs in the kernels: without moments ``m``,
``v`` are neither read nor written; any non-production member's pass 2 is ``family_pass2_chunks``
with the member's mode bits (``specs/kernels.md`` §1.1).

The per-segment formulas are the reference's (:mod:`upgd_ref.reference`) applied to the
reduced values; only the element-wise work runs in the kernels. On a cold cache (Linux), the
reduction and pass 2 compile in forked children while pass 1 compiles here
(:mod:`.compile_ahead`, ``specs/kernels.md`` §7).
"""

from __future__ import annotations

import time

import numpy as np

from .. import reference as ref
from ..rng import DEFAULT_NOISE_VERSION, check_noise_version
from ..stages import SegmentReductions
from . import numba_step as k
from .compile_ahead import forking_on_compile, wait_for
from .compile_notice import install as install_compile_notice
from .numba_launch import run_chunks, thread_count
from .chunk_abi import (
    NUM_PARTIALS, SEGMENT, check_noise_request, chunk_table, family_mode, split_u64, step_coefficients,
    update_tables, zero_padding,
)

__all__ = ["NumbaBackend", "PARALLEL_MIN_SIZE", "chunk_table", "kernel_cache_stats"]

#: Below this many logical elements a kernel runs on the calling thread only (handing ranges
#: to the pool costs more than it saves). Either way the bits are the same.
PARALLEL_MIN_SIZE = 1 << 15

install_compile_notice()  # the first kernel this process compiles logs one notice (specs/kernels.md §7)


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


def _reductions(totals: np.ndarray) -> SegmentReductions:
    return SegmentReductions.from_columns(totals)


def _split_u64(value: int) -> tuple[np.uint64, np.uint64]:
    """``(low 32 bits, high 32 bits)`` as the uint64 words the Philox kernels take."""
    return tuple(np.uint64(word) for word in split_u64(value))


def _noise_v2(noise_version: int):
    """The kernels' ``noise_v2`` argument: ``None`` for format 1 (Numba then compiles the
    format-1 kernels only, as before format 2 existed), ``True`` for format 2."""
    return None if check_noise_version(noise_version) == 1 else True


def _without_moments(variant: ref.UPGDVariant):
    """Pass 1's ``without_moments``: ``None`` for members with moments (their version never
    compiles the utility-only trace), ``True`` for the family's ``"none"``."""
    return True if variant.moments == "none" else None


def _pass2_call(params, grads, state, table, flags, coefficients, factor, u_lo, inv_range, u_hi, variant, step, seed,
                noise_version):
    """``(kernel, arguments after the chunk range)`` of pass 2: ``pass2_chunks`` for the
    production member, else ``family_pass2_chunks`` with the member's mode bits."""
    words = (*_split_u64(step), *_split_u64(seed), _noise_v2(noise_version))
    # g <- f g is written, in the read of pass 2, only when f != 1 (then grads is writable);
    # a read-only view selects the kernel version that never writes g
    g = grads if factor != 1 else _read_only(grads)
    common = (params, g, state.utility, state.first_moment, state.second_moment, table, flags, coefficients, factor,
              u_lo, inv_range)
    if variant == ref.PRODUCTION:
        return k.pass2_chunks, (*common, *words)
    return k.family_pass2_chunks, (*common, u_hi, family_mode(variant), *words)


class NumbaBackend:
    """Fused Numba kernels on NumPy flat buffers (float32 and float64 layouts).

    ``parallel_min_size``: on layouts with at least this many elements every kernel is split
    over threads (``numba.set_num_threads`` sets how many, :func:`.numba_launch.thread_count`);
    smaller ones run on the calling thread. Results are bit-identical either way and for any
    thread count.
    """

    name = "numba"
    array_kind = "numpy"

    def __init__(self, parallel_min_size: int = PARALLEL_MIN_SIZE):
        self.parallel_min_size = parallel_min_size

    def __repr__(self) -> str:
        return f"NumbaBackend(parallel_min_size={self.parallel_min_size})"

    def available(self) -> bool:
        return True

    def _run(self, layout, kernel, *args) -> None:
        """``kernel`` over every chunk of ``layout``: split over threads from
        ``parallel_min_size`` logical elements on, else on this thread."""
        threads = thread_count() if layout.num_logical >= self.parallel_min_size else 1
        run_chunks(kernel, chunk_table(layout).shape[0], threads, *args)

    # --- noise --------------------------------------------------------------------------

    def noise(self, *, layout, seed, step, dtype=None, out=None, noise_version=1) -> np.ndarray:
        """As :func:`upgd_ref.rng.noise`, bit for bit, with the same errors; into ``out`` (a
        checked buffer of the layout, padding then set to 0) when given."""
        dtype, seed, step = check_noise_request(layout, dtype, seed, step)
        noise_v2 = _noise_v2(noise_version)
        if out is None:
            out = layout.zeros(dtype=dtype)
        else:
            zero_padding(layout, out)
        self._run(layout, k.noise_chunks, out, chunk_table(layout), *_split_u64(step), *_split_u64(seed), noise_v2)
        return out

    # --- local reductions ---------------------------------------------------------------

    def nonfinite_counts(self, *, layout, buffer, present) -> np.ndarray:
        """Per-segment count of NaN and Inf elements of the present segments (a parallel scan)."""
        table = chunk_table(layout)
        counts = np.zeros(table.shape[0], dtype=np.int64)
        # the buffer as given (writable, as a rule): the chunk loop then shares its compiled
        # count with pass 1's tiles (specs/kernels.md §7)
        self._run(layout, k.nonfinite_chunks, buffer, table, np.asarray(present, dtype=np.bool_), counts)
        return np.bincount(table[:, SEGMENT], weights=counts, minlength=layout.num_segments).astype(np.int64)

    def gradient_sums(self, *, layout, grads, present) -> SegmentReductions:
        table = chunk_table(layout)
        flags = np.asarray(present, dtype=np.bool_)
        partial = np.zeros((table.shape[0], NUM_PARTIALS))
        self._run(layout, k.moments_chunks, grads, table, flags, partial)  # as given: shares pass 1's lane sums
        sums = _reductions(k.segment_reductions(table, flags, partial, layout.num_segments))
        return sums._replace(utility_min=np.full(layout.num_segments, np.inf),
                             utility_max=np.full(layout.num_segments, -np.inf))

    # --- element-wise -------------------------------------------------------------------

    def scale(self, *, layout, grads, factor, present) -> None:
        self._run(layout, k.scale_chunks, grads, chunk_table(layout), np.asarray(present, dtype=np.bool_),
                  layout.dtype.type(factor))

    def first_pass(self, *, layout, params, grads, state, present, hyper, vgs_factor, variant) -> SegmentReductions:
        dtype = layout.dtype
        table = chunk_table(layout)
        flags = np.asarray(present, dtype=np.bool_)
        partial = np.empty((table.shape[0], NUM_PARTIALS))
        t = state.segment_step + flags
        coefficients = step_coefficients(hyper, t, np.zeros(layout.num_segments), dtype, variant.update_factor)
        factor = dtype.type(vgs_factor)
        # on a cold cache, the reduction and pass 2 (default noise format) compile in children
        # while this process compiles pass 1 (compile_ahead.py); the stand-in scalars only carry types
        zero = dtype.type(0)
        pass2 = _pass2_call(params, grads, state, table, flags, coefficients, factor, zero, zero, zero, variant, 0, 0,
                            DEFAULT_NOISE_VERSION)
        reduce = (table, flags, partial, layout.num_segments)
        with forking_on_compile((k.segment_reductions, reduce), (pass2[0], (0, 0, *pass2[1]))):
            self._run(layout, k.pass1_chunks,
                      *(_read_only(b) for b in (grads, params, state.utility, state.first_moment, state.second_moment)),
                      table, flags, coefficients, factor, _without_moments(variant), partial)
        wait_for(k.segment_reductions, reduce)
        return _reductions(k.segment_reductions(*reduce))

    def second_pass(self, *, layout, params, grads, state, present, hyper, plan, seed, variant,
                    vgs_factor=1.0, noise_version=1) -> None:
        coefficients, inv_range = update_tables(plan, hyper, layout.dtype, variant)
        kernel, args = _pass2_call(params, grads, state, chunk_table(layout), np.asarray(present, dtype=np.bool_),
                                   coefficients, layout.dtype.type(vgs_factor), plan.utility_min, inv_range,
                                   plan.utility_max, variant, plan.step, seed, noise_version)
        wait_for(kernel, (0, 0, *args))
        self._run(layout, kernel, *args)

    # --- compilation --------------------------------------------------------------------

    def warmup(self, dtypes=("float32", "float64")) -> float:
        """Compile (or load from Numba's cache) every kernel for ``dtypes`` by running tiny
        steps through the core's door (serial and parallel launches run the same kernels);
        returns the seconds it took."""
        from ..step import warmup_steps  # the door imports the backends' registry, not this module

        start = time.perf_counter()
        warmup_steps(NumbaBackend(), dtypes)
        return time.perf_counter() - start
