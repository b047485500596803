r"""The functional door: one step on caller-owned flat buffers and state.

:func:`upgd_step` plays the role ``torch.optim.adam.adam()`` plays between ``Adam`` and its
implementations: :class:`~upgd_ref.AdaptiveUPGD`, the JAX kernel path, the Keras bridge, the
torch adapter and golden replay all call it with their own buffers and state records.

It validates everything first (buffers, the :class:`StepRequest`, the :class:`VGSRequest`,
finiteness), so invalid input raises before anything is written, then runs the stages of
``specs/step.md``: the backend's local pass 1 and its per-segment reductions, their
combination (:func:`upgd_ref.stages.combine_reductions`), the float64 plan
(:func:`upgd_ref.stages.plan_step`), the backend's pass 2, and the commit of the
per-segment records (and, with ``vgs``, of the VGS statistics).

Example::

    >>> import numpy as np, upgd_ref
    >>> from upgd_ref.step import StepRequest, upgd_step
    >>> from upgd_ref.state import FlatUPGDState
    >>> layout = upgd_ref.FlatLayout([(3,)], dtype="float64")
    >>> params, grads = layout.pack([np.ones(3)]), layout.pack([np.full(3, 0.1)])
    >>> state = FlatUPGDState.zeros(layout, [1.0])
    >>> stats = upgd_step(layout, params, grads, state, StepRequest(hyper=[upgd_ref.hyperparams.UPGD_DEFAULTS]))
    >>> state.step, [int(t) for t in state.segment_step]
    (1, [1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import reference as ref
from .arrays import array_kind, to_numpy
from .backends import BACKENDS, auto_order, available_backends, select_backend
from .checkpoint import MAX_STEP
from .checks import (
    NonFiniteStepError, check_finite, check_flat_buffer, check_nonfinite_policy, check_not_aliased,
    check_present,
)
from .hyperparams import NOISE_NORMS, UPGD_DEFAULTS, CheckedHyperParams, check_coefficients, validate_upgd, validate_vgs
from .layout import FlatLayout
from .multi import MultiLayout, MultiUPGDState
from .reference import PRODUCTION, UPGDVariant, check_variant
from .rng import DEFAULT_NOISE_VERSION, check_noise_version, check_u64, noise_dtype
from .parts import backend_record, narrowed, step_parts, widened
from .precision import check_rounding, compute_dtype, is_low_precision, round_nearest
from .stages import (
    Refusal, combine_reductions, commit, part_plan, plan_step, refusal, segment_dtypes, vgs_commit, vgs_next,
)
from .state import FlatUPGDState, FlatVGSState

__all__ = [
    "StepRequest", "VGSRequest", "upgd_step", "check_vgs_request", "vgs_scale_step", "vgs_update_step", "vgs_factor", "check_seed",
    "check_noise_norm", "noise", "warmup", "warmup_steps",
]


def check_seed(seed, where: str = "") -> int:
    """``seed`` as an int in ``[0, 2**64)``: ``TypeError`` for a non-integer, ``ValueError`` out of range."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{where}seed must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"{where}seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def check_noise_norm(noise_norm, where: str = "") -> str:
    if noise_norm not in NOISE_NORMS:
        raise ValueError(f"{where}noise_norm must be one of {NOISE_NORMS}, got {noise_norm!r}")
    return noise_norm


@dataclass(frozen=True)
class StepRequest:
    """What one step computes, besides the buffers and the state.

    ``hyper``: one hyper-parameter dict per segment (validated here unless it came from
    :func:`upgd_ref.hyperparams.validate_upgd`); ``present``: one bool per segment (``None``:
    all present); ``seed``: the noise seed; ``noise_norm``: ``"segment"`` or ``"global"``;
    ``noise_version``: the noise format (``upgd_ref.rng.NOISE_VERSIONS``; 2: ``specs/noise-v2.md``);
    ``variant``: the member of the UPGD family (:class:`~upgd_ref.reference.UPGDVariant`);
    ``nonfinite``: what a step that would leave something non-finite does
    (``specs/algorithm.md`` §8): ``"raise"`` a :class:`~upgd_ref.checks.NonFiniteStepError`,
    or ``"skip"`` (nothing changes but ``state.skipped_steps``); ``rounding``: how new 16-bit
    parameters are rounded from their float32 values, ``"nearest"`` or ``"stochastic"``
    (``specs/precision.md``; no effect on float32 and float64 buffers).
    """

    hyper: Sequence[dict]
    present: Sequence[bool] | None = None
    seed: int = 0
    noise_norm: str = "segment"
    noise_version: int = DEFAULT_NOISE_VERSION
    variant: UPGDVariant = field(default=PRODUCTION)
    nonfinite: str = "raise"
    rounding: str = "nearest"

    def checked(self, num_segments: int) -> StepRequest:
        """This request with every field checked and normalised; raises naming the field."""
        hyper = list(self.hyper) if isinstance(self.hyper, (list, tuple)) else None
        if hyper is None or len(hyper) != num_segments:
            raise ValueError(f"request.hyper must be a list of one dict per segment ({num_segments}), "
                             f"got {type(self.hyper).__name__}")
        seen: dict[int, CheckedHyperParams] = {}
        for i, h in enumerate(hyper):
            if not isinstance(h, CheckedHyperParams):
                if not isinstance(h, dict):
                    raise TypeError(f"request.hyper[{i}] must be a dict, got {type(h).__name__}")
                if id(h) not in seen:
                    seen[id(h)] = validate_upgd(h, where=f"request.hyper[{i}]: ")
                hyper[i] = seen[id(h)]
        return StepRequest(hyper=hyper, present=check_present(self.present, num_segments),
                           seed=check_seed(self.seed, "request."),
                           noise_norm=check_noise_norm(self.noise_norm, "request."),
                           noise_version=check_noise_version(self.noise_version, "request."),
                           variant=check_variant(self.variant),
                           nonfinite=check_nonfinite_policy(self.nonfinite, "request."),
                           rounding=check_rounding(self.rounding, "request."))


@dataclass(frozen=True)
class VGSRequest:
    """The Variance Gradient Scaler's part of a fused step: its ``state`` (a
    :class:`~upgd_ref.state.FlatVGSState`, advanced in place), the factor ``f`` the
    gradients are scaled by (:func:`vgs_factor`) and the statistics' ``beta``."""

    state: FlatVGSState
    factor: float
    beta: float


def vgs_factor(state: FlatVGSState, hyperparams: dict) -> tuple[float, float]:
    """``(f, G)`` of the statistics in ``state`` under ``hyperparams`` (``specs/algorithm.md`` §2)."""
    hp = validate_vgs(hyperparams)
    with np.errstate(all="ignore"):
        f, g = ref.vgs_scaling_factor(ref.VGSState(np.int64(state.step), state.grad_mean_avg, state.grad_sq_avg),
                                      **hp)
    return float(f), float(g)


def check_vgs_request(vgs, layout) -> VGSRequest:
    """``vgs`` checked against ``layout`` (type, statistics shape, factor, beta, step count)."""
    if not isinstance(vgs, VGSRequest):
        raise TypeError(f"vgs must be a VGSRequest, got {type(vgs).__name__}")
    if not isinstance(vgs.state, FlatVGSState) or vgs.state.grad_mean_avg.shape != (layout.num_segments,):
        raise ValueError(f"vgs.state must be a FlatVGSState of {layout.num_segments} segments")
    factor, beta = float(vgs.factor), float(vgs.beta)
    if not (math.isfinite(factor) and 0.0 < factor <= 1.0):
        raise ValueError(f"vgs.factor must be in (0, 1], got {vgs.factor!r}")
    validate_vgs({"beta": beta}, where="vgs.")
    if vgs.state.step >= MAX_STEP:
        raise OverflowError(f"the statistics step count k has reached {MAX_STEP}, the largest a checkpoint can hold")
    return VGSRequest(vgs.state, factor, beta)


def _owned_buffers(parts, vgs: VGSRequest | None) -> dict:
    """The arrays a step keeps as state, by name: what ``params`` and ``grads`` must not overlap."""
    owned = {f"state{part.name}.{name}": getattr(part.owner, name)
             for part in parts for name in ("segment_step", "grad_norm_ema", *FlatUPGDState.BUFFERS)}
    if vgs is not None:
        owned.update({f"vgs.state.{name}": getattr(vgs.state, name) for name in FlatVGSState.ARRAYS})
    return owned


def upgd_step(layout: FlatLayout | MultiLayout, params, grads, state: FlatUPGDState | MultiUPGDState,
              request: StepRequest, *, vgs: VGSRequest | None = None, backend="auto") -> ref.StepStats:
    """One step of the UPGD family on flat buffers: ``params`` and ``state`` updated in place.

    ``params``, ``grads``: flat buffers of ``layout`` (NumPy, or CuPy on a GPU); ``state``: a
    :class:`~upgd_ref.state.FlatUPGDState` (its buffers follow ``params`` to their device);
    ``request``: a :class:`StepRequest`. ``vgs``: a :class:`VGSRequest`; then ``grads`` are
    scaled by ``f`` in place (so they must be writable) and the scaler's statistics advance
    from the scaled gradients, in the same read of the gradient. ``backend``: ``"auto"``, a
    registered name or a :class:`~upgd_ref.backends.Backend` (with several buffers, ``"auto"``
    picks one per buffer).

    Several buffers (one per (device, dtype)): ``layout`` a :class:`~upgd_ref.multi.MultiLayout`,
    ``params`` and ``grads`` one buffer per part, ``state`` a
    :class:`~upgd_ref.multi.MultiUPGDState`; the result does not depend on how the segments
    are grouped into buffers (``specs/step.md`` §3).

    Returns the step's :class:`~upgd_ref.reference.StepStats`. Invalid input raises before
    anything is modified; a segment with ``present[i] = False`` is left bit-identical.
    """
    parts = step_parts(layout, params, grads, state, writable_grads=vgs is not None)
    if not isinstance(request, StepRequest):
        raise TypeError(f"request must be a StepRequest, got {type(request).__name__}")
    request = request.checked(layout.num_segments)
    vgs = None if vgs is None else check_vgs_request(vgs, layout)
    owned = _owned_buffers(parts, vgs)
    for part in parts:
        check_not_aliased({"params" + part.name: part.params, "grads" + part.name: part.grads}, owned)
    dtypes = segment_dtypes(layout.dtypes if isinstance(layout, MultiLayout) else layout.dtype, layout.num_segments)
    wide = [compute_dtype(d) for d in dtypes]
    present = request.present
    for i, h in enumerate(request.hyper):
        if present[i]:
            check_coefficients(h, wide[i], request.variant, where=f"segment {i}: ")
    if state.step >= MAX_STEP:
        raise OverflowError(f"the step count has reached {MAX_STEP}, the largest a checkpoint can hold")
    check_u64("step", state.step + 1)

    factor = 1.0 if vgs is None else vgs.factor
    for part in parts:
        part.owner.follow(part.params)  # state lives where the parameters live
    parts = [widened(part) for part in parts]  # 16-bit parameters step in float32 copies
    impls = [select_backend(backend, part.params) for part in parts]
    local = []
    for part, impl in zip(parts, impls):
        local.append((part.segments, impl.first_pass(
            layout=part.layout, params=part.params, grads=part.grads, state=backend_record(part),
            present=[present[i] for i in part.segments], hyper=[request.hyper[i] for i in part.segments],
            vgs_factor=factor, variant=request.variant)))  # writes nothing
    reductions = combine_reductions(local, layout.num_segments)
    plan = plan_step(wide[0] if len(set(wide)) == 1 else np.float64, state, present, request.hyper,
                     reductions, request.noise_norm)
    vgs_new = None if vgs is None else vgs_next(vgs.state, reductions, layout.sizes, present, vgs.beta)
    refused = refusal(wide, plan, reductions, request.hyper, present, request.variant, vgs_new, storage=dtypes)
    if refused is None and plan.run:
        refused = _update(parts, impls, plan, request, factor)
    if refused is not None:
        if request.nonfinite == "skip":
            state.skipped_steps += 1
            return plan.stats._replace(skipped=True)
        _raise_refusal(refused, parts, present, request, factor)
    commit(state, plan)
    if vgs is not None:
        vgs_commit(vgs.state, vgs_new)
    return plan.stats


def _update(parts, impls, plan, request, factor):
    """The update stage: every part's pass 2, the parts that write only float32 copies first;
    their new values are narrowed to the caller's dtypes and checked before anything the
    caller owns is written (a 16-bit state can overflow where float32 does not). Returns a
    :class:`~upgd_ref.stages.Refusal` when that check fails, else ``None`` (all written)."""
    order = sorted(range(len(parts)), key=lambda k: not _in_copies(parts[k]))
    pending = []
    for k in order:
        part = parts[k]
        if not _in_copies(part) and pending:  # every copy checked: write them, then the rest in place
            _write(pending)
            pending = []
        impls[k].second_pass(layout=part.layout, params=part.params, grads=part.grads, state=backend_record(part),
                             present=[request.present[i] for i in part.segments],
                             hyper=[request.hyper[i] for i in part.segments],
                             plan=plan if len(parts) == 1 else part_plan(plan, part.segments, part.layout.dtype),
                             seed=request.seed, variant=request.variant, vgs_factor=factor,
                             noise_version=request.noise_version)
        if part.caller is not None:
            result = narrowed(part, present=request.present, rounding=request.rounding, seed=request.seed,
                              step=plan.step, scaled=factor != 1.0)
            if result.field is not None:
                return Refusal(result.field, result.segment,
                               f"{result.field}: segment {result.segment}: element {result.element} would overflow "
                               f"{part.caller.layout.dtype.name} when rounded to it")
            pending.extend(result.writes)
    _write(pending)
    return None


def _in_copies(part) -> bool:
    """Whether a part's update pass writes only copies (a widened part with a 16-bit state)."""
    return part.state_copied


def _write(writes) -> None:
    for target, values in writes:
        target[...] = values


def _raise_refusal(refused, parts, present, request, factor) -> None:
    """Raise :class:`~upgd_ref.checks.NonFiniteStepError` for a refused step, naming the
    segment (its global index) and, for a per-element refusal, the field and element (found
    on a host copy: this is the error path, never the hot one)."""
    if refused.field == "elements":
        i = refused.segment
        part = next(p for p in parts if i in p.segments)
        local, layout = part.segments.index(i), part.layout
        part_present = [j == i for j in part.segments]
        check_finite("grads", to_numpy(part.grads), layout, part_present, segment_ids=part.segments)
        check_finite("params", to_numpy(part.params), layout, part_present, segment_ids=part.segments)
        found = _first_nonfinite_trace(part, request, factor, local)
        if found is not None:
            name, element, value = found
            raise NonFiniteStepError(f"{name}: segment {i}: element {element} would become {value} "
                                     f"(an overflow of {layout.dtype.name}); nothing was changed",
                                     field=name, segment=i, element=element)
    raise NonFiniteStepError(f"{refused.message}; nothing was changed", field=refused.field, segment=refused.segment)


def _first_nonfinite_trace(part, request, factor, i):
    """``(field, element, value)`` of the first non-finite new ``u``, ``m``, ``v`` or update
    direction ``d`` of the part's local segment ``i``, from the reference formulas on host copies."""
    layout, state = part.layout, backend_record(part)
    h, dtype = request.hyper[part.segments[i]], layout.dtype
    g, p = (to_numpy(b)[layout.segment_slice(i)] for b in (part.grads, part.params))
    u, m, v = (to_numpy(getattr(state, name))[layout.segment_slice(i)] for name in FlatUPGDState.BUFFERS)
    t = int(state.segment_step[i]) + 1
    with np.errstate(all="ignore"):
        g = g * dtype.type(factor)
        fields = {"utility": ref.utility_trace_update(u, g, p, h["beta_utility"])}
        if request.variant.moments == "adam":
            m = ref.first_moment_update(m, g, h["beta1"])
            v = ref.second_moment_update(v, g, h["beta2"])
            m_hat = m * (1.0 / np.asarray(ref.bias_correction(h["beta1"], t), dtype=dtype)).astype(dtype)
            v_hat = v * (1.0 / np.asarray(ref.bias_correction(h["beta2"], t), dtype=dtype)).astype(dtype)
            fields.update(first_moment=m, second_moment=v, direction=m_hat / (np.sqrt(v_hat) + dtype.type(h["eps"])))
    for name, values in fields.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            return name, int(bad[0]), values[bad[0]]
    return None


def _scaler_call(layout, grads, present, backend, writable):
    """``(present, backend, layout, grads)`` checked; 16-bit gradients as an exact float32
    copy at the same offsets (``specs/precision.md``), which the caller narrows back."""
    present = check_present(present, layout.num_segments)
    check_flat_buffer("grads", grads, layout, writable=writable)
    if is_low_precision(layout.dtype):
        wide = compute_dtype(layout.dtype)
        layout, grads = layout.widened(wide), grads.astype(wide)
    return present, select_backend(backend, grads), layout, grads


def vgs_scale_step(layout: FlatLayout, grads, factor: float, present=None, *, backend="auto",
                   nonfinite: str = "raise") -> bool:
    """``g_i <- f g_i`` in place for the present segments (``f`` from :func:`vgs_factor`).

    Non-finite gradients raise :class:`~upgd_ref.checks.NonFiniteStepError` (``nonfinite=
    "raise"``) or leave ``grads`` as they are (``"skip"``; returns False). ``f <= 1`` cannot
    overflow a finite gradient."""
    nonfinite = check_nonfinite_policy(nonfinite)
    present, impl, wide_layout, wide = _scaler_call(layout, grads, present, backend, writable=True)
    if impl.nonfinite_counts(layout=wide_layout, buffer=wide, present=present).any():
        if nonfinite == "skip":
            return False
        check_finite("grads", to_numpy(wide), wide_layout, present)
    if factor != 1.0:
        impl.scale(layout=wide_layout, grads=wide, factor=factor, present=present)
        if wide is not grads:  # f g of 16-bit gradients: in float32, rounded once to nearest
            grads[...] = round_nearest(wide, layout.dtype)
    return True


def vgs_update_step(layout: FlatLayout, grads, state: FlatVGSState, beta: float, present=None, *,
                    backend="auto", nonfinite: str = "raise") -> bool:
    """Advance the VGS statistics in ``state`` from the (already scaled) gradients.

    When a gradient or a new statistic is not finite (``specs/algorithm.md`` §8) nothing
    changes: ``nonfinite="raise"`` raises :class:`~upgd_ref.checks.NonFiniteStepError`,
    ``"skip"`` adds 1 to ``state.skipped_steps`` and returns False."""
    nonfinite = check_nonfinite_policy(nonfinite)
    present, impl, layout, grads = _scaler_call(layout, grads, present, backend, writable=False)
    beta = validate_vgs({"beta": beta})["beta"]
    if not isinstance(state, FlatVGSState):
        raise TypeError(f"state must be a FlatVGSState, got {type(state).__name__}")
    check_not_aliased({"grads": grads}, {f"state.{name}": getattr(state, name) for name in FlatVGSState.ARRAYS})
    if state.step >= MAX_STEP:
        raise OverflowError(f"the statistics step count k has reached {MAX_STEP}, the largest a checkpoint can hold")
    sums = combine_reductions([(range(layout.num_segments), impl.gradient_sums(layout=layout, grads=grads,
                                                                               present=present))],
                              layout.num_segments)
    new = vgs_next(state, sums, layout.sizes, present, beta)
    finite = np.isfinite(sums.grad_sum) & np.isfinite(sums.grad_sq_sum) | ~np.asarray(present, dtype=np.bool_)
    finite &= np.isfinite(new.grad_mean_avg) & np.isfinite(new.grad_sq_avg)
    if not finite.all():
        if nonfinite == "skip":
            state.skipped_steps += 1
            return False
        check_finite("grads", to_numpy(grads), layout, present)
        bad = int(np.flatnonzero(~finite)[0])
        raise NonFiniteStepError(f"vgs: segment {bad}: the statistics a_i, b_i (or the gradient's sums) overflow "
                                 "float64; nothing was changed", field="vgs", segment=bad)
    vgs_commit(state, new)
    return True


def noise(layout, seed: int, step: int, dtype=None, *, out=None, backend: str = "auto",
          noise_version: int = DEFAULT_NOISE_VERSION):
    """The standard normals that optimizer step ``step`` with ``seed`` uses, as a flat buffer.

    Bit-identical for every backend: the definition is :func:`upgd_ref.rng.noise`
    (``specs/noise.md``); ``backend="auto"`` computes them with the fastest one (on the GPU
    when ``out`` is a CuPy array). ``out``: a writable, contiguous NumPy or CuPy buffer of the
    layout's length and of the noise dtype to fill (its padding is set to 0) instead of a new
    one. Without ``out``, ``backend="cupy"`` returns a CuPy array, the others NumPy.
    ``noise_version``: the noise format (``upgd_ref.rng.NOISE_VERSIONS``; 2 is
    ``specs/noise-v2.md``).
    """
    noise_version = check_noise_version(noise_version)
    if out is not None:
        _check_noise_out(out, layout, dtype)
    if backend == "auto":
        chosen = select_backend("auto", out) if array_kind(out) == "cupy" else BACKENDS[auto_order()[0]]
    else:
        chosen = select_backend(backend, out)  # bit-identical whichever computes them
    return chosen.noise(layout=layout, seed=seed, step=step, dtype=dtype, out=out, noise_version=noise_version)


def _check_noise_out(out, layout, dtype) -> None:
    expected = np.dtype(noise_dtype(layout) if dtype is None else dtype)
    if array_kind(out) not in ("numpy", "cupy"):
        raise TypeError(f"out must be a NumPy array (or a CuPy array on a GPU), got {type(out).__name__}")
    if out.shape != (layout.size,):
        raise ValueError(f"out must have shape ({layout.size},) for this layout, got {out.shape}")
    if out.dtype != expected:
        raise TypeError(f"out has dtype {out.dtype}; the noise dtype is {expected}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be contiguous")
    if array_kind(out) == "numpy" and not out.flags.writeable:
        raise ValueError("out is read-only")


def warmup_steps(backend, dtypes) -> None:
    """Run every operation of ``backend`` once per dtype on a tiny layout (an empty and an
    absent segment included) for each family mode, so its kernels are compiled."""
    family = ref.UPGDVariant(moments="none", protection="max", update_factor=2.0, noise_placement="terms")
    for dtype in dtypes:
        layout = FlatLayout([(3,), (0,), (4, 2)], dtype=dtype)
        hyper = [validate_upgd(dict(UPGD_DEFAULTS, adaptive_noise=True))] * layout.num_segments
        present = [True, True, False]
        params, grads = layout.zeros(), layout.zeros()
        params[...], grads[...] = 0.5, 0.25
        state = FlatUPGDState.zeros(layout, [1.0] * layout.num_segments)
        vgs_state = FlatVGSState.zeros(layout.num_segments)
        if array_kind(params) != backend.array_kind:
            continue
        backend.noise(layout=layout, seed=0, step=1)
        vgs_scale_step(layout, grads, 0.5, present, backend=backend)
        vgs_update_step(layout, grads, vgs_state, 0.99, present, backend=backend)
        for member in (PRODUCTION, family):  # the mode is a run-time argument: one compilation
            request = StepRequest(hyper=hyper, present=present, variant=member)
            upgd_step(layout, params, grads, state, request, backend=backend)
            upgd_step(layout, params, grads, state, request, vgs=VGSRequest(vgs_state, 0.5, 0.99), backend=backend)


def warmup(dtypes=("float32", "float64")) -> dict[str, float]:
    """Compile every kernel backend's kernels for ``dtypes`` now rather than on first use.

    Returns seconds per backend that compiles and can run here (Numba; the CUDA kernels with
    a GPU; their emulator with a C++ compiler). Numba, CuPy and the emulator cache what they
    compile on disk, so a later process loads it in well under a second.
    """
    return {name: BACKENDS[name].warmup(dtypes) for name in available_backends(emulators=True) if name != "reference"}
