"""Drop-in replacement for the production ``VarianceGradientScaler``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

import upgd_ref
from upgd_ref import reference
from upgd_ref.backends import check_backend_name
from upgd_ref.hyperparams import validate_vgs
from upgd_ref.layout import FlatLayout
from upgd_ref.state import VGS_FORMAT

from .buffers import bucket_run, check_grad, check_tensors, flat_buffer, on_stream
from .checkpoint import VGS_VERSION, read_vgs_state_dict, vgs_state_dict
from .conversions import DTYPE_NAMES, describe_shape, named_errors, step_count


class VarianceGradientScaler:
    """Drop-in replacement for the production ``VarianceGradientScaler``.

    Same constructor, methods, attributes (``enabled``, ``beta``, ``alpha``, ``eps``,
    ``warmup_steps``, ``min_scaling_factor``, ``variance_cap``, ``track_per_param``),
    logged metric names and state-dict format (``vgs_version`` ``"3.2"``); the factor and
    the statistics are computed by :class:`upgd_ref.VarianceGradientScaler`. ``backend``
    (keyword-only) selects the core backend.

    When the scaler's parameters are consecutive parameters of an :class:`AdaptiveUPGD`
    (e.g. both built from ``model.parameters()``), it works on that optimizer's flat
    gradient buffer directly; otherwise it copies the gradients to a buffer of its own.
    """

    def __init__(self, parameters=None, enabled=True, beta=0.99, alpha=0.1, eps=1e-8, warmup_steps=100,
                 track_per_param=False, logger=None, min_scaling_factor=0.1, variance_cap=50.0, *,
                 backend="auto"):
        if beta <= 0.0 or beta >= 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        if alpha < 0.0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
        if min_scaling_factor <= 0.0 or min_scaling_factor > 1.0:
            raise ValueError(f"min_scaling_factor must be in (0, 1], got {min_scaling_factor}")
        if variance_cap is not None and variance_cap <= 0.0:
            raise ValueError(f"variance_cap must be positive when set, got {variance_cap}")
        hyper = dict(enabled=bool(enabled), beta=float(beta), alpha=float(alpha), eps=float(eps),
                     warmup_steps=int(warmup_steps), min_scaling_factor=float(min_scaling_factor),
                     variance_cap=float(variance_cap) if variance_cap is not None else None)
        self._hyper = validate_vgs(hyper)
        self._backend = check_backend_name(backend)
        self.track_per_param = True  # as production: always per parameter
        self._logger = logger
        self._parameters = None
        self._core = None  # upgd_ref.VarianceGradientScaler, once there are statistics
        self._k = 0  # the step count while there is no core
        self._scratch = None
        if parameters is not None:
            self._attach(list(parameters), self._k)

    # production attributes, backed by one dict that is handed to the core at each use
    def _hyper_property(name):  # noqa: N805
        def get(self):
            return self._hyper[name]

        def set_(self, value):
            self._hyper[name] = value

        return property(get, set_, doc=f"The ``{name}`` hyper-parameter (validated when used).")

    enabled = _hyper_property("enabled")
    beta = _hyper_property("beta")
    alpha = _hyper_property("alpha")
    eps = _hyper_property("eps")
    warmup_steps = _hyper_property("warmup_steps")
    min_scaling_factor = _hyper_property("min_scaling_factor")
    variance_cap = _hyper_property("variance_cap")
    del _hyper_property

    @property
    def _step_count(self) -> int:
        return self._core.state.step if self._core is not None else self._k

    @_step_count.setter
    def _step_count(self, value) -> None:
        value = step_count("VarianceGradientScaler._step_count", value)
        if self._core is not None:
            self._core.state.step = value
        else:
            self._k = value

    @property
    def core(self):
        """The core scaler (None while the scaler has neither parameters nor statistics)."""
        return self._core

    def _new_core(self, layout: FlatLayout, step: int):
        core = upgd_ref.VarianceGradientScaler(layout, backend=self._backend, **validate_vgs(self._hyper))
        core.state.step = step
        return core

    def _attach(self, params, step: int) -> None:
        names = [f"parameters[{k}] {describe_shape(p)}" for k, p in enumerate(params)]
        if params:
            dtype = check_tensors(params, names, what="VarianceGradientScaler", rehome=False)
            layout = FlatLayout([tuple(p.shape) for p in params], DTYPE_NAMES[dtype])
            core = self._new_core(layout, step)
        else:
            core = None
        self._parameters, self._names, self._core, self._k, self._scratch = params, names, core, step, None

    def _push(self) -> None:
        self._core.hyperparams = validate_vgs(dict(self._hyper))

    def _log(self, key: str, value: float) -> None:
        if self._logger is None:
            return
        record = getattr(self._logger, "record", None)
        if callable(record):
            try:
                record(key, float(value))
            except Exception:  # noqa: BLE001 - as production: logging never breaks training
                pass

    def _grads(self):
        """``(flat NumPy gradient buffer, present, finish)`` for the current ``.grad``\\ s.

        ``finish(factor)`` publishes a successful operation: gradients copied into an
        optimizer's flat buffer are re-pointed there; with a private buffer, scaled values
        are copied back into ``.grad`` when the factor is not 1.
        """
        params, layout = self._parameters, self._core.layout
        run = bucket_run(params)
        if run is not None:
            bucket, start = run
            offset = bucket.layout.offsets[start]
            if all(bucket.layout.offsets[start + k] - offset == layout.offsets[k] for k in range(len(params))):
                present, copied = bucket.gather_grads(start, start + len(params))
                return bucket.grad_flat[offset: offset + layout.size], present, lambda factor: bucket.adopt_grads(copied)
        if self._scratch is None:
            self._scratch = flat_buffer(layout, params[0].device)
        buffer, views = self._scratch
        present = []
        with torch.no_grad():
            for name, p, view in zip(self._names, params, views):
                g = p.grad
                if g is None:
                    present.append(False)
                    continue
                check_grad(f"VarianceGradientScaler: {name}", g)
                present.append(True)
                view.copy_(g)

        def finish(factor):
            if factor != 1.0:
                with torch.no_grad():
                    for p, view, is_present in zip(params, views, present):
                        if is_present:
                            p.grad.copy_(view)

        return buffer, present, finish

    # --- production API ---------------------------------------------------------------

    def update_parameters(self, parameters) -> None:
        """Track ``parameters`` from now on; statistics restart at zero, the step count stays."""
        self._attach(list(parameters), self._step_count)

    def scale_gradients(self) -> float:
        """Multiply every present gradient by the factor in place; return the factor."""
        if self._parameters is None:
            return 1.0
        if self._core is None or self._core.layout.num_segments == 0:
            return self.get_scaling_factor()
        self._push()
        buffer, present, finish = self._grads()
        with named_errors("VarianceGradientScaler.scale_gradients", self._names), on_stream(self._parameters[0].device):
            factor = self._core.scale(buffer, present)
        finish(factor)
        return float(factor)

    def step(self) -> None:
        """Advance the step count and update the statistics from the (scaled) gradients."""
        if self._parameters and self._core is not None:
            self._push()
            buffer, present, finish = self._grads()
            with named_errors("VarianceGradientScaler.step", self._names), on_stream(self._parameters[0].device):
                self._core.update(buffer, present)
            finish(1.0)
        elif self._core is not None:
            self._core.state.step += 1
        else:
            self._k += 1
        self._log("vgs/normalized_variance", self.get_normalized_variance())
        self._log("vgs/scaling_factor", self.get_scaling_factor())
        self._log("vgs/step_count", float(self._step_count))
        self._log("vgs/warmup_active", float(self._step_count < self._hyper["warmup_steps"]))

    def get_scaling_factor(self) -> float:
        """The factor ``f`` the next :meth:`scale_gradients` applies."""
        if self._core is None:
            validate_vgs(dict(self._hyper))
            return 1.0  # no statistics: the normalised variance is 0
        self._push()
        return float(self._core.scaling_factor())

    def get_normalized_variance(self) -> float:
        """The 0.9 quantile of the per-parameter normalised variances, clipped to ``[0, 1e6]``
        (before ``variance_cap``, as the production method returns it)."""
        if self._core is None:
            return 0.0
        self._push()
        nv = self._core.segment_normalized_variances()
        return float(reference.vgs_global_variance(nv, variance_cap=None))

    def reset_statistics(self) -> None:
        """Step count and statistics back to zero."""
        if self._core is not None:
            self._core.reset_statistics()
        self._k = 0

    def state_dict(self) -> dict:
        """The production format (``vgs_version`` ``"3.2"``); statistics as float64 tensors."""
        core = self._core
        has_stats = core is not None and core.layout.num_segments > 0
        stats = (core.state.grad_mean_avg, core.state.grad_sq_avg, core.layout.sizes) if has_stats else None
        return vgs_state_dict(self._hyper, self._step_count, stats)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the production format (versions 3.1 and 3.2 keep statistics; older ones reset
        them with a warning, as production) or a core ``upgd_ref`` VGS state dict.

        Statistics may be float32 or float64 tensors, arrays, lists or None (no statistics
        yet). Invalid input raises and changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if state_dict.get("format") == VGS_FORMAT:
            self._load_core_format(state_dict)
            return
        tracked = len(self._parameters) if self._parameters is not None else None
        hyper, step, stats = read_vgs_state_dict(state_dict, self._hyper, tracked)
        # Everything is checked: apply.
        self._hyper = hyper
        if self._parameters:
            core = self._new_core(self._core.layout, step)
        elif stats is not None:
            core = self._new_core(FlatLayout([(0,)] * stats[0].shape[0], "float64"), step)
        else:
            core = None
        if core is not None and stats is not None:
            core.state.grad_mean_avg[...] = stats[0]
            core.state.grad_sq_avg[...] = stats[1]
        self._core, self._k = core, step

    def _load_core_format(self, state_dict) -> None:
        if self._core is None or not self._parameters:
            raise ValueError("a core-format VGS state dict needs the scaler's parameters (update_parameters first)")
        core = self._new_core(self._core.layout, 0)
        core.load_state_dict(state_dict)
        self._core, self._hyper = core, dict(core.hyperparams)

    # --- pickling (without parameters and logger, as production) -----------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_logger", "_parameters", "_scratch", "_names"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._logger = None
        self._parameters = None
        self._names = []
        self._scratch = None

    def __repr__(self) -> str:
        h = self._hyper
        return (
            f"VarianceGradientScaler(enabled={h['enabled']}, beta={h['beta']}, alpha={h['alpha']}, "
            f"eps={h['eps']}, warmup_steps={h['warmup_steps']}, min_scaling_factor={h['min_scaling_factor']}, "
            f"variance_cap={h['variance_cap']}, step_count={self._step_count}, version={VGS_VERSION})"
        )
