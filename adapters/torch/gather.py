r"""Parameters as real segments, and the ones whose storage cannot become a flat-buffer view.

A complex parameter of shape ``S`` is the real segment of shape ``S + (2,)`` that
``torch.view_as_real`` shows (torch's convention for complex optimizer steps): element
``(..., 0)`` is the real part, ``(..., 1)`` the imaginary part, so utility, norms, noise
indices and statistics see the pairs of reals (``specs/adapters-torch.md`` §2.2).

A parameter is *re-homed* (``p.data`` becomes a view of its segment) when its storage holds
nothing but it: dense, at offset 0, filling its storage, shared with no other parameter. Any
other one (a view ``t[..., 0]``, ``split``, ``narrow``, an expanded tensor, parameters aliasing
each other) is *gathered*: copied into its segment before every step and written back after a
committed one (:func:`write_back`), so it keeps aliasing whatever it aliases.
"""

from __future__ import annotations

import numpy as np
import torch

#: The real dtype of the pairs a complex dtype holds (complex32 has no NumPy counterpart).
REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def real_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of ``t``'s real segment."""
    return REAL_OF_COMPLEX.get(t.dtype, t.dtype)


def segment_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``t``'s real segment: ``t.shape``, with a trailing 2 for a complex tensor."""
    return tuple(t.shape) + ((2,) if t.is_complex() else ())


def as_real(t: torch.Tensor) -> torch.Tensor:
    """``t`` as real values (``torch.view_as_real`` of a complex tensor, no copy)."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def as_param(view: torch.Tensor, is_complex: bool) -> torch.Tensor:
    """A real segment view as its parameter sees it (complex: ``torch.view_as_complex``)."""
    return torch.view_as_complex(view) if is_complex else view


def real_value(value):
    """A state value as real pairs when it is a complex tensor (what ``state[p][...]`` and
    state dicts of complex parameters hold), else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_complex():
        return as_real(value)
    return value


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill a block of memory exactly once."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def owns_storage(t: torch.Tensor) -> bool:
    """Dense, at offset 0, and its storage holds exactly its elements."""
    nbytes = t.untyped_storage().nbytes()
    return t.storage_offset() == 0 and nbytes == t.numel() * t.element_size() and is_dense(t)


def rehome_plan(params, homed) -> list[bool]:
    """Per parameter, whether it is re-homed (True) or gathered (False).

    ``homed[k]``: parameter ``k`` is already a flat-buffer view of ours (taken over as is)."""
    users: dict[int, int] = {}
    for p in params:
        if p.numel():
            ptr = p.untyped_storage().data_ptr()
            users[ptr] = users.get(ptr, 0) + 1
    plan = []
    for p, ours in zip(params, homed):
        shared = p.numel() and users[p.untyped_storage().data_ptr()] > 1
        plan.append(p.numel() == 0 or ours or owns_storage(p) and not shared)
    return plan


def write_back(p: torch.Tensor, values: torch.Tensor) -> None:
    """``p``'s memory <- ``values`` (same shape and dtype), under ``no_grad``.

    Where several elements of ``p`` share one memory location (expanded strides), the
    location receives the value of the last of them in row-major order."""
    target = torch.view_as_real(p.data) if p.is_complex() else p.data
    values = as_real(values)
    if torch._debug_has_internal_overlap(target) == 0:
        target.copy_(values)
        return
    count = target.untyped_storage().nbytes() // target.element_size()
    index = torch.arange(count).as_strided(target.shape, target.stride(), target.storage_offset()).reshape(-1)
    index = index.numpy()
    _, first_from_end = np.unique(index[::-1], return_index=True)
    last = torch.from_numpy(index.size - 1 - first_from_end)
    memory = target.as_strided((count,), (1,), 0)
    memory[torch.from_numpy(index)[last].to(target.device)] = values.reshape(-1)[last.to(target.device)]
