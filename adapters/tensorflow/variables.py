"""The Keras variables of the optimizer: which variables it can optimize, and the state
variables it adds for them.

The state variables are created in one fixed order (that of ``optimizer.variables``, which
``model.save`` writes by position), with the names and dtypes of ``specs/adapters-tensorflow.md``;
changing either changes the saved-file format.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import numpy as np

from upgd_ref.precision import state_dtype
from upgd_ref.adapters.jax.words import host_float, host_int, host_words

#: 16-bit variables step in float32 with float32 ``u``, ``m``, ``v`` (specs/precision.md).
SUPPORTED_VARIABLE_DTYPES = ("float32", "float64", "float16", "bfloat16")
_STATE_NAMES = ("utility", "first_moment", "second_moment")


def variable_name(variable) -> str:
    """The variable's path (Keras 3) or name, for messages."""
    return str(getattr(variable, "path", None) or getattr(variable, "name", "?"))


def variables_dtype(owner: str, var_list) -> str:
    """The one dtype of ``var_list`` (one of ``SUPPORTED_VARIABLE_DTYPES``), checked: not empty, one supported
    dtype, fully defined shapes. ``owner``: the optimizer's class name, for messages."""
    if not var_list:
        raise ValueError(f"{owner} needs at least one variable to optimize")
    dtype_of = {id(v): keras.backend.standardize_dtype(v.dtype) for v in var_list}
    dtypes = sorted(set(dtype_of.values()))
    bad = [v for v in var_list if dtype_of[id(v)] not in SUPPORTED_VARIABLE_DTYPES]
    if bad:
        raise TypeError(
            f"{owner} supports {', '.join(SUPPORTED_VARIABLE_DTYPES)} variables; variable "
            f"{variable_name(bad[0])!r} is {dtype_of[id(bad[0])]}"
        )
    if len(dtypes) > 1:
        raise TypeError(f"{owner} needs all variables in one dtype (the core runs one flat layout); got {dtypes}")
    if any(None in tuple(v.shape) for v in var_list):
        raise ValueError(f"{owner} needs variables with fully defined shapes")
    return dtypes[0]


class StateVariables(NamedTuple):
    """The optimizer's state variables, in creation order (``specs/algorithm.md`` §2.1, §3.1)."""

    utility: list  # u, one per variable
    first_moment: list  # m, one per variable; empty without moments (UPGD)
    second_moment: list  # v, likewise
    segment_step: Any  # int64 (S,): t_i
    grad_norm_ema: Any  # float64 (S,): n_i
    upgd_step: Any  # int64 scalar: T
    vgs_step: Any  # int64 scalar: k
    vgs_grad_mean_avg: Any  # float64 (S,): a_i
    vgs_grad_sq_avg: Any  # float64 (S,): b_i


def _state_variable(optimizer, variable, state_name):
    """``u``, ``m`` or ``v`` of ``variable``: its shape, in ``state_dtype`` of its dtype
    (float32 for 16-bit variables), named as ``add_variable_from_reference`` names them."""
    dtype = state_dtype(keras.backend.standardize_dtype(variable.dtype)).name
    if dtype == keras.backend.standardize_dtype(variable.dtype):
        return optimizer.add_variable_from_reference(variable, name=state_name)
    name = str(getattr(variable, "path", None) or variable.name).replace("/", "_").replace(":", "_")
    name = f"{name}_{state_name}"
    return optimizer.add_variable(tuple(variable.shape), initializer="zeros", dtype=dtype, name=name)


def add_state_variables(optimizer: keras.optimizers.Optimizer, var_list, *, moments: bool,
                        noise_ema_init: float, words: bool = False) -> StateVariables:
    """Create the state variables of ``var_list`` on ``optimizer`` (its public ``add_variable``
    API); ``moments=False``: no moment variables (UPGD). ``words=True`` (the JAX backend, where
    variables cannot hold 64-bit values): each int64 / float64 value is a trailing axis of its
    two uint32 words ``[lo, hi]`` (``specs/adapters-jax.md`` §5.1), same names and order."""
    utility, first_moment, second_moment = (
        [_state_variable(optimizer, v, state_name) for v in var_list] if state_name == "utility" or moments else []
        for state_name in _STATE_NAMES
    )
    s = len(var_list)

    def scalar(shape, dtype, name, value=0):
        if words:
            bits = host_words(np.full(shape, value, dtype=dtype))
            return optimizer.add_variable(bits.shape, initializer=lambda shape, dtype=None: bits, dtype="uint32",
                                          name=name)
        return optimizer.add_variable(shape, initializer=keras.initializers.Constant(value), dtype=dtype, name=name)

    return StateVariables(
        utility, first_moment, second_moment,
        segment_step=scalar((s,), "int64", "segment_step"),
        grad_norm_ema=scalar((s,), "float64", "grad_norm_ema", noise_ema_init),
        upgd_step=scalar((), "int64", "upgd_step"),
        vgs_step=scalar((), "int64", "vgs_step"),
        vgs_grad_mean_avg=scalar((s,), "float64", "vgs_grad_mean_avg"),
        vgs_grad_sq_avg=scalar((s,), "float64", "vgs_grad_sq_avg"),
    )


def scalar_values(variables, words: bool) -> list:
    """The six scalar state variables' values as NumPy int64 / float64 (words joined)."""
    out = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in variables]
    if words:
        out = [host_int(x) if np.dtype(kind) == np.int64 else host_float(x)
               for x, kind in zip(out, ("int64", "float64", "int64", "int64", "float64", "float64"))]
    return out
