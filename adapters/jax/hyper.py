"""Hyper-parameters and seeds as the JAX adapter takes them (``specs/adapters-jax.md`` §3.1).

A hyper-parameter is a Python number (validated when the transformation is built, by the
core's validation), a concrete array scalar (validated by its value, then used as the
array) or a traced one (``optax.inject_hyperparams`` under ``jax.jit``: used as given, not
checked, since its value does not exist yet). The step widens array hyper-parameters to
float64 (the core's scalar precision); :func:`upgd_ref.reference.coefficient` rounds them
to a leaf's dtype where they meet it, as a Python number would be. The seed becomes the
state's two uint32 key words ``(lo, hi)``, so it can be traced (``jax.vmap`` over seeds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from upgd_ref.step import check_seed

from .leaves import is_tracer, x64_scope

_MASK32 = 0xFFFFFFFF


def _is_array(value) -> bool:
    return isinstance(value, (jax.Array, np.ndarray)) or is_tracer(value)


def split_arrays(values: dict, defaults) -> tuple[dict, dict]:
    """``(plain, arrays)``: ``plain`` for the core's validation (a concrete array scalar as its
    Python value, a traced one as ``defaults[name]``, which stands in for it there), ``arrays``
    the array-valued entries as given. A non-scalar array is a ``ValueError`` naming it."""
    plain, arrays = {}, {}
    for name, value in values.items():
        if not _is_array(value):
            plain[name] = value
            continue
        if tuple(np.shape(value)) != ():
            raise ValueError(f"{name} must be a scalar, got an array of shape {tuple(np.shape(value))}")
        arrays[name] = value
        plain[name] = defaults[name] if is_tracer(value) else np.asarray(value).item()
    return plain, arrays


def widened(arrays: dict) -> dict:
    """Array hyper-parameters at the core's scalar precision: floats as float64, integers
    (``warmup_steps``) as int64 (call inside :func:`.leaves.x64_scope`)."""
    out = {}
    for name, value in arrays.items():
        value = jnp.asarray(value)
        out[name] = value.astype(jnp.int64 if jnp.issubdtype(value.dtype, jnp.integer) else jnp.float64)
    return out


def seed_words(seed):
    """The seed as the state's key words: uint32 ``(2,)`` ``[lo, hi]`` of a 64-bit seed.

    ``seed``: a Python int in ``[0, 2**64)`` (checked as the core checks it), an integer array
    scalar (concrete: checked the same way; traced: its low 64 bits), a ``jax.random`` key of
    the default ``threefry2x32`` implementation or a raw uint32 ``(2,)`` key: its words as
    ``jax.random.PRNGKey(s)`` stores ``s`` (high word first), so ``jax.random.key(s)`` and
    ``s`` give the same noise.
    """
    if not _is_array(seed):
        seed = check_seed(seed)
        return jnp.asarray([seed & _MASK32, seed >> 32], dtype=jnp.uint32)
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(seed))
        if impl != "threefry2x32" or seed.shape != ():
            raise TypeError(f"seed key must be one threefry2x32 jax.random key, got {impl} of shape {seed.shape}")
        seed = jax.random.key_data(seed)
    if seed.dtype == jnp.uint32 and tuple(seed.shape) == (2,):  # key words, high first
        return jnp.stack([seed[1], seed[0]])
    if not jnp.issubdtype(seed.dtype, jnp.integer) or seed.shape != ():
        raise TypeError(f"seed must be an int, an integer scalar array or a jax.random key, got {seed.dtype} "
                        f"of shape {tuple(seed.shape)}")
    if not is_tracer(seed):
        check_seed(int(np.asarray(seed)))
    with x64_scope():
        wide = jnp.asarray(seed).astype(jnp.uint64)
        return jnp.stack([(wide & _MASK32).astype(jnp.uint32), (wide >> 32).astype(jnp.uint32)])
