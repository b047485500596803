r"""JAX front end: optax transformations for the VGS and the UPGD family
(:func:`adaptive_upgd`, :func:`upgd`, :func:`upgdw`).

Normative description: ``specs/adapters-jax.md``. Usage::

    import optax
    from upgd_ref.adapters.jax import adaptive_upgd, variance_gradient_scaler

    tx = optax.chain(
        variance_gradient_scaler(warmup_steps=100),
        adaptive_upgd(3e-4, adaptive_noise=True, sigma=0.01, seed=0),
    )
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

Two paths compute the same step:

* ``backend="native"`` (default): the core's Array-API reference functions
  (:mod:`upgd_ref.reference`, :mod:`upgd_ref.rng`) run with ``jax.numpy``. Works under
  ``jax.jit`` on any device with float64 support, compiles once. The leaves of the params
  pytree, in ``jax.tree_util`` flatten order, are the segments.
* ``backend="kernels"`` (eager only): the leaves are copied into the core's 64-byte aligned
  flat buffers (NumPy for CPU arrays; CuPy for CUDA GPU arrays, filled device to device), the
  core's stateful classes run the step with their fastest registered backend (the Numba
  kernels on the CPU, the CUDA kernels on a GPU), and the results come back as JAX arrays
  that share those buffers through DLPack. It is the cross-check of the native path.

This module contains no optimizer or noise math: every formula (the two-pass step, the VGS,
Philox, the Box-Muller transform) is a call into :mod:`upgd_ref`. What it adds is JAX
plumbing: pytrees, dtype promotion, the optax update convention (``updates = new_params -
params``), the float64 scope of the scalar state, the noise counter's block/lane indexing
(``specs/noise.md`` §4; the core's ``standard_normals`` takes the step as a Python int, so a
traced step needs it here), and an evaluator that keeps XLA from contracting the noise
transform's products into fused multiply-adds (which would change its float64 bits).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as _jcore

from upgd_ref import reference as _ref
from upgd_ref import rng as _rng
from upgd_ref.backends import BACKENDS as _CORE_BACKENDS
from upgd_ref.backends import check_backend_name as _check_core_backend
from upgd_ref.hyperparams import NOISE_NORMS, UPGD_DEFAULTS, VGS_DEFAULTS, validate_upgd, validate_vgs
from upgd_ref.layout import FlatLayout
from upgd_ref.family import MEMBERS, PAPER_EPS
from upgd_ref.state import FlatUPGDState, FlatVGSState
from upgd_ref.step import StepRequest, upgd_step, vgs_factor, vgs_scale_step, vgs_update_step

__all__ = [
    "AdaptiveUPGDState",
    "VarianceGradientScalerState",
    "adaptive_upgd",
    "upgd",
    "upgdw",
    "variance_gradient_scaler",
    "standard_normals",
    "noise",
    "restore_state",
    "x64_scope",
    "BACKENDS",
    "SUPPORTED_DTYPES",
]

BACKENDS = ("native", "kernels")
SUPPORTED_DTYPES = ("float32", "float64")
_MASK32 = 0xFFFFFFFF


# --- float64 scope --------------------------------------------------------------------


def x64_scope():
    """Context in which ``jax.numpy`` keeps float64/int64 even when ``jax_enable_x64`` is off.

    Entered *inside* a trace it makes that trace emit float64 operations (XLA supports them
    on CPU and GPU), so the scalar state (step counts, VGS statistics, gradient-norm
    averages) and the noise transform are float64 in both modes, as the core specifies.
    """
    enable = getattr(jax, "enable_x64", None)
    if callable(enable):  # jax >= 0.6: a configuration state usable as a context manager
        return enable(True)
    from jax.experimental import enable_x64  # older releases

    return enable_x64()


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _eager(*trees) -> bool:
    """True when the call runs eagerly: no traced input and no staging trace (``jax.jit``,
    ``lax.cond``) around it; ``lax.cond`` branches can close over concrete arrays, so the
    inputs alone do not tell."""
    if any(_is_tracer(x) for tree in trees for x in jax.tree_util.tree_leaves(tree)):
        return False
    return not _is_tracer(jnp.zeros(()) + 0)


# --- noise: the core's generator on jax.numpy -------------------------------------------

_ADDITIVE = frozenset({"add", "sub", "neg", "add_any"})
_INLINE_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})


def _opaque(x):
    """``x`` for every non-NaN value, through a ``select`` LLVM cannot fold into an FMA."""
    return jax.lax.select(x == x, x, jnp.zeros_like(x))


def _eval_without_contraction(jaxpr, consts, args):
    """Evaluate a jaxpr, passing every float64 product that feeds an addition through
    :func:`_opaque`.

    XLA:CPU compiles with floating-point contraction allowed, so ``a*b + c`` can become one
    fused multiply-add, which rounds once instead of twice and changes the float64 normals
    in about 1% of draws (``specs/adapters-jax.md`` §6). A product that reaches its addition
    through a ``select`` cannot be contracted; the values are unchanged (the noise has no
    NaN). Calls to nested jaxprs (``jit``) are inlined so their products are guarded too.
    """
    env = {}

    def read(v):
        return v.val if isinstance(v, _jcore.Literal) else env[v]

    feeds_sum = {v for e in jaxpr.eqns if e.primitive.name in _ADDITIVE for v in e.invars
                 if not isinstance(v, _jcore.Literal)}
    feeds_sum.update(v for v in jaxpr.outvars if not isinstance(v, _jcore.Literal))
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr")
        if eqn.primitive.name in _INLINE_CALLS and isinstance(inner, _jcore.ClosedJaxpr):
            outs = _eval_without_contraction(inner.jaxpr, inner.consts, values)
        else:
            outs = eqn.primitive.bind(*values, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            if (eqn.primitive.name == "mul" and eqn.outvars[0] in feeds_sum
                    and jnp.dtype(outs[0].dtype) == jnp.float64):
                outs = [_opaque(outs[0])]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, _jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _box_muller(radius_word, angle_word, strict: bool):
    """``(r*cos, r*sin)`` of the core's transform (``rng._normals_from_words``), float64.

    The core computes a whole block ``(w0, w1, w2, w3) -> 4 normals``; given the same word
    pair twice its lanes 0 and 1 are the cosine and sine normal of that pair, and XLA reduces
    the unused lanes away.
    """
    transform = functools.partial(_rng.normals_from_words, jnp)
    words = (radius_word, angle_word, radius_word, angle_word)
    if strict:
        closed = jax.make_jaxpr(transform)(*words)
        z = _eval_without_contraction(closed.jaxpr, closed.consts, list(words))[0]
    else:
        z = transform(*words)
    return z[:, 0], z[:, 1]


def _check_static_index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _step_words(step):
    """``(step_lo, step_hi)`` uint32 of a concrete or traced step number."""
    if _is_tracer(step) or isinstance(step, jax.Array):
        step = jnp.asarray(step)
        if not jnp.issubdtype(step.dtype, jnp.integer):
            raise TypeError(f"step must be an integer array, got {step.dtype}")
        wide = step.astype(jnp.uint64)
        return (wide & _MASK32).astype(jnp.uint32), (wide >> 32).astype(jnp.uint32)
    step = _check_static_index("step", step)
    return jnp.asarray(step & _MASK32, dtype=jnp.uint32), jnp.asarray(step >> 32, dtype=jnp.uint32)


def _philox_blocks(seed: int, step, first_block: int, num_blocks: int):
    """The four Philox words of blocks ``first_block .. first_block + num_blocks - 1``.

    Computed inside a ``lax.cond`` whose two branches are the same computation: XLA
    materialises a conditional's results, whereas a plain expression would be fused into
    every consumer element and so run once per lane, four times per block.
    """
    step_lo, step_hi = _step_words(step)
    key = (seed & _MASK32, seed >> 32)

    def words(operand):
        lo, hi = operand
        pieces = []
        for block, n in _rng.counter_runs(first_block, num_blocks):
            counter = (jnp.arange(n, dtype=jnp.uint32) + jnp.uint32(block & _MASK32),
                       jnp.asarray(block >> 32, dtype=jnp.uint32), lo, hi)
            pieces.append(_rng.philox4x32_10(counter, key))
        if len(pieces) == 1:
            return tuple(pieces[0])
        return tuple(jnp.concatenate([p[k] for p in pieces]) for k in range(4))

    return jax.lax.cond((step_lo & jnp.uint32(1)) == jnp.uint32(0), words, words, (step_lo, step_hi))


def _normals_at(words, local, dtype, strict: bool):
    """Normals of the elements at positions ``local`` (uint32) counted from the first block
    of ``words``: position ``j`` is lane ``j % 4`` of block ``j // 4`` (specs/noise.md §4)."""
    block = local >> jnp.uint32(2)
    lane = local & jnp.uint32(3)
    w0, w1, w2, w3 = (jnp.take(w, block) for w in words)
    # Lanes 0, 1 use (w0, w1), lanes 2, 3 use (w2, w3); even lanes the cosine, odd the sine.
    low = lane < jnp.uint32(2)
    cos_normal, sin_normal = _box_muller(jnp.where(low, w0, w2), jnp.where(low, w1, w3), strict)
    z = jnp.where((lane & jnp.uint32(1)) == jnp.uint32(0), cos_normal, sin_normal)
    return z.astype(dtype)


def _check_range(start: int, count: int) -> None:
    if start % 4 + count >= 2**32:
        raise ValueError(f"at most 2**32 - 4 normals per call (positions are uint32), got {count}")


def standard_normals(seed, step, start, count, dtype=None, *, strict: bool = True):
    """``upgd_ref.standard_normals(seed, step, start, count)`` computed with ``jax.numpy``.

    ``step`` may be traced (inside ``jax.jit``); ``seed``, ``start`` and ``count`` are Python
    ints (they fix the shape). ``dtype``: ``jnp.float32`` or ``jnp.float64`` (default
    float64; available also with ``jax_enable_x64`` off). ``strict=True`` keeps the values
    bit-identical to the core under ``jax.jit``; ``strict=False`` lets XLA contract
    multiply-adds (``specs/adapters-jax.md`` §6 gives the measured effect).
    """
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
        if not _is_tracer(step):  # eager: one compiled function for every step
            step = jnp.asarray(_check_static_index("step", step) if not isinstance(step, jax.Array) else step,
                               dtype=jnp.uint64)
            return _standard_normals_jit(seed, step, start, count, dtype, strict)
        return _standard_normals_body(seed, step, start, count, dtype, strict)


def _standard_normals_body(seed, step, start, count, dtype, strict):
    with x64_scope():
        first_block, last_block = start // 4, (start + count - 1) // 4
        words = _philox_blocks(seed, step, first_block, last_block - first_block + 1)
        local = jnp.arange(count, dtype=jnp.uint32) + jnp.uint32(start % 4)
        return _normals_at(words, local, dtype, strict)


_standard_normals_jit = jax.jit(_standard_normals_body, static_argnums=(0, 2, 3, 4, 5))


def _leaf_normals(leaves, seed: int, step):
    """Standard normals per leaf: leaf ``i`` takes logical indices from ``sum(sizes[:i])``."""
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    total = sum(sizes)
    if total == 0:
        return [jnp.zeros(leaf.shape, leaf.dtype) for leaf in leaves]
    _check_range(0, total)
    words = _philox_blocks(seed, step, 0, -(-total // 4))
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes):
        local = jnp.arange(size, dtype=jnp.uint32) + jnp.uint32(offset)
        out.append(jnp.reshape(_normals_at(words, local, leaf.dtype, True), leaf.shape))
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
        _check_leaf_dtype(f"params leaf {i}", leaf)
    seed = _check_static_index("seed", seed)
    with x64_scope():
        if _is_tracer(step):
            normals = _leaf_normals(leaves, seed, step)
        else:  # eager: one compiled function for every step
            if not isinstance(step, jax.Array):
                step = _check_static_index("step", step)
            normals = _leaf_normals_jit(leaves, seed, jnp.asarray(step, dtype=jnp.uint64))
    return jax.tree_util.tree_unflatten(treedef, normals)


@functools.partial(jax.jit, static_argnums=1)
def _leaf_normals_jit(leaves, seed, step):
    with x64_scope():
        return _leaf_normals(leaves, seed, step)


# --- states ----------------------------------------------------------------------------


class VarianceGradientScalerState(NamedTuple):
    """VGS state (``specs/algorithm.md`` §2.1): all arrays, float64/int64 in both x64 modes."""

    count: Any  # int64 scalar: k, completed statistics updates
    grad_mean_avg: Any  # float64 (S,): a_i
    grad_sq_avg: Any  # float64 (S,): b_i


class AdaptiveUPGDState(NamedTuple):
    """AdaptiveUPGD state (``specs/algorithm.md`` §3.1). ``utility``, ``first_moment`` and
    ``second_moment`` are pytrees shaped like the params."""

    count: Any  # int64 scalar: T, completed steps (noise counter T + 1, schedule argument T)
    segment_step: Any  # int64 (S,): t_i
    utility: Any  # u
    first_moment: Any  # m
    second_moment: Any  # v
    grad_norm_ema: Any  # float64 (S,): n_i


_WIDE_FIELDS = {"count": "int64", "segment_step": "int64", "grad_norm_ema": "float64",
                "grad_mean_avg": "float64", "grad_sq_avg": "float64"}


def restore_state(like, leaves):
    """A state with the structure, shapes and dtypes of ``like`` from saved ``leaves``.

    ``leaves``: a list in ``jax.tree_util.tree_leaves(like)`` order (for example the arrays
    of an ``.npz`` written from them) or a pytree of the same structure. The int64/float64
    leaves keep their width with ``jax_enable_x64`` off (``jnp.asarray`` alone would
    narrow them). Raises ``ValueError`` on a count or shape mismatch, ``TypeError`` on a
    dtype that does not convert exactly (for example float64 values into a float32 leaf).
    """
    like_leaves, treedef = jax.tree_util.tree_flatten(like)
    if not isinstance(leaves, (list, tuple)):
        structure = jax.tree_util.tree_structure(leaves)
        if structure != treedef:
            raise ValueError(f"saved state has structure {structure}, expected {treedef}")
        leaves = jax.tree_util.tree_leaves(leaves)
    leaves = list(leaves)
    if len(leaves) != len(like_leaves):
        raise ValueError(f"saved state has {len(leaves)} arrays, the state has {len(like_leaves)}")
    out = []
    with x64_scope():
        for i, (saved, template) in enumerate(zip(leaves, like_leaves)):
            saved = np.asarray(saved)
            if saved.shape != tuple(template.shape):
                raise ValueError(f"saved state array {i} has shape {saved.shape}, expected {tuple(template.shape)}")
            if saved.dtype != np.dtype(template.dtype):
                raise TypeError(f"saved state array {i} has dtype {saved.dtype}, expected {np.dtype(template.dtype)}")
            out.append(jnp.asarray(saved, dtype=template.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# --- input checks ------------------------------------------------------------------------


def _check_leaf_dtype(name: str, leaf) -> None:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} is a {type(leaf).__name__}, not an array")
    if np.dtype(dtype).name not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {np.dtype(dtype).name}; AdaptiveUPGD and the VGS take float32 or float64")


def _flatten_checked(role: str, tree, treedef, like_leaves):
    """Leaves of ``tree``, checked against ``treedef`` and the shapes/dtypes of ``like_leaves``."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    if structure != treedef:
        raise ValueError(
            f"{role} have pytree structure {structure}, but the state was initialised for {treedef}; "
            "the params pytree must keep its structure between init and update"
        )
    for i, (leaf, like) in enumerate(zip(leaves, like_leaves)):
        _check_leaf_dtype(f"{role} leaf {i}", leaf)
        if tuple(leaf.shape) != tuple(like.shape):
            raise ValueError(f"{role} leaf {i} has shape {tuple(leaf.shape)}, the state has {tuple(like.shape)}")
        if np.dtype(leaf.dtype) != np.dtype(like.dtype):
            raise TypeError(f"{role} leaf {i} has dtype {np.dtype(leaf.dtype)}, the state has {np.dtype(like.dtype)}")
    return leaves


def _check_wide(state, names, num_segments: int) -> None:
    """The scalar state must keep its int64/float64 width (a plain jnp.asarray narrows it)."""
    for name in names:
        value = getattr(state, name)
        expected = _WIDE_FIELDS[name]
        dtype = np.dtype(getattr(value, "dtype", type(value)))
        if dtype.name != expected:
            raise TypeError(
                f"state field {name!r} has dtype {dtype.name}, expected {expected}; restore saved states with "
                "upgd_ref.adapters.jax.restore_state (jnp.asarray narrows 64-bit arrays when jax_enable_x64 is off)"
            )
        shape = () if name == "count" else (num_segments,)
        if tuple(value.shape) != shape:
            raise ValueError(f"state field {name!r} has shape {tuple(value.shape)}, expected {shape}")


def _check_finite(role: str, leaves) -> None:
    """A non-finite value is an error naming the leaf (call only when :func:`_eager`)."""
    for i, leaf in enumerate(leaves):
        bad = ~np.isfinite(np.asarray(leaf))
        if bad.any():
            index = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
            raise ValueError(f"{role} leaf {i} holds a non-finite value at index {tuple(int(j) for j in index)}")


def _check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_eager(backend_name: str, *trees) -> None:
    if not _eager(*trees):
        raise TypeError(
            f"backend={backend_name!r} runs eagerly on host kernels and cannot be traced "
            "(jax.jit, jax.lax.cond, optax.apply_if_finite, jax.vmap); use the default backend='native'"
        )


# --- the kernel path: DLPack to and from the core's flat buffers ---------------------------


def _host(x) -> np.ndarray:
    """A read-only NumPy view of a CPU JAX array (DLPack, no copy)."""
    return np.from_dlpack(x)


def _to_jax(view: np.ndarray):
    """A JAX array sharing ``view``'s memory (64-byte aligned segments are not copied)."""
    return jnp.from_dlpack(view)


def _kernel_layout(leaves) -> FlatLayout:
    devices = {}
    for i, leaf in enumerate(leaves):
        device = next(iter(leaf.devices()))
        if device.platform not in ("cpu", "gpu", "cuda"):
            raise NotImplementedError(f"backend='kernels' takes CPU or CUDA GPU arrays (leaf {i} is on "
                                      f"{device.platform}); use backend='native' on other accelerators")
        if device.platform != "cpu" and "cupy" not in _CORE_BACKENDS:
            raise NotImplementedError(f"backend='kernels' on a GPU (leaf {i} is on {device}) needs CuPy "
                                      "(pip install cupy-cuda12x); or use backend='native'")
        devices.setdefault(device, i)
    if len(devices) > 1:
        raise ValueError(f"backend='kernels' needs every leaf on one device, got {sorted(map(str, devices))}")
    dtypes = {np.dtype(leaf.dtype).name for leaf in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"backend='kernels' needs one dtype for all leaves (one flat buffer), got {sorted(dtypes)}")
    return FlatLayout([tuple(leaf.shape) for leaf in leaves], dtypes.pop())


def _pack(layout: FlatLayout, leaves):
    """The leaves copied into a new flat buffer of the layout: NumPy for CPU arrays; for GPU
    arrays a CuPy buffer filled device to device from DLPack views (no host copy)."""
    if not leaves or next(iter(leaves[0].devices())).platform == "cpu":
        return layout.pack([_host(leaf) for leaf in leaves])
    import cupy

    with cupy.cuda.Device(next(iter(leaves[0].devices())).id):
        flat = cupy.zeros(layout.size, dtype=layout.dtype)
        for i, leaf in enumerate(leaves):
            flat[layout.segment_slice(i)] = cupy.from_dlpack(leaf).reshape(-1)
    return flat


# --- variance_gradient_scaler ----------------------------------------------------------------


def variance_gradient_scaler(enabled=VGS_DEFAULTS["enabled"], beta=VGS_DEFAULTS["beta"], alpha=VGS_DEFAULTS["alpha"],
                             eps=VGS_DEFAULTS["eps"], warmup_steps=VGS_DEFAULTS["warmup_steps"],
                             min_scaling_factor=VGS_DEFAULTS["min_scaling_factor"],
                             variance_cap=VGS_DEFAULTS["variance_cap"], *, backend="native",
                             kernel_backend="auto") -> optax.GradientTransformationExtraArgs:
    """The Variance Gradient Scaler as an optax transformation (``specs/algorithm.md`` §2).

    ``update(grads, state, params=None)`` returns ``f * grads`` with ``f`` computed from the
    statistics of the previous steps, and advances the statistics with those scaled
    gradients. Chain it *before* :func:`adaptive_upgd`. Segments are the leaves of the
    gradient pytree. ``kernel_backend``: the core backend of ``backend="kernels"``.
    """
    hp = validate_vgs(dict(enabled=enabled, beta=beta, alpha=alpha, eps=eps, warmup_steps=warmup_steps,
                           min_scaling_factor=min_scaling_factor, variance_cap=variance_cap))
    backend = _check_backend(backend)
    _check_core_backend(kernel_backend)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError("variance_gradient_scaler needs at least one array leaf")
        for i, leaf in enumerate(leaves):
            _check_leaf_dtype(f"params leaf {i}", leaf)
        with x64_scope():
            state = _ref.vgs_init(jnp, len(leaves))
        return VarianceGradientScalerState(state.step, state.grad_mean_avg, state.grad_sq_avg)

    @jax.jit
    def native(leaves, state):
        with x64_scope():
            core = _ref.VGSState(state.count, state.grad_mean_avg, state.grad_sq_avg)
            factor, _ = _ref.vgs_scaling_factor(core, **hp)
            scaled = _ref.vgs_scale(leaves, factor)
            new = _ref.vgs_update(core, scaled, beta=hp["beta"])
        return scaled, VarianceGradientScalerState(new.step, new.grad_mean_avg, new.grad_sq_avg)

    def kernels(leaves, state):
        _check_eager("kernels", leaves, state)
        layout = _kernel_layout(leaves)
        grads = _pack(layout, leaves)
        flat = FlatVGSState(int(state.count), np.array(state.grad_mean_avg, dtype=np.float64),
                            np.array(state.grad_sq_avg, dtype=np.float64))
        vgs_scale_step(layout, grads, vgs_factor(flat, hp)[0], backend=kernel_backend)
        vgs_update_step(layout, grads, flat, hp["beta"], backend=kernel_backend)
        with x64_scope():
            new = VarianceGradientScalerState(jnp.asarray(flat.step, dtype=jnp.int64),
                                              jnp.asarray(flat.grad_mean_avg), jnp.asarray(flat.grad_sq_avg))
        return [_to_jax(v) for v in layout.unpack(grads)], new

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        if not isinstance(state, VarianceGradientScalerState):
            raise TypeError(f"state must be a VarianceGradientScalerState, got {type(state).__name__}")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        num = state.grad_mean_avg.shape[0] if hasattr(state.grad_mean_avg, "shape") else -1
        if len(leaves) != num:
            raise ValueError(
                f"gradients have {len(leaves)} leaves (structure {treedef}), the VGS state was initialised "
                f"for {num}; the pytree must keep its structure between init and update"
            )
        for i, leaf in enumerate(leaves):
            _check_leaf_dtype(f"gradient leaf {i}", leaf)
        _check_wide(state, ("count", "grad_mean_avg", "grad_sq_avg"), num)
        if backend == "native" and _eager(leaves, state):
            _check_finite("gradient", leaves)
        scaled, new_state = (native if backend == "native" else kernels)(leaves, state)
        return jax.tree_util.tree_unflatten(treedef, scaled), new_state

    return optax.GradientTransformationExtraArgs(init, update)


# --- adaptive_upgd ------------------------------------------------------------------------------


def _learning_rate(learning_rate, count, leaves):
    """Per-leaf ``lr``: the float itself, or the schedule's value at ``count`` cast to each
    leaf's dtype (optax's convention for schedules)."""
    if not callable(learning_rate):
        return [learning_rate] * len(leaves)
    value = learning_rate(count)
    if not _is_tracer(value):
        lr = float(np.asarray(value))
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"the learning-rate schedule gave {lr} at count {int(count)}; lr must be finite and >= 0")
    return [jnp.asarray(value, dtype=leaf.dtype) for leaf in leaves]


def adaptive_upgd(learning_rate=UPGD_DEFAULTS["lr"], weight_decay=UPGD_DEFAULTS["weight_decay"],
                  beta_utility=UPGD_DEFAULTS["beta_utility"], sigma=UPGD_DEFAULTS["sigma"],
                  beta1=UPGD_DEFAULTS["beta1"], beta2=UPGD_DEFAULTS["beta2"], eps=None,
                  adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                  min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                  instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
                  noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *,
                  backend="native", kernel_backend="auto",
                  profile="production") -> optax.GradientTransformationExtraArgs:
    """AdaptiveUPGD (``specs/algorithm.md`` §3) as an optax transformation.

    Hyper-parameters and defaults as :class:`upgd_ref.AdaptiveUPGD` (``learning_rate`` is
    its ``lr`` and may be an optax schedule of the step count). ``update(grads, state,
    params)`` needs ``params`` and returns ``updates`` with ``optax.apply_updates(params,
    updates)`` = the new parameters. The noise is ``noise(params, seed, count + 1)``,
    bit-identical to :func:`upgd_ref.noise`. ``profile="paper"``: the original paper's
    Adam-style variant (``specs/algorithm.md`` §7; ``eps`` defaults to ``1e-5`` then).
    """
    variant = MEMBERS["AdaptiveUPGD"].variant(profile)
    if eps is None:
        eps = PAPER_EPS if profile == "paper" else UPGD_DEFAULTS["eps"]
    hyper = dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1, beta2=beta2,
                 eps=eps)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
    return _upgd_family("adaptive_upgd", variant, learning_rate, dict(hyper, **noisy), noise_norm, seed, backend,
                        kernel_backend)


def upgd(learning_rate=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001,
         adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
         min_noise_std=UPGD_DEFAULTS["min_noise_std"], instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
         noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *, backend="native",
         kernel_backend="auto", profile="production") -> optax.GradientTransformationExtraArgs:
    """Plain UPGD (no moments; ``specs/algorithm.md`` §7) as an optax transformation.

    The step of :class:`upgd_ref.UPGD`: ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)``;
    ``profile="paper"`` gives the paper's plain UPGD. The state has the same fields as
    :func:`adaptive_upgd`'s; ``first_moment`` and ``second_moment`` stay zero.
    """
    variant = MEMBERS["UPGD"].variant(profile)
    hyper = dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)

    # beta1, beta2, eps are unused without moments: the library defaults fill the validated dict.
    return _upgd_family("upgd", variant, learning_rate, dict(hyper, **noisy), noise_norm, seed, backend,
                        kernel_backend)


def upgdw(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, sigma=0.001,
          adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
          min_noise_std=UPGD_DEFAULTS["min_noise_std"], instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
          noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *, backend="native",
          kernel_backend="auto") -> optax.GradientTransformationExtraArgs:
    """UPGDW (``specs/algorithm.md`` §7) as an optax transformation: AdaptiveUPGD with the
    production UPGDW defaults and the utility decay tied to ``b2`` (``beta_utility = b2``),
    the step of :class:`upgd_ref.UPGDW`. ``b1``, ``b2``: optax's names for ``betas``."""
    variant = MEMBERS["UPGDW"].variant()
    hyper = dict(weight_decay=weight_decay, beta_utility=b2, sigma=sigma, beta1=b1, beta2=b2, eps=eps)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)

    return _upgd_family("upgdw", variant, learning_rate, dict(hyper, **noisy), noise_norm, seed, backend,
                        kernel_backend)


def _upgd_family(name, variant, learning_rate, hyper, noise_norm, seed, backend,
                 kernel_backend) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of one UPGD family member (``variant``, ``specs/algorithm.md``
    §7): the native path runs :func:`upgd_ref.reference.adaptive_upgd_step` with ``variant``,
    the kernel path :func:`upgd_ref.step.upgd_step` on flat buffers packed from the leaves."""
    hyper = validate_upgd(dict(hyper, lr=0.0 if callable(learning_rate) else learning_rate))
    if noise_norm not in NOISE_NORMS:
        raise ValueError(f"noise_norm must be one of {NOISE_NORMS}, got {noise_norm!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    seed = int(seed)
    backend = _check_backend(backend)
    _check_core_backend(kernel_backend)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError(f"{name} needs at least one array leaf in params")
        for i, leaf in enumerate(leaves):
            _check_leaf_dtype(f"params leaf {i}", leaf)
        with x64_scope():
            state = _ref.upgd_init(leaves, [hyper["noise_ema_init"]] * len(leaves))
        treedef = jax.tree_util.tree_structure(params)
        unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
        return AdaptiveUPGDState(state.step, state.segment_step, unflatten(state.utility),
                                 unflatten(state.first_moment), unflatten(state.second_moment), state.grad_norm_ema)

    @jax.jit
    def native(grads, params, state):
        with x64_scope():
            lrs = _learning_rate(learning_rate, state.count, params)
            per_leaf = [dict(hyper, lr=lr) for lr in lrs]
            normals = _leaf_normals(params, seed, state.count + 1)
            core = _ref.UPGDState(state.count, state.segment_step, state.utility, state.first_moment,
                                  state.second_moment, state.grad_norm_ema)
            new_params, new, _ = _ref.adaptive_upgd_step(params, grads, core, normals, per_leaf,
                                                         noise_norm=noise_norm, variant=variant)
            updates = [n - p for n, p in zip(new_params, params)]
        return updates, new

    def kernels(grads, params, state):
        _check_eager("kernels", grads, params, state)
        layout = _kernel_layout(params)
        lr = learning_rate
        if callable(learning_rate):
            with x64_scope():
                lr = _learning_rate(learning_rate, state.count, params[:1])[0]
            lr = float(np.asarray(lr, dtype=np.float64))
        flat = FlatUPGDState(
            step=int(state.count),
            segment_step=np.array(state.segment_step, dtype=np.int64),
            utility=_pack(layout, state.utility),
            first_moment=_pack(layout, state.first_moment),
            second_moment=_pack(layout, state.second_moment),
            grad_norm_ema=np.array(state.grad_norm_ema, dtype=np.float64),
        )
        request = StepRequest(hyper=[validate_upgd(dict(hyper, lr=lr))] * layout.num_segments, seed=seed,
                              noise_norm=noise_norm, variant=variant)
        flat_params = _pack(layout, params)
        old_params = flat_params.copy()
        upgd_step(layout, flat_params, _pack(layout, grads), flat, request, backend=kernel_backend)
        np.subtract(flat_params, old_params, out=flat_params)  # the optax update, in place
        with x64_scope():
            new = _ref.UPGDState(jnp.asarray(flat.step, dtype=jnp.int64), jnp.asarray(flat.segment_step),
                                 *[[_to_jax(v) for v in layout.unpack(getattr(flat, name))]
                                   for name in FlatUPGDState.BUFFERS],
                                 jnp.asarray(flat.grad_norm_ema))
        return [_to_jax(v) for v in layout.unpack(flat_params)], new

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"{name} needs the current params: call update(grads, state, params)")
        if not isinstance(state, AdaptiveUPGDState):
            raise TypeError(f"state must be an AdaptiveUPGDState, got {type(state).__name__}")
        like, treedef = jax.tree_util.tree_flatten(state.utility)
        grads = _flatten_checked("gradient", updates, treedef, like)
        leaves = _flatten_checked("params", params, treedef, like)
        for field in ("first_moment", "second_moment"):
            _flatten_checked(f"state.{field}", getattr(state, field), treedef, like)
        _check_wide(state, ("count", "segment_step", "grad_norm_ema"), len(like))
        if backend == "native" and _eager(grads, leaves, state):
            _check_finite("gradient", grads)
            _check_finite("params", leaves)
            with x64_scope():
                _learning_rate(learning_rate, state.count, leaves[:1])  # raises on an invalid value
        if backend == "native":
            upd, new = native(grads, leaves, _flat_state(state))
        else:
            upd, new = kernels(grads, leaves, _flat_state(state))
        unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
        new_state = AdaptiveUPGDState(new.step, new.segment_step, unflatten(new.utility),
                                      unflatten(new.first_moment), unflatten(new.second_moment), new.grad_norm_ema)
        return unflatten(upd), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _flat_state(state: AdaptiveUPGDState) -> AdaptiveUPGDState:
    """The state with its pytrees replaced by leaf lists (the core takes lists of segments)."""
    leaves = jax.tree_util.tree_leaves
    return AdaptiveUPGDState(state.count, state.segment_step, leaves(state.utility), leaves(state.first_moment),
                             leaves(state.second_moment), state.grad_norm_ema)
