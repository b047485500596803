"""Drop-in replacement for the production ``VarianceGradientScaler``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

import upgd_ref
from upgd_ref import reference
from upgd_ref.backends import check_backend_name
from upgd_ref.hyperparams import validate_vgs
from upgd_ref.layout import FlatLayout
from upgd_ref.state import VGS_FORMAT, FlatVGSState
from upgd_ref.state import VGS_VERSION as CORE_VGS_VERSION  # checkpoint.VGS_VERSION is production's "3.2"
from upgd_ref.step import vgs_factor, vgs_scale_step, vgs_update_step

from .buffers import bucket_run, check_grad, check_tensors, flat_buffer, on_stream
from .gather import as_real, segment_shape
from .checkpoint import VGS_VERSION, read_vgs_state_dict, vgs_state_dict
from .conversions import DTYPE_NAMES, describe_shape, named_errors, step_count
from .dtensor import has_dtensors
from . import scaler_parts
from .spatial import SpatialAverages, finite_values, gradient_statistics, stochastic_variance_metrics


#: What the scaler does with NaN or infinite gradient values: ``"zero"`` (production's handling,
#: the default: they count as 0 in the statistics and are scaled as they are) or ``"raise"``
#: (a ``ValueError`` naming the parameter, nothing changed).
NONFINITE_POLICIES = ("zero", "raise", "skip")


class VarianceGradientScaler:
    """Drop-in replacement for the production ``VarianceGradientScaler``.

    Same constructor, methods, attributes (``enabled``, ``beta``, ``alpha``, ``eps``,
    ``warmup_steps``, ``min_scaling_factor``, ``variance_cap``, ``track_per_param``),
    logged metric names and state-dict format (``vgs_version`` ``"3.2"``), including
    production's ``update_statistics``, ``compute_gradient_statistics`` and deprecated
    spatial averages (:mod:`.spatial`). The scaler keeps its statistics in a
    :class:`~upgd_ref.state.FlatVGSState` record (:attr:`stats`) and computes the factor and
    the statistics through the functional door (:func:`upgd_ref.step.vgs_factor`,
    ``vgs_scale_step``, ``vgs_update_step``). Keyword-only: ``backend`` (the core backend)
    and ``nonfinite`` (``"zero"``: NaN/inf gradient values count as 0 in the statistics, as
    production handles them; ``"raise"``: a ``ValueError``; ``"skip"``: a step whose gradients
    are not finite changes nothing, neither the gradients nor the statistics nor ``k``, and
    counts in :attr:`skipped_steps`: the policy for ``torch.amp.GradScaler`` loops, whose
    overflow steps must leave everything as it was, ``specs/adapters-torch.md`` §3.7).

    When the scaler's parameters are consecutive parameters of an :class:`AdaptiveUPGD`
    (e.g. both built from ``model.parameters()``), it works on that optimizer's flat
    gradient buffer directly; otherwise it copies the gradients to a buffer of its own.
    """

    def __init__(self, parameters=None, enabled=True, beta=0.99, alpha=0.1, eps=1e-8, warmup_steps=100,
                 track_per_param=False, logger=None, min_scaling_factor=0.1, variance_cap=50.0, *,
                 backend="auto", nonfinite="zero"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
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
        self._nonfinite_policy = nonfinite
        self.track_per_param = True  # as production: always per parameter
        self._logger = logger
        self._parameters = None
        self._names = []
        self._layout = None  # the parameters' FlatLayout, while there are parameters
        self._parts = None
        self._stats = FlatVGSState.zeros(0)  # k and (a_i, b_i): one pair per tracked (or loaded) parameter
        self._spatial = SpatialAverages()  # production's deprecated averages, logging only
        self._scratch = None
        if parameters is not None:
            self._attach(list(parameters), 0)

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
        return self._stats.step

    @_step_count.setter
    def _step_count(self, value) -> None:
        self._stats.step = step_count("VarianceGradientScaler._step_count", value)

    # production's statistics attributes (read-only; ``specs/adapters-torch.md`` §3.6)
    def _spatial_property(key):  # noqa: N805
        return property(lambda self: getattr(self._spatial, key),
                        doc=f"Production's deprecated ``{key}`` average (None: not initialised).")

    _grad_mean_ema = _spatial_property("grad_mean_ema")
    _grad_var_ema = _spatial_property("grad_var_ema")
    _grad_norm_ema = _spatial_property("grad_norm_ema")
    _grad_max_ema = _spatial_property("grad_max_ema")
    del _spatial_property

    @property
    def _param_grad_mean_ema(self):
        """``a_i`` per parameter: a float64 tensor sharing memory with :attr:`stats` (None without statistics)."""
        return torch.from_numpy(self._stats.grad_mean_avg) if self._stats.grad_mean_avg.shape[0] else None

    @property
    def _param_grad_sq_ema(self):
        """``b_i`` per parameter: a float64 tensor sharing memory with :attr:`stats` (None without statistics)."""
        return torch.from_numpy(self._stats.grad_sq_avg) if self._stats.grad_sq_avg.shape[0] else None

    @property
    def _param_numel(self):
        """The tracked parameters' sizes as a float32 tensor (None without statistics)."""
        if not self._stats.grad_mean_avg.shape[0]:
            return None
        return torch.tensor([float(n) for n in self._stats_layout().sizes], dtype=torch.float32)

    @property
    def stats(self) -> FlatVGSState:
        """The scaler's statistics record (live): ``step`` (``k``), ``grad_mean_avg`` (``a_i``),
        ``grad_sq_avg`` (``b_i``), one pair per tracked parameter."""
        return self._stats

    @property
    def skipped_steps(self) -> int:
        """Steps skipped under ``nonfinite="skip"`` (kept in memory only: the production
        state-dict format has no place for it)."""
        return self._stats.skipped_steps

    def _stats_layout(self) -> FlatLayout:
        """The parameters' layout; without parameters, one empty float64 segment per statistic."""
        if self._layout is not None:
            return self._layout
        return FlatLayout([(0,)] * self._stats.grad_mean_avg.shape[0], "float64")

    @property
    def core(self):
        """A core :class:`upgd_ref.VarianceGradientScaler` equal to this one now (hyper-parameters,
        a copy of the statistics); None while there are no statistics (no parameters). A
        snapshot, for inspection and comparison: edits to it do not reach this scaler."""
        if self._stats.grad_mean_avg.shape[0] == 0:
            return None
        core = upgd_ref.VarianceGradientScaler(self._stats_layout(), backend=self._backend, **validate_vgs(self._hyper))
        core.load_state_dict(self._core_format())
        return core

    def _core_format(self) -> dict:
        return {"format": VGS_FORMAT, "version": CORE_VGS_VERSION, "num_segments": self._stats.grad_mean_avg.shape[0],
                "hyperparams": validate_vgs(self._hyper), "state": self._stats.to_state()}

    def _attach(self, params, step: int) -> None:
        names = [f"parameters[{k}] {describe_shape(p)}" for k, p in enumerate(params)]
        layout = parts = None
        if params:
            dtypes = check_tensors(params, names, what="VarianceGradientScaler")
            parts = scaler_parts.dtype_parts(params, dtypes)  # None: one dtype
            dtype = DTYPE_NAMES[dtypes[0]] if parts is None else "float64"  # several: the layout gives the sizes
            layout = FlatLayout([segment_shape(p) for p in params], dtype)
        stats = FlatVGSState(step, np.zeros(len(params)), np.zeros(len(params)))
        self._parameters, self._names, self._layout, self._stats, self._scratch = params, names, layout, stats, None
        self._parts = parts  # several dtypes: one door call per dtype (.scaler_parts)

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
        params, layout = self._parameters, self._layout
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
                check_grad(f"VarianceGradientScaler: {name}", g, p)
                present.append(True)
                view.copy_(as_real(g))

        def finish(factor):
            if factor != 1.0:
                with torch.no_grad():
                    for p, view, is_present in zip(params, views, present):
                        if is_present:
                            as_real(p.grad).copy_(view)

        return buffer, present, finish

    # --- production API ---------------------------------------------------------------

    def update_parameters(self, parameters) -> None:
        """Track ``parameters`` from now on; statistics restart at zero, the step count stays."""
        self._attach(list(parameters), self._step_count)

    def _present_grads(self) -> list[torch.Tensor]:
        return [as_real(p.grad) for p in self._parameters or () if p.grad is not None]  # complex: real pairs

    def _nonfinite(self) -> bool:
        """Whether a present gradient holds NaN or an infinity (checked only after the door
        refused the gradients, so a normal step pays nothing for it)."""
        return any(not bool(torch.isfinite(g).all()) for g in self._present_grads())

    def _refuse_dtensors(self, what: str) -> None:
        """Each rank holds only its rows of a DTensor's gradient: the scaler's sums come from the
        optimizer's fused step, which combines every rank's rows (``specs/distributed.md`` §3)."""
        if has_dtensors(self._parameters):
            raise RuntimeError(f"{what}: DTensor parameters (each rank holds only its rows of the gradient); pass "
                               "the scaler to the optimizer's step instead: optimizer.step(vgs=scaler)")

    def scale_gradients(self) -> float:
        """Multiply every present gradient by the factor in place; return the factor.

        Non-finite gradient values stay non-finite (multiplied by ``f`` as production does);
        the finite ones are scaled exactly as the core scales them.
        """
        if self._parameters is None:
            return 1.0  # nothing to scale (production, e.g. after unpickling)
        factor = self.get_scaling_factor()
        if not self._parameters:
            return factor
        self._refuse_dtensors("VarianceGradientScaler.scale_gradients")
        try:
            if self._parts is not None:
                scaler_parts.scale(self._parts, self._parameters, self._names, factor, backend=self._backend,
                                   nonfinite="skip" if self._nonfinite_policy == "skip" else "raise",
                                   what="VarianceGradientScaler.scale_gradients")
                return factor
            buffer, present, finish = self._grads()
            with named_errors("VarianceGradientScaler.scale_gradients", self._names), \
                    on_stream(self._parameters[0].device):
                scaled = vgs_scale_step(self._layout, buffer, factor, present, backend=self._backend,
                                        nonfinite="skip" if self._nonfinite_policy == "skip" else "raise")
            if not scaled:  # "skip": non-finite gradients are left exactly as they are
                return factor
        except ValueError:
            if self._nonfinite_policy == "raise" or not self._nonfinite():
                raise
            with torch.no_grad():  # g * dtype(f), the core's rounding; NaN * f stays NaN
                for g in self._present_grads():
                    g.mul_(torch.tensor(factor, dtype=g.dtype, device=g.device))
            return factor
        finish(factor)
        return factor

    def _update_per_parameter(self, beta: float, what: str) -> bool:
        """The door's statistics update (``k += 1``, ``a_i``, ``b_i``) from the present gradients;
        non-finite values count as 0 (production's NaN handling, ``specs/adapters-torch.md`` §3.6),
        or, under ``nonfinite="skip"``, nothing changes and the result is False."""
        self._refuse_dtensors(what)
        if self._parts is not None:
            rows = scaler_parts.update(self._parts, self._parameters, self._names, self._stats, beta,
                                       backend=self._backend, policy=self._nonfinite_policy, what=what)
            if rows is None:
                self._stats.skipped_steps += 1
                return False
            for index, record in rows:
                self._stats.grad_mean_avg[index] = record.grad_mean_avg
                self._stats.grad_sq_avg[index] = record.grad_sq_avg
            self._stats.step += 1
            return True
        buffer, present, finish = self._grads()
        device = self._parameters[0].device
        if self._nonfinite_policy == "skip":
            with named_errors(what, self._names), on_stream(device):
                updated = vgs_update_step(self._layout, buffer, self._stats, beta, present, backend=self._backend,
                                          nonfinite="skip")
            if updated:
                finish(1.0)
            return updated
        try:
            with named_errors(what, self._names), on_stream(device):
                vgs_update_step(self._layout, buffer, self._stats, beta, present, backend=self._backend)
        except ValueError:
            if self._nonfinite_policy == "raise" or not self._nonfinite():
                raise
            if self._scratch is None:
                self._scratch = flat_buffer(self._layout, device)
            finite, views = self._scratch
            with torch.no_grad():
                for p, view, is_present in zip(self._parameters, views, present):
                    if is_present:
                        view.copy_(finite_values(as_real(p.grad)))
            with named_errors(what, self._names), on_stream(device):
                vgs_update_step(self._layout, finite, self._stats, beta, present, backend=self._backend)
        finish(1.0)
        return True

    def update_statistics(self) -> None:
        """Production's statistics update without advancing ``k``: the per-parameter averages
        ``a_i``, ``b_i`` and the spatial averages from the present gradients; nothing when no
        parameter has a gradient."""
        grads = self._present_grads()
        if not grads:
            return
        beta = validate_vgs(self._hyper)["beta"]
        k = self._stats.step
        if not self._update_per_parameter(beta, "VarianceGradientScaler.update_statistics"):
            return
        self._stats.step = k
        self._spatial = self._spatial.advanced(gradient_statistics(grads), beta)

    def compute_gradient_statistics(self) -> dict:
        """``grad_norm``, ``grad_mean``, ``grad_var``, ``grad_max`` (of ``|g|`` over every element of
        the present gradients; :func:`.spatial.gradient_statistics`) and ``num_params`` (how
        many have a gradient)."""
        return gradient_statistics(self._present_grads())

    def step(self) -> None:
        """Advance the step count and update the statistics from the (scaled) gradients, then log."""
        grads = self._present_grads()
        beta = validate_vgs(self._hyper)["beta"]
        if self._parameters:
            if not self._update_per_parameter(beta, "VarianceGradientScaler.step"):
                return  # "skip": an overflow step leaves k, the statistics and the log as they were
        else:
            self._stats.step += 1
        if grads:
            self._spatial = self._spatial.advanced(gradient_statistics(grads), beta)
        if self._logger is not None:
            self._log_metrics(beta)

    def _log_metrics(self, beta: float) -> None:
        """Production's metrics, in its order (``specs/adapters-torch.md`` §3.3)."""
        stats = self._stats
        correction = 1.0 - beta ** stats.step
        metrics = {}
        if stats.grad_mean_avg.shape[0]:
            nv = reference.vgs_normalized_variances(reference.VGSState(np.int64(stats.step), stats.grad_mean_avg,
                                                                       stats.grad_sq_avg),
                                                    beta=beta, eps=validate_vgs(self._hyper)["eps"])
            metrics.update(stochastic_variance_metrics(np.asarray(nv)))
        metrics.update(self._spatial.metrics(correction))
        metrics.update({"vgs/normalized_variance": self.get_normalized_variance(),
                        "vgs/scaling_factor": self.get_scaling_factor(), "vgs/step_count": float(stats.step),
                        "vgs/warmup_active": float(stats.step < self._hyper["warmup_steps"])})
        for key, value in metrics.items():
            self._log(key, value)

    def _factor_and_variance(self, **override) -> tuple[float, float]:
        """``(f, G)`` of the statistics (:func:`upgd_ref.step.vgs_factor`); ``(1, 0)`` without
        statistics (the normalised variance of nothing is 0). Validates the hyper-parameters."""
        hyper = validate_vgs(dict(self._hyper, **override))
        if self._stats.grad_mean_avg.shape[0] == 0:
            return 1.0, 0.0
        return vgs_factor(self._stats, hyper)

    def get_scaling_factor(self) -> float:
        """The factor ``f`` the next :meth:`scale_gradients` applies."""
        return self._factor_and_variance()[0]

    def get_normalized_variance(self) -> float:
        """The 0.9 quantile of the per-parameter normalised variances, clipped to ``[0, 1e6]``
        (before ``variance_cap``, as the production method returns it)."""
        return self._factor_and_variance(variance_cap=None)[1]

    def reset_statistics(self) -> None:
        """Step count and statistics (per-parameter and spatial) back to zero / not initialised."""
        self._stats = FlatVGSState.zeros(self._stats.grad_mean_avg.shape[0])
        self._spatial = SpatialAverages()

    def state_dict(self) -> dict:
        """The production format (``vgs_version`` ``"3.2"``); statistics as float64 tensors."""
        stats = self._stats
        if stats.grad_mean_avg.shape[0] == 0:
            return vgs_state_dict(self._hyper, stats.step, None, self._spatial.to_dict())
        return vgs_state_dict(self._hyper, stats.step, (stats.grad_mean_avg, stats.grad_sq_avg, self._stats_layout().sizes),
                              self._spatial.to_dict())

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
        spatial = SpatialAverages.from_state_dict(state_dict)
        count = len(self._parameters) if self._parameters else (stats[0].shape[0] if stats is not None else 0)
        mean, square = stats if stats is not None else ([0.0] * count, [0.0] * count)
        record = FlatVGSState.from_state_dict(
            {"format": VGS_FORMAT, "version": CORE_VGS_VERSION,
             "state": {"step": step, "grad_mean_avg": np.asarray(mean, dtype=np.float64),
                       "grad_sq_avg": np.asarray(square, dtype=np.float64)}}, count)
        self._hyper, self._stats, self._spatial = hyper, record, spatial

    def _load_core_format(self, state_dict) -> None:
        if not self._parameters:
            raise ValueError("a core-format VGS state dict needs the scaler's parameters (update_parameters first)")
        record = FlatVGSState.from_state_dict(state_dict, len(self._parameters))
        hyper = state_dict.get("hyperparams")
        if not isinstance(hyper, dict):
            raise ValueError("state dict field 'hyperparams' must be a dict")
        self._hyper, self._stats = validate_vgs(hyper, where="state dict hyperparams: "), record

    # --- pickling (without parameters and logger, as production) -----------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_logger", "_parameters", "_scratch", "_names"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if "_core" in state:  # pickled before the scaler kept its own record: take the core's
            core, k = state.pop("_core"), state.pop("_k", 0)
            state["_stats"] = core.state if core is not None else FlatVGSState(k, np.zeros(0), np.zeros(0))
            state["_layout"] = core.layout if core is not None and core.layout.size else None
        state.setdefault("_spatial", SpatialAverages())
        state.setdefault("_nonfinite_policy", "zero")
        state.setdefault("_parts", None)
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
