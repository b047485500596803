r"""The chunk-table ABI every kernel backend shares: the chunk size, the chunk table, the
columns of the coefficient and partial-result tables, and the host code that fills them.

No Numba and no CuPy here: the Numba kernels (:mod:`.numba_step`), the CUDA source
(:mod:`.cuda_source`, which generates its constants from this module) and their host sides
(:mod:`.numba_backend`, :mod:`.cuda_backend`) all read the column indices and the chunk size
from here, so both kernel families work on the same tables (``specs/kernels.md`` §1). The
per-segment formulas between the passes are not here: they are the core's
(:mod:`upgd_ref.stages`), shared with the reference backend.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

from .. import reference as ref
from ..layout import FlatLayout
from ..rng import check_u64, noise_dtype

__all__ = [
    "CHUNK", "SEGMENT", "START", "LENGTH", "LOGICAL",
    "BETA_U", "ONE_MINUS_BETA_U", "BETA1", "ONE_MINUS_BETA1", "BETA2", "ONE_MINUS_BETA2",
    "DECAY", "LR", "EPS", "INV_CU", "INV_BC1", "INV_BC2", "STD", "NUM_COEFFICIENTS",
    "SUM", "SUM_SQ", "MIN_U", "MAX_U", "MAX_P", "MAX_D", "BAD", "NUM_PARTIALS",
    "MOMENTS_NONE", "PROTECTION_MAX", "NOISE_TERMS",
    "TANH_FLOAT32", "TANH_FLOAT64",
    "chunk_table", "segment_chunk_offsets", "check_noise_request", "split_u64", "zero_padding",
    "step_coefficients", "family_mode", "update_tables",
]

CHUNK = 2048  # elements per work item: partial sums are fixed by it, never by the threads

# Chunk table columns.
SEGMENT, START, LENGTH, LOGICAL = 0, 1, 2, 3
# Coefficient columns (per segment, in the buffers' dtype), one table for both passes (pass 2
# recomputes pass 1's traces): beta, 1 - beta of the utility and both moments, then
# 1 - lr*wd, update_factor*lr, eps, 1/cu, 1/(1-beta1^t), 1/(1-beta2^t), std (0 in pass 1).
BETA_U, ONE_MINUS_BETA_U, BETA1, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2 = range(6)
DECAY, LR, EPS, INV_CU, INV_BC1, INV_BC2, STD = range(6, 13)
NUM_COEFFICIENTS = 13
# Partial-result columns of a chunk (float64): sum g, sum g^2, min u, max u of the updated
# utility, max |p|, max |d| (the update direction) and the count of elements where any of
# g, p, the new u, m, v or d is not finite (specs/algorithm.md §8).
SUM, SUM_SQ, MIN_U, MAX_U, MAX_P, MAX_D, BAD = range(7)
NUM_PARTIALS = 7
# Family mode bits of the family pass 2 (0 is the production arithmetic): moments "none"
# (direction g), protection "max" (sigmoid((u/cu)/U_hi)), noise placement "terms".
MOMENTS_NONE, PROTECTION_MAX, NOISE_TERMS = 1, 2, 4

_MASK32 = 0xFFFFFFFF


def _tanh_series(terms: int) -> tuple[float, ...]:
    """Taylor coefficients of ``tanh(w) / w`` in powers of ``w**2``, highest first:
    ``c_n = 2**(2n) (2**(2n) - 1) B_(2n) / (2n)!`` for ``n = 1 .. terms`` (exact fractions,
    rounded once)."""
    bernoulli = [Fraction(1)]
    for m in range(1, 2 * terms + 1):
        bernoulli.append(-sum(math.comb(m + 1, k) * bernoulli[k] for k in range(m)) / (m + 1))
    coefficients = [2 ** (2 * n) * (2 ** (2 * n) - 1) * bernoulli[2 * n] / math.factorial(2 * n)
                    for n in range(1, terms + 1)]
    return tuple(float(c) for c in reversed(coefficients))


def _halves(coefficients: tuple) -> tuple[tuple, tuple]:
    """``(high, low)``: the coefficients of ``H`` and ``L`` in ``P(y) = H(y) y**len(low) + L(y)``."""
    middle = (len(coefficients) + 1) // 2
    return coefficients[:middle], coefficients[middle:]


#: ``(high, low)`` halves of the tanh series on ``|w| <= 1/2`` (``specs/kernels.md`` §3): the
#: first omitted term is below 5e-9 (float32, 8 terms: < 0.1 ulp of the protection, which
#: lies in [0.27, 0.73]) and below 5e-18 (float64, 17 terms).
TANH_FLOAT32 = _halves(_tanh_series(8))
TANH_FLOAT64 = _halves(_tanh_series(17))


# --- tables -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _chunk_table(offsets: tuple, logical_offsets: tuple, sizes: tuple) -> np.ndarray:
    """:func:`chunk_table` from the layout's tuples (hashable, so the table is built once)."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    per_segment = -(-sizes_arr // CHUNK)  # ceil(size / CHUNK); 0 for an empty segment
    segment = np.repeat(np.arange(len(sizes), dtype=np.int64), per_segment)
    first_chunk = np.cumsum(per_segment) - per_segment
    within = (np.arange(segment.size, dtype=np.int64) - first_chunk[segment]) * CHUNK
    table = np.empty((segment.size, 4), dtype=np.int64)
    table[:, SEGMENT] = segment
    table[:, START] = np.asarray(offsets, dtype=np.int64)[segment] + within
    table[:, LENGTH] = np.minimum(CHUNK, sizes_arr[segment] - within)
    table[:, LOGICAL] = np.asarray(logical_offsets, dtype=np.int64)[segment] + within
    table.flags.writeable = False  # shared between calls through the cache
    return table


def chunk_table(layout: FlatLayout) -> np.ndarray:
    """The layout's chunks: int64 ``(C, 4)``, columns ``SEGMENT, START, LENGTH, LOGICAL``.

    Segment ``i`` of size ``n`` has ``ceil(n / CHUNK)`` chunks, in order; chunk ``c``
    covers ``flat[START : START + LENGTH]``, noise indices from ``LOGICAL`` (``layout.noise_offsets``).
    """
    return _chunk_table(layout.offsets, layout.noise_offsets, layout.sizes)


def segment_chunk_offsets(layout: FlatLayout) -> np.ndarray:
    """int64 ``(S + 1,)``: segment ``i``'s chunks are rows ``[o[i], o[i + 1])`` of the chunk table."""
    per_segment = -(-np.asarray(layout.sizes, dtype=np.int64) // CHUNK)
    return np.concatenate([[0], np.cumsum(per_segment)]).astype(np.int64)


def zero_padding(layout: FlatLayout, flat) -> None:
    """Set the padding after each segment to 0 (NumPy or CuPy flat buffer)."""
    for offset, size in zip(layout.offsets, layout.sizes):
        flat[offset + size : offset + size + (-size) % layout.alignment] = 0


def check_noise_request(layout: FlatLayout, dtype, seed, step) -> tuple[np.dtype, int, int]:
    """``(dtype, seed, step)`` of a kernel noise request, checked as :func:`upgd_ref.rng.noise` checks."""
    dtype = np.dtype(noise_dtype(layout) if dtype is None else dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"noise dtype must be float32 or float64, got {dtype.name}")
    return dtype, check_u64("seed", seed), check_u64("step", step)


def split_u64(value: int) -> tuple[int, int]:
    """``(low 32 bits, high 32 bits)`` of a 64-bit counter or key."""
    return value & _MASK32, value >> 32


def _column(hyper: list[dict], name: str) -> np.ndarray:
    return np.array([h[name] for h in hyper], dtype=np.float64)


def _reciprocal_in(dtype, value) -> np.ndarray:
    """``1 / value`` rounded to ``dtype``, where ``value`` is first rounded to ``dtype`` (the
    reference divides by the dtype-rounded value)."""
    rounded = np.asarray(value, dtype=dtype).astype(np.float64)
    return (1.0 / rounded).astype(dtype)


def _bias_corrections(hyper: list[dict], name: str, t: np.ndarray) -> np.ndarray:
    """``1 - beta**t_i`` per segment with the reference's scalar ``pow`` (NumPy's array power
    can be an ulp off, and ``1 - beta**t`` amplifies that by ``1 / (1 - beta**t)``)."""
    return np.array([ref.bias_correction(h[name], int(steps)) for h, steps in zip(hyper, t)], dtype=np.float64)


def step_coefficients(hyper: list[dict], t: np.ndarray, std: np.ndarray, dtype,
                      update_factor: float = 1.0) -> np.ndarray:
    """Per segment, rounded to ``dtype``: ``beta, 1 - beta`` of the utility and both moments,
    ``1 - lr wd, update_factor lr, eps, 1/cu, 1/(1 - beta1^t), 1/(1 - beta2^t), std`` (the
    reference's ``step = update_factor * lr``, a float64 product rounded once). ``t``: the
    step counts after this step; ``std``: NaN (absent segments, or pass 1) stored as 0."""
    lr = _column(hyper, "lr")
    out = np.empty((len(hyper), NUM_COEFFICIENTS), dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # refused by the plan (stages)
        for beta_name, beta_column, complement_column in (
            ("beta_utility", BETA_U, ONE_MINUS_BETA_U),
            ("beta1", BETA1, ONE_MINUS_BETA1),
            ("beta2", BETA2, ONE_MINUS_BETA2),
        ):
            beta = _column(hyper, beta_name)
            out[:, beta_column] = beta
            out[:, complement_column] = 1.0 - beta
        out[:, DECAY] = 1.0 - lr * _column(hyper, "weight_decay")
        out[:, LR] = update_factor * lr
        out[:, EPS] = _column(hyper, "eps")
        # t = 0 only for absent segments, never read
        out[:, INV_CU] = _reciprocal_in(dtype, _bias_corrections(hyper, "beta_utility", t))
        out[:, INV_BC1] = _reciprocal_in(dtype, _bias_corrections(hyper, "beta1", t))
        out[:, INV_BC2] = _reciprocal_in(dtype, _bias_corrections(hyper, "beta2", t))
    out[:, STD] = np.where(np.isnan(std), 0.0, std)
    return out


def family_mode(variant: ref.UPGDVariant) -> int:
    """The ``mode`` bits of the family pass 2 for a (checked) variant."""
    return ((MOMENTS_NONE if variant.moments == "none" else 0)
            | (PROTECTION_MAX if variant.protection == "max" else 0)
            | (NOISE_TERMS if variant.noise_placement == "terms" else 0))


# --- the update stage's tables ------------------------------------------------------------


def update_tables(plan, hyper: list[dict], dtype, variant: ref.UPGDVariant) -> tuple[np.ndarray, np.generic]:
    """``(coefficients, inv_range)`` of pass 2 for a :class:`~upgd_ref.stages.StepPlan`:
    the per-segment coefficient table and ``1 / (U_hi - U_lo + 1e-8)``, both rounded in
    ``dtype`` where the reference rounds (the range is formed in ``dtype``, as the reference
    forms it)."""
    dtype = np.dtype(dtype)
    utility_range = plan.utility_max - plan.utility_min + dtype.type(ref.UTILITY_RANGE_EPS)
    inv_range = dtype.type(_reciprocal_in(dtype, utility_range))
    return step_coefficients(hyper, plan.segment_step, plan.std, dtype, variant.update_factor), inv_range
