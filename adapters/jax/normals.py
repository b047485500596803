"""The core's noise generator (``specs/noise.md``) on ``jax.numpy``.

:mod:`upgd_ref.rng` holds every formula (Philox, the Box-Muller transform); this module adds
the noise counter's block/lane indexing for a concrete or traced step (``specs/noise.md`` §4;
the core's ``standard_normals`` takes the step as a Python int) and an evaluator that keeps
XLA from contracting the transform's products into fused multiply-adds, which would change
its float64 bits (``specs/adapters-jax.md`` §6).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from upgd_ref import rng as _rng
from upgd_ref import rng_v2 as _rng_v2

from .elementwise import reemit, uncontracted
from .leaves import SUPPORTED_DTYPES, check_leaf_dtype, is_tracer, x64_scope
from .precision import computed

_MASK32 = 0xFFFFFFFF


def _opaque(x):
    """``x`` for every non-NaN value, through a ``select`` LLVM cannot fold into an FMA."""
    return jax.lax.select(x == x, x, jnp.zeros_like(x))


def _bit_round_trip(x):
    """``x`` one ulp up and back (``nextafter``): the identity on the binary32 transform's
    values (finite, no ``-0``), computed with integer bit operations that neither XLA's
    simplifier nor LLVM sees through. A ``select`` (:func:`_opaque`) does not stop XLA:CPU from
    contracting float32 products into FMAs (measured: 1 of 10**6 cosines 1 ulp off)."""
    return jnp.nextafter(jnp.nextafter(x, jnp.asarray(jnp.inf, x.dtype)), jnp.asarray(-jnp.inf, x.dtype))


def _eval_without_contraction(jaxpr, consts, args, guard=_opaque, guarded=("float64",), every_product=False):
    """Evaluate a jaxpr, passing every product of a dtype in ``guarded`` (default float64) that
    feeds an addition (``every_product``: every product) through ``guard`` (:func:`_opaque`,
    or :func:`~.elementwise.uncontracted` where NaN must stay NaN).

    Noise format 2 guards every float32 product, with :func:`_bit_round_trip`: XLA's
    simplifier also regroups float32 product chains such as ``(x c) (x c)``, which changes
    their rounding (measured: 2 of 10**6 normals 1 ulp off).

    XLA:CPU compiles with floating-point contraction allowed, so ``a*b + c`` can become one
    fused multiply-add, which rounds once instead of twice and changes the float64 normals
    in about 1% of draws (``specs/adapters-jax.md`` §6). A product that reaches its addition
    through a ``select`` cannot be contracted; the values are unchanged (the noise has no
    NaN). Calls to nested jaxprs (``jit``) are inlined so their products are guarded too.
    """

    def rule(name, values, bind, feeds_sum):
        outs = bind()
        if name == "mul" and (every_product or feeds_sum) and jnp.dtype(outs[0].dtype).name in guarded:
            return [guard(outs[0])]
        return outs

    return reemit(jaxpr, consts, args, rule)


def without_contraction(fn):
    """``fn`` (pytrees in and out) with every float64 product that feeds an addition kept
    from fused multiply-adds, NaN kept: the same bits whatever XLA fuses, so on every
    sharding (``specs/adapters-jax.md`` §11; the VGS statistics' float64 EMAs)."""

    def strict(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        with x64_scope():
            flat = _eval_without_contraction(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args),
                                            uncontracted)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), flat)

    return strict


def _lane_normals(words, strict: bool, version: int = 1):
    """The core's transform of noise format ``version`` (``rng.normals_from_words``,
    ``rng_v2.normals_from_words``) of each block's four words: the normals of lanes 0..3 as
    four arrays (float64; format 2's float32, widened exactly), one logarithm and one
    sine/cosine pair per two normals. ``strict``: evaluated without multiply-add contraction
    (of the format's float64 or float32 products)."""
    normals_from_words = _rng.normals_from_words if version == 1 else _rng_v2.normals_from_words

    def transform(*w):
        z = normals_from_words(jnp, *w).astype(jnp.float64)
        return tuple(z[:, lane] for lane in range(4))  # XLA folds these slices of the stack away

    if strict:
        closed = jax.make_jaxpr(transform)(*words)
        guarded = ("float64",) if version == 1 else ("float32",)
        guard = _opaque if version == 1 else _bit_round_trip
        return tuple(_eval_without_contraction(closed.jaxpr, closed.consts, list(words), guard, guarded,
                                               every_product=version == 2))
    return transform(*words)


def _check_static_index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _step_words(step):
    """``(step_lo, step_hi)`` uint32 of a concrete or traced step number."""
    if is_tracer(step) or isinstance(step, jax.Array):
        step = jnp.asarray(step)
        if not jnp.issubdtype(step.dtype, jnp.integer):
            raise TypeError(f"step must be an integer array, got {step.dtype}")
        wide = step.astype(jnp.uint64)
        return (wide & _MASK32).astype(jnp.uint32), (wide >> 32).astype(jnp.uint32)
    step = _check_static_index("step", step)
    return jnp.asarray(step & _MASK32, dtype=jnp.uint32), jnp.asarray(step >> 32, dtype=jnp.uint32)


def _materialised(fn, step_lo, *operands):
    """``fn(*operands)`` computed inside a ``lax.cond`` whose two branches are ``fn`` (the
    predicate, the step's parity, does not change the result): XLA materialises a
    conditional's results, whereas a plain expression is fused into every consumer element,
    so a Philox block would run once per lane and the transform once per lane of the
    element-order select."""
    return jax.lax.cond((step_lo & jnp.uint32(1)) == jnp.uint32(0), fn, fn, *operands)


def _block_normals(seed, step, first_block: int, num_blocks: int, strict: bool, version: int = 1):
    """The float64 normals of blocks ``first_block .. first_block + num_blocks - 1``, one
    array per lane: Philox (``mulhilo32`` from uint64 products), then the transform, each
    materialised once (:func:`_materialised`)."""
    step_lo, step_hi = _step_words(step)
    key = (seed & _MASK32, seed >> 32) if isinstance(seed, int) else (seed[0], seed[1])  # int or [lo, hi] words

    def words(lo, hi):
        pieces = []
        for block, n in _rng.counter_runs(first_block, num_blocks):
            counter = (jnp.arange(n, dtype=jnp.uint32) + jnp.uint32(block & _MASK32),
                       jnp.asarray(block >> 32, dtype=jnp.uint32), lo, hi)
            pieces.append(_rng.philox4x32_10(counter, key, wide=True))
        if len(pieces) == 1:
            return tuple(pieces[0])
        return tuple(jnp.concatenate([p[k] for p in pieces]) for k in range(4))

    block_words = _materialised(words, step_lo, step_lo, step_hi)
    return _materialised(lambda *w: _lane_normals(w, strict, version), step_lo, *block_words)


def _element_order(lanes):
    """The normals in element order: element ``4 b + l`` is lane ``l`` of block ``b``
    (``specs/noise.md`` §4), as a select over an iota (cheaper in XLA:CPU than a stack)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (lanes[0].shape[0], 4), 1)
    z = lanes[3][:, None]
    for k in (2, 1, 0):
        z = jnp.where(lane == k, lanes[k][:, None], z)
    return jnp.reshape(z, (-1,))


def _flat_normals(seed, step, start: int, count: int, strict: bool = True, version: int = 1):
    """float64 normals of logical indices ``start .. start + count - 1`` (``count > 0``)."""
    first_block, last_block = start // 4, (start + count - 1) // 4
    flat = _element_order(_block_normals(seed, step, first_block, last_block - first_block + 1, strict, version))
    return flat[start % 4:start % 4 + count]


def normals_at(seed, step, index, dtype):
    """The normals of the elements with global indices ``index`` (uint64, any shape), each
    drawn by itself: the Philox block ``index // 4``, the word pair of lane ``index % 4``
    (``w0, w1`` or ``w2, w3``), the cosine for even lanes, the sine for odd ones
    (``specs/noise.md`` §4). For blocks of a leaf that ``shard_map`` gives a device (strided
    indices); about twice the work per element of the contiguous draw."""
    step_lo, step_hi = _step_words(step)
    key = (seed & _MASK32, seed >> 32) if isinstance(seed, int) else (seed[0], seed[1])
    block = index >> jnp.uint64(2)
    lane = (index & jnp.uint64(3)).astype(jnp.uint32)
    counter = ((block & jnp.uint64(_MASK32)).astype(jnp.uint32), (block >> jnp.uint64(32)).astype(jnp.uint32),
               step_lo, step_hi)
    w0, w1, w2, w3 = (jnp.reshape(w, (-1,)) for w in _rng.philox4x32_10(counter, key, wide=True))
    low = jnp.reshape(lane < jnp.uint32(2), (-1,))
    radius, angle = jnp.where(low, w0, w2), jnp.where(low, w1, w3)
    cos_normal, sin_normal = _lane_normals((radius, angle, radius, angle), True)[:2]
    z = jnp.where(jnp.reshape((lane & jnp.uint32(1)) == jnp.uint32(0), (-1,)), cos_normal, sin_normal)
    return jnp.reshape(z, index.shape).astype(dtype)


def _check_range(start: int, count: int) -> None:
    if start % 4 + count >= 2**32:
        raise ValueError(f"at most 2**32 - 4 normals per call (positions are uint32), got {count}")


def standard_normals(seed, step, start, count, dtype=None, *, strict: bool = True, version: int = 1):
    """``upgd_ref.standard_normals(seed, step, start, count)`` computed with ``jax.numpy``.

    ``step`` may be traced (inside ``jax.jit``); ``seed``, ``start`` and ``count`` are Python
    ints (they fix the shape). ``dtype``: ``jnp.float32`` or ``jnp.float64`` (default
    float64; available also with ``jax_enable_x64`` off). ``strict=True`` keeps the values
    bit-identical to the core under ``jax.jit``; ``strict=False`` lets XLA contract
    multiply-adds (``specs/adapters-jax.md`` §6 gives the measured effect). ``version``: the
    noise format (``upgd_ref.rng.NOISE_VERSIONS``; 2 is ``specs/noise-v2.md``).
    """
    version = _rng.check_noise_version(version)
    seed = _check_static_index("seed", seed)
    start = _check_static_index("start", start)
    count = _check_static_index("count", count)
    with x64_scope():
        dtype = jnp.dtype(jnp.float64 if dtype is None else dtype)
        if dtype.name not in SUPPORTED_DTYPES:
            raise TypeError(f"noise dtype must be float32 or float64, got {dtype}")
        if count == 0:
            return jnp.zeros((0,), dtype=dtype)
        _check_range(start, count)
        if not is_tracer(step):  # eager: one compiled function for every step
            step = jnp.asarray(_check_static_index("step", step) if not isinstance(step, jax.Array) else step,
                               dtype=jnp.uint64)
            return _standard_normals_jit(seed, step, start, count, dtype, strict, version)
        return _standard_normals_body(seed, step, start, count, dtype, strict, version)


def _standard_normals_body(seed, step, start, count, dtype, strict, version=1):
    with x64_scope():
        return _flat_normals(seed, step, start, count, strict, version).astype(dtype)


_standard_normals_jit = jax.jit(_standard_normals_body, static_argnums=(0, 2, 3, 4, 5, 6))


def leaf_normals(leaves, seed, step):
    """Standard normals per leaf: leaf ``i`` takes logical indices from ``sum(sizes[:i])``;
    ``seed``: an int or the state's uint32 key words ``[lo, hi]`` (may be traced)."""
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    total = sum(sizes)
    if total == 0:
        return [jnp.zeros(leaf.shape, leaf.dtype) for leaf in leaves]
    _check_range(0, total)
    flat = _flat_normals(seed, step, 0, total)
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes):
        out.append(jnp.reshape(flat[offset:offset + size].astype(leaf.dtype), leaf.shape))
        offset += size
    return out


def noise(params, seed: int, step):
    """The standard normals that step ``step`` (1, 2, ...) of ``adaptive_upgd(seed=seed)``
    adds to ``params`` (a pytree), as a pytree of the leaves' shapes and dtypes.

    Equal to ``upgd_ref.noise(FlatLayout(shapes), seed, step)`` unpacked per leaf, leaves in
    ``jax.tree_util`` flatten order. ``step`` may be traced.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for i, leaf in enumerate(leaves):
        check_leaf_dtype(f"params leaf {i}", leaf)
    seed = _check_static_index("seed", seed)
    leaves = computed(leaves)  # 16-bit leaves: float32 normals, the ones their step adds (specs/precision.md §2)
    with x64_scope():
        if is_tracer(step):
            normals = leaf_normals(leaves, seed, step)
        else:  # eager: one compiled function for every step
            if not isinstance(step, jax.Array):
                step = _check_static_index("step", step)
            normals = _leaf_normals_jit(leaves, seed, jnp.asarray(step, dtype=jnp.uint64))
    return jax.tree_util.tree_unflatten(treedef, normals)


@functools.partial(jax.jit, static_argnums=1)
def _leaf_normals_jit(leaves, seed, step):
    with x64_scope():
        return leaf_normals(leaves, seed, step)
