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

import functools
import time

import numpy as np

from .. import reference as ref
from ..checks import check_finite
from ..layout import FlatLayout
from ..rng import _check_u64
from ..state import FlatUPGDState, FlatVGSState
from . import numba_step as k

__all__ = ["NumbaBackend", "PARALLEL_MIN_SIZE", "chunk_table", "kernel_cache_stats"]

#: Below this many logical elements a step runs the serial kernels (thread start-up costs
#: more than it saves). Serial and parallel kernels give identical bits.
PARALLEL_MIN_SIZE = 1 << 15

_MASK32 = 0xFFFFFFFF
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@functools.lru_cache(maxsize=64)
def _chunk_table(offsets: tuple, logical_offsets: tuple, sizes: tuple) -> np.ndarray:
    """:func:`chunk_table` from the layout's tuples (hashable, so the table is built once)."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    per_segment = -(-sizes_arr // k.CHUNK)  # ceil(size / CHUNK); 0 for an empty segment
    segment = np.repeat(np.arange(len(sizes), dtype=np.int64), per_segment)
    first_chunk = np.cumsum(per_segment) - per_segment
    within = (np.arange(segment.size, dtype=np.int64) - first_chunk[segment]) * k.CHUNK
    table = np.empty((segment.size, 4), dtype=np.int64)
    table[:, k.SEGMENT] = segment
    table[:, k.START] = np.asarray(offsets, dtype=np.int64)[segment] + within
    table[:, k.LENGTH] = np.minimum(k.CHUNK, sizes_arr[segment] - within)
    table[:, k.LOGICAL] = np.asarray(logical_offsets, dtype=np.int64)[segment] + within
    table.flags.writeable = False  # shared between calls through the cache
    return table


def chunk_table(layout: FlatLayout) -> np.ndarray:
    """The layout's chunks: int64 ``(C, 4)``, columns ``SEGMENT, START, LENGTH, LOGICAL``.

    Segment ``i`` of size ``n`` has ``ceil(n / CHUNK)`` chunks, in order; chunk ``c``
    covers ``flat[START : START + LENGTH]``, logical indices from ``LOGICAL``.
    """
    return _chunk_table(layout.offsets, layout.logical_offsets, layout.sizes)


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


def _zero_padding(layout: FlatLayout, flat: np.ndarray) -> None:
    """Set the padding after each segment to 0."""
    for offset, size in zip(layout.offsets, layout.sizes):
        flat[offset + size : offset + size + (-size) % layout.alignment] = 0


def _split_u64(value: int) -> tuple[np.uint64, np.uint64]:
    """``(low 32 bits, high 32 bits)`` as the uint64 words the Philox kernels take."""
    return np.uint64(value & _MASK32), np.uint64(value >> 32)


def _column(hyper: list[dict], name: str) -> np.ndarray:
    return np.array([h[name] for h in hyper], dtype=np.float64)


def _pass1_coefficients(hyper: list[dict], dtype) -> np.ndarray:
    """Per segment ``beta, 1 - beta`` of the utility and both moments, rounded to ``dtype``."""
    out = np.empty((len(hyper), k.NUM_PASS1_COEFFICIENTS), dtype=dtype)
    for beta_name, beta_column, complement_column in (
        ("beta_utility", k.BETA_U, k.ONE_MINUS_BETA_U),
        ("beta1", k.BETA1, k.ONE_MINUS_BETA1),
        ("beta2", k.BETA2, k.ONE_MINUS_BETA2),
    ):
        beta = _column(hyper, beta_name)
        out[:, beta_column] = beta
        out[:, complement_column] = 1.0 - beta
    return out


def _reciprocal_in(dtype, value) -> np.ndarray:
    """``1 / value`` rounded to ``dtype``, where ``value`` is first rounded to ``dtype`` (the
    reference divides by the dtype-rounded value)."""
    rounded = np.asarray(value, dtype=dtype).astype(np.float64)
    return (1.0 / rounded).astype(dtype)


def _bias_corrections(hyper: list[dict], name: str, t: np.ndarray) -> np.ndarray:
    """``1 - beta**t_i`` per segment with the reference's scalar ``pow`` (NumPy's array power
    can be an ulp off, and ``1 - beta**t`` amplifies that by ``1 / (1 - beta**t)``)."""
    return np.array([ref.bias_correction(h[name], int(steps)) for h, steps in zip(hyper, t)], dtype=np.float64)


def _pass2_coefficients(hyper: list[dict], t: np.ndarray, std: np.ndarray, dtype,
                        update_factor: float = 1.0) -> np.ndarray:
    """Per segment ``1 - lr wd, update_factor lr, eps, 1/cu, 1/(1 - beta1^t), 1/(1 - beta2^t), std``
    (the reference's ``step = update_factor * lr``, a float64 product rounded once)."""
    lr = _column(hyper, "lr")
    out = np.empty((len(hyper), k.NUM_PASS2_COEFFICIENTS), dtype=dtype)
    out[:, k.DECAY] = 1.0 - lr * _column(hyper, "weight_decay")
    out[:, k.LR] = update_factor * lr
    out[:, k.EPS] = _column(hyper, "eps")
    with np.errstate(divide="ignore"):  # t = 0 only for absent segments, never read
        out[:, k.INV_CU] = _reciprocal_in(dtype, _bias_corrections(hyper, "beta_utility", t))
        out[:, k.INV_BC1] = _reciprocal_in(dtype, _bias_corrections(hyper, "beta1", t))
        out[:, k.INV_BC2] = _reciprocal_in(dtype, _bias_corrections(hyper, "beta2", t))
    out[:, k.STD] = np.where(np.isnan(std), 0.0, std)
    return out


def _noise_scales(square_sums, present, hyper, grad_norm_ema, t, noise_norm):
    """``(||g_i||, n_i, std_i)`` per segment from ``sum g_i^2`` (``specs/algorithm.md`` §3.3).

    Absent segments: NaN norm and std, ``n_i`` unchanged. The global norm adds the present
    squares in segment order, as the reference does.
    """
    squares = np.where(present, square_sums, np.nan)
    segment_norm = np.sqrt(squares)
    global_norm = np.sqrt(sum(squares[i] for i in np.flatnonzero(present))) if present.any() else np.nan
    ema = np.array(grad_norm_ema, dtype=np.float64)
    std = np.full(len(hyper), np.nan)
    for i in np.flatnonzero(present):
        h = hyper[i]
        r = segment_norm[i] if noise_norm == "segment" else global_norm
        if h["adaptive_noise"]:
            ema[i] = ref.grad_norm_ema_update(ema[i], r, h["noise_beta"])
        std[i] = ref.noise_std(
            np, sigma=h["sigma"], adaptive_noise=h["adaptive_noise"],
            instant_noise_scale=h["instant_noise_scale"], min_noise_std=h["min_noise_std"],
            noise_beta=h["noise_beta"], norm=r, grad_norm_ema=ema[i], t=t[i],
        )
    return segment_norm, ema, std


def _vgs_statistics_update(state: FlatVGSState, sums: np.ndarray, sizes, present, beta: float) -> None:
    """``k += 1``; ``a_i, b_i <- beta * old + (1 - beta) * mean(g_i), mean(g_i^2)`` for present,
    non-empty segments (``sums``: per-segment ``sum g, sum g^2`` of the scaled gradients)."""
    for i in np.flatnonzero(present):
        if sizes[i]:
            state.grad_mean_avg[i] = beta * state.grad_mean_avg[i] + (1.0 - beta) * (sums[i, 0] / sizes[i])
            state.grad_sq_avg[i] = beta * state.grad_sq_avg[i] + (1.0 - beta) * (sums[i, 1] / sizes[i])
    state.step += 1


def _family_mode(variant: ref.UPGDVariant) -> int:
    """The ``mode`` bits of ``family_pass2_*`` for a (checked) variant."""
    return ((k.MOMENTS_NONE if variant.moments == "none" else 0)
            | (k.PROTECTION_MAX if variant.protection == "max" else 0)
            | (k.NOISE_TERMS if variant.noise_placement == "terms" else 0))


class NumbaBackend:
    """Fused Numba kernels on NumPy flat buffers (float32 and float64 layouts).

    ``parallel_min_size``: layouts with at least this many elements use the parallel
    kernels (``numba.set_num_threads`` sets how many threads); smaller ones the serial ones.
    Results are bit-identical either way and for any thread count.
    """

    name = "numba"

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
        dtype = np.dtype(layout.dtype if dtype is None else dtype)
        if dtype not in _KERNEL_DTYPES:
            raise TypeError(f"noise dtype must be float32 or float64, got {dtype.name}")
        seed = _check_u64("seed", seed)
        step = _check_u64("step", step)
        if out is None:
            out = layout.zeros(dtype=dtype)
        else:
            _zero_padding(layout, out)
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
        _vgs_statistics_update(state, sums, layout.sizes, flags, beta)

    # --- the step -----------------------------------------------------------------------

    def upgd_step(self, layout, params, grads, state: FlatUPGDState, present, hyper, seed, noise_norm,
                  variant=ref.PRODUCTION):
        stats, _ = self._step(layout, params, grads, state, present, hyper, seed, noise_norm, 1.0, variant)
        return stats

    def fused_step(self, layout, params, grads, state: FlatUPGDState, present, hyper, seed, noise_norm,
                   vgs_state: FlatVGSState, vgs_factor: float, vgs_beta: float, variant=ref.PRODUCTION):
        """``vgs_scale``, ``upgd_step``, ``vgs_update`` in one read of the gradient."""
        stats, sums = self._step(layout, params, grads, state, present, hyper, seed, noise_norm, vgs_factor,
                                 variant)
        _vgs_statistics_update(vgs_state, sums, layout.sizes, np.asarray(present, dtype=np.bool_), vgs_beta)
        return stats

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
                       _pass1_coefficients(hyper, dtype))
            scaled_kernels = (k.scaled_pass1_serial, k.scaled_pass1_parallel)
            kernels = (k.pass1_serial, k.pass1_parallel)
        else:  # no moments: m and v are neither read nor written
            buffers = (params, state.utility, table, flags, _pass1_coefficients(hyper, dtype))
            scaled_kernels = (k.scaled_utility_pass1_serial, k.scaled_utility_pass1_parallel)
            kernels = (k.utility_pass1_serial, k.utility_pass1_parallel)
        if factor != 1:  # g <- f g inside pass 1: the gradient is read once for both
            self._pick(layout, *scaled_kernels)(grads, *buffers, factor, partial)
        else:
            self._pick(layout, *kernels)(_read_only(grads), *buffers, partial)
        sums = k.segment_sums(table, flags, partial, layout.num_segments)
        u_lo, u_hi = k.utility_extrema(table, flags, partial)

        t = state.segment_step + flags
        with np.errstate(all="ignore"):  # as the reference backend: NaN marks absent segments
            grad_norm, ema, std = _noise_scales(sums[:, 1], flags, hyper, state.grad_norm_ema, t, noise_norm)
        u_lo, u_hi = dtype.type(u_lo), dtype.type(u_hi)
        if not np.isnan(u_lo):  # some present segment has elements
            utility_range = u_hi - u_lo + dtype.type(ref.UTILITY_RANGE_EPS)  # in dtype, as the reference
            inv_range = dtype.type(_reciprocal_in(dtype, utility_range))
            if variant == ref.PRODUCTION:
                pass2 = self._pick(layout, k.pass2_serial, k.pass2_parallel)
                pass2(params, state.utility, state.first_moment, state.second_moment, table, flags,
                      _pass2_coefficients(hyper, t, std, dtype), u_lo, inv_range,
                      *_split_u64(step), *_split_u64(seed))
            else:
                pass2 = self._pick(layout, k.family_pass2_serial, k.family_pass2_parallel)
                pass2(params, _read_only(grads), state.utility, state.first_moment, state.second_moment, table,
                      flags, _pass2_coefficients(hyper, t, std, dtype, variant.update_factor), u_lo, inv_range,
                      u_hi, _family_mode(variant), *_split_u64(step), *_split_u64(seed))

        state.step = step
        state.segment_step[...] = t
        state.grad_norm_ema[...] = ema
        return ref.StepStats(grad_norm=grad_norm, noise_std=std, utility_min=u_lo, utility_max=u_hi), sums

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
