"""Values and names of the production torch API, as the core takes them.

Hyper-parameters, step counts and state tensors arrive as Python numbers, 0-d or 1-element
tensors, NumPy scalars or arrays; the core takes Python numbers and flat NumPy arrays. The
production per-parameter state keys (``avg_utility``, ``sec_moment``, ...) are fields of
the core's flat state under other names, and the core's error messages name those fields
and segments: :func:`segment_note` says which parameter and which key they are.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re

import numpy as np
import torch

from upgd_ref.family import RefusedOption

#: The tensor dtypes the adapter takes, and the core's name for each (16-bit: specs/precision.md).
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}
#: The torch dtype of each core dtype name.
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

#: Each production per-parameter state key and the field of the core's flat state that holds it.
CORE_FIELD_OF_KEY = {"step": "segment_step", "avg_utility": "utility", "first_moment": "first_moment",
                     "sec_moment": "second_moment", "grad_norm_ema": "grad_norm_ema"}
#: The core's per-element state buffers (one value per parameter element, the rest are per segment).
CORE_TENSOR_FIELDS = ("utility", "first_moment", "second_moment")


def tensor_keys(state_keys) -> dict[str, str]:
    """The keys among ``state_keys`` whose values are tensors, each with its core field."""
    return {key: CORE_FIELD_OF_KEY[key] for key in state_keys if CORE_FIELD_OF_KEY[key] in CORE_TENSOR_FIELDS}


def describe_shape(p) -> str:
    """``of shape (4, 3)`` (or what ``p`` is instead), for naming a parameter in messages."""
    if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
        return "(uninitialized)"
    return f"of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else f"({type(p).__name__})"


def segment_note(exc: Exception, names) -> str:
    """The core's message with each ``segment N`` followed by the parameter it is, and core
    state fields followed by their production key."""
    def name(match):
        i = int(match.group(1))
        return f"{match.group(0)} ({names[i]})" if 0 <= i < len(names) else match.group(0)

    message = re.sub(r"segment (\d+)", name, str(exc))
    for key, field in CORE_FIELD_OF_KEY.items():
        quoted = f"'state.{field}'"
        message = message.replace(quoted, f"{quoted} (per-parameter {key!r})")
    return message


@contextlib.contextmanager
def named_errors(what: str, names):
    """Re-raise the core's ``ValueError``/``TypeError`` as ``what: message``, the message
    naming the parameters and keys (:func:`segment_note`); ``names[i]`` is segment ``i``'s."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{what}: {segment_note(exc, names)}") from exc


class UnsupportedOption(RefusedOption, NotImplementedError):
    """An option the algorithm refuses (``UPGDW(amsgrad=True)``): a ``ValueError`` as the
    reference raises it and a ``NotImplementedError`` as the production class raises it."""


@contextlib.contextmanager
def unsupported_options():
    """Re-raise the family table's :class:`~upgd_ref.family.RefusedOption` as :class:`UnsupportedOption`."""
    try:
        yield
    except RefusedOption as exc:
        if isinstance(exc, UnsupportedOption):
            raise
        raise UnsupportedOption(str(exc)) from None


def number_from_tensor(where: str, value, *, message: str | None = None):
    """A hyper-parameter as the core wants it: tensors become Python numbers, the rest is kept.
    A tensor of several elements is a ``ValueError`` (``message``, or one naming ``where``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(message or f"{where} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    return value


def one_element(key: str, value):
    """A constructor value as a number; a tensor must have one element (torch's message)."""
    return number_from_tensor(key, value, message=f"Tensor {key} must be 1-element")


def pair_value(where: str, value):
    """A pair hyper-parameter (``betas``) with each element as the core wants it; a value
    that is not a pair is returned as it is (the family table names the error)."""
    try:
        first, second = value
    except (TypeError, ValueError):
        return value
    return number_from_tensor(f"{where}[0]", first), number_from_tensor(f"{where}[1]", second)


def split_pair(where: str, key: str, value, names) -> tuple:
    """The two values of a pair argument (``betas``), each as the core takes them."""
    pair = pair_value(f"{where}{key}", value)
    if not isinstance(pair, tuple):
        raise ValueError(f"{where}{key} must be a pair ({', '.join(names)}), got {value!r}")
    return pair


def hyper_value(where: str, key: str, value):
    """One production hyper-parameter value for the core (truthy ints are flags, as in production)."""
    value = number_from_tensor(where, value)
    if key in ("adaptive_noise", "instant_noise_scale") and isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    return value


def step_count(where: str, value) -> int:
    """A per-parameter step count from an int, a 0-d tensor (torch.optim style) or NumPy scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}: 'step' must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: 'step' must be an int or a scalar tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"{where}: 'step' must be a non-negative integer, got {value}")
    return int(value)


def state_array(where: str, value, shape, dtype: np.dtype) -> np.ndarray:
    """A state tensor as a flat NumPy array of the state's ``dtype`` (cast as torch.optim does;
    for 16-bit parameters the state is float32, ``specs/precision.md``)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{where} must be a real floating dense tensor, got {value.dtype} ({value.layout})")
        value = value.detach().cpu()
        if value.dtype not in DTYPE_NAMES or value.dtype == torch.bfloat16:  # NumPy has no bfloat16
            value = value.double()
        value = value.numpy()
    elif isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"{where} must be a real floating array, got {value.dtype}")
    else:
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter has {tuple(shape)}")
    return np.asarray(value, dtype=dtype).reshape(-1)


def float_value(where: str, value) -> float:
    """A real number from a Python or NumPy number, or a tensor or array of one element."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != 1):
            raise ValueError(f"{where} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a float, got {type(value).__name__}")
    return float(value)


def check_torch_options(what: str, *, maximize, foreach, fused, capturable, differentiable) -> bool:
    """torch.optim's constructor options (``specs/adapters-torch.md`` §1.8); returns ``maximize``.

    ``foreach`` and ``fused`` choose between torch's implementations; every step here is one
    pass of the core's kernels over one flat buffer, so any value is accepted and changes
    nothing. ``capturable`` (CUDA-graph capture) and ``differentiable`` (autograd through the
    step) are not possible for a step that runs in NumPy/CuPy kernels outside autograd.
    """
    for name, value in (("maximize", maximize), ("capturable", capturable), ("differentiable", differentiable)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{what}: {name} must be a bool, got {type(value).__name__}")
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{what}: {name} must be a bool or None, got {type(value).__name__}")
    if capturable:
        raise ValueError(f"{what} does not support capturable=True: its step runs the upgd_ref kernels, which "
                         "synchronise with the host (CUDA graphs cannot capture them)")
    if differentiable:
        raise ValueError(f"{what} does not support differentiable=True: its step runs outside autograd")
    return bool(maximize)


def maximize_flag(group) -> bool:
    """A param group's ``maximize`` (absent: False); a 1-element tensor or 0/1 counts as its value."""
    value = number_from_tensor("maximize", group.get("maximize", False))
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    raise TypeError(f"param group 'maximize' must be a bool, got {value!r}")
