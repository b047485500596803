"""The host side of the ``tf.numpy_function`` bridge: NumPy in, one step of the core, NumPy
out (``specs/adapters-tensorflow.md``)."""

from __future__ import annotations

import copy
import re
import threading

import numpy as np

from upgd_ref import FlatLayout
from upgd_ref.hyperparams import segment_hyperparams, validate_vgs
from upgd_ref.optimizer import StepInfo
from upgd_ref.precision import state_dtype
from upgd_ref.state import FlatUPGDState, FlatVGSState
from upgd_ref.step import StepRequest, VGSRequest, upgd_step, vgs_factor

# A segment number in a core error message (named after its variable by CoreBridge).
_SEGMENT_RE = re.compile(r"\bsegment (\d+)")
# One core step at a time in this process: TensorFlow may run numpy_functions on several
# threads at once, and the Numba kernels' thread pool must not be entered concurrently.
_CORE_LOCK = threading.Lock()


class CoreBridge:
    """The host side of a step: NumPy in, the core classes, NumPy out.

    Holds no optimizer state between calls (the Keras variables do). Every call builds fresh
    flat buffers for what it returns: in a graph, TensorFlow aliases 64-byte-aligned
    ``numpy_function`` outputs instead of copying them, so a returned buffer must never be
    written again.
    """

    def __init__(self, shapes, dtype, names, make_core, *, moments=True):
        self.layout = FlatLayout(shapes, dtype=dtype)
        # u, m, v: float32 for 16-bit parameters (specs/precision.md §3), at the same offsets
        self.state_layout = self.layout.widened(state_dtype(dtype))
        self.names = tuple(names)
        self.core = make_core(self.layout)  # a core class of the family, with its variant
        self.moments = moments  # False: no moment variables cross the bridge (UPGD)
        self.last_step_info = None
        self.skipped_steps = 0  # steps the non-finite policy skipped (specs/algorithm.md §8), this process
        # The only buffer reused between calls: gradients are never handed back to TF.
        self.grad_buffer = self.layout.zeros()

    def _flat(self, indices, arrays, layout=None):
        """A fresh aligned flat buffer of ``layout`` (default: the parameters') holding
        ``arrays`` at segments ``indices`` (0 elsewhere)."""
        layout = self.layout if layout is None else layout
        flat = layout.zeros()
        for i, array in zip(indices, arrays):
            flat[layout.segment_slice(i)] = np.reshape(array, (-1,))
        return flat

    def _segments(self, flat, indices):
        layout = self.layout
        return [np.reshape(flat[layout.segment_slice(i)], layout.shapes[i]) for i in indices]

    def _explain(self, exc: Exception) -> Exception:
        """The core's error with its segment numbers translated to variable names."""
        message = str(exc)
        named = sorted({int(m) for m in _SEGMENT_RE.findall(message) if int(m) < len(self.names)})
        if named:
            message += " [" + ", ".join(f"segment {i} is variable {self.names[i]!r}" for i in named) + "]"
        explained = copy.copy(exc)  # its type and attributes (NonFiniteStepError's field, segment)
        explained.args = (message,)
        return explained

    def step(self, indices, param_groups, vgs_settings, lr, *arrays):
        """One core step with learning rate ``lr`` (a float).

        ``arrays``: per present variable (in ``indices`` order) the values, then likewise the
        gradients, utilities, first and second moments (these two only with ``moments``); then
        segment_step, grad_norm_ema, step, vgs_step, vgs_grad_mean_avg, vgs_grad_sq_avg.
        Returns the same without the gradients. Raises (so nothing is returned and nothing
        assigned) on bad input.
        """
        lr = float(lr)
        n = len(indices)
        blocks = 5 if self.moments else 3
        values, grads, utility, *moments = (arrays[k * n : (k + 1) * n] for k in range(blocks))
        first, second = moments if self.moments else ((), ())  # no moments: zero buffers, never read
        segment_step, grad_norm_ema, step, vgs_step, vgs_mean, vgs_square = arrays[blocks * n :]
        present = [False] * self.layout.num_segments
        for i in indices:
            present[i] = True
        groups = [dict(g, lr=lr) for g in param_groups]
        with _CORE_LOCK:
            core = self.core
            params = self._flat(indices, values)
            grad_buffer = self.grad_buffer
            if n < self.layout.num_segments:
                grad_buffer[...] = 0.0  # absent segments: not read, kept zero anyway
            for i, g in zip(indices, grads):
                grad_buffer[self.layout.segment_slice(i)] = np.reshape(g, (-1,))
            # Copies: TensorFlow hands numpy_function writable views of its own tensors.
            state = FlatUPGDState(
                step=int(step),
                segment_step=np.array(segment_step, dtype=np.int64),
                utility=self._flat(indices, utility, self.state_layout),
                first_moment=self._flat(indices, first, self.state_layout),
                second_moment=self._flat(indices, second, self.state_layout),
                grad_norm_ema=np.array(grad_norm_ema, dtype=np.float64),
                skipped_steps=self.skipped_steps,
            )
            vgs_state = FlatVGSState(
                int(vgs_step), np.array(vgs_mean, dtype=np.float64), np.array(vgs_square, dtype=np.float64)
            )
            try:
                _check_state(state, vgs_state)
                hyper = [core.MEMBER.tie(h) for h in segment_hyperparams(groups, self.layout.num_segments)]
                request = StepRequest(hyper=hyper, present=present, seed=core.seed, noise_norm=core.noise_norm,
                                      variant=core.variant, nonfinite=core.nonfinite)
                vgs = factor = variance = None
                if vgs_settings is not None:  # scale -> two-pass step -> statistics update, in one call
                    factor, variance = vgs_factor(vgs_state, vgs_settings)
                    vgs = VGSRequest(vgs_state, factor, validate_vgs(vgs_settings)["beta"])
                stats = upgd_step(self.layout, params, grad_buffer, state, request, vgs=vgs, backend=core.backend)
            except (ValueError, TypeError, OverflowError) as exc:
                raise self._explain(exc) from None
            self.skipped_steps = state.skipped_steps  # a skipped step wrote nothing: the outputs are the inputs
            self.last_step_info = StepInfo.from_stats(stats, state.step, request.present, factor, variance,
                                                      state.skipped_steps)
        moment_outputs = (
            (*self._segments(state.first_moment, indices), *self._segments(state.second_moment, indices))
            if self.moments else ()
        )
        return (
            *self._segments(params, indices),
            *self._segments(state.utility, indices),
            *moment_outputs,
            np.array(state.segment_step, dtype=np.int64),
            np.array(state.grad_norm_ema, dtype=np.float64),
            np.array(state.step, dtype=np.int64),
            np.array(vgs_state.step, dtype=np.int64),
            np.array(vgs_state.grad_mean_avg, dtype=np.float64),
            np.array(vgs_state.grad_sq_avg, dtype=np.float64),
        )


def _check_state(state: FlatUPGDState, vgs_state: FlatVGSState) -> None:
    """The invariants of the state-dict format (``specs/layout.md`` §4) on the Keras state.

    It comes from our own variables, so this only catches a corrupted or hand-edited
    checkpoint; it names the Keras variables. Only the per-segment and global counters are
    checked (O(S) per step), not every element.
    """
    if state.step < 0 or (state.segment_step < 0).any() or (state.segment_step > state.step).any():
        raise ValueError(
            f"optimizer variables 'upgd_step' ({state.step}) and 'segment_step' "
            f"({state.segment_step.tolist()}) are inconsistent: need 0 <= segment_step <= upgd_step"
        )
    if not (state.grad_norm_ema >= 0).all():
        raise ValueError(f"optimizer variable 'grad_norm_ema' must be >= 0, got {state.grad_norm_ema.tolist()}")
    if vgs_state.step < 0 or not (vgs_state.grad_sq_avg >= 0).all() or not np.isfinite(vgs_state.grad_mean_avg).all():
        raise ValueError("optimizer variables 'vgs_step', 'vgs_grad_mean_avg', 'vgs_grad_sq_avg' are corrupt")
