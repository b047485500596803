"""The comparator: a candidate trace checked step by step against the tolerance
contract (``specs/golden.md`` §3), and its report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..precision import compute_dtype, is_low_precision, spacing
from ..tolerances import (
    REDUCTION_ULPS, SCALAR_ULPS_F64, STATE_ULPS, low_precision_bound, unit_roundoff, upgd_step_bounds,
)
from ..trace import ELEMENT, FIELDS, SCALAR, SEGMENT
from .cases import EXACT_FIELDS, STATE_FIELDS, VGS_STATE_FIELDS, GoldenCase, join_segments
from .truth import ReferenceStep, reference_step


# --- the comparator -------------------------------------------------------------------------


@dataclass
class FieldReport:
    """One field at one step: error against the golden trajectory and against the contract."""

    step: int
    field: str
    max_abs: float  # max |candidate - golden|
    max_rel: float  # max |candidate - golden| / |golden|
    max_ulp: float  # max |candidate - golden| in ulps of the candidate's dtype at |golden|
    contract: float  # max |candidate - local truth| / bound (inf: an exact field differs)
    where: str  # the element with the largest contract ratio
    candidate: float
    truth: float
    bound: float

    @property
    def failed(self) -> bool:
        return not self.contract <= 1.0


@dataclass
class Comparison:
    case: str
    dtype: str
    steps: int
    fields: list
    missing: list
    reports: list = field(default_factory=list)

    @property
    def failures(self) -> list:
        return [r for r in self.reports if r.failed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def first_divergence(self) -> FieldReport | None:
        failures = self.failures
        return failures[0] if failures else None

    def to_dict(self) -> dict:
        def plain(x):
            return x if not isinstance(x, float) or math.isfinite(x) else str(x)

        return {"case": self.case, "dtype": self.dtype, "steps": self.steps, "passed": self.passed,
                "fields": self.fields, "missing": self.missing,
                "reports": [{k: plain(v) for k, v in vars(r).items()} for r in self.reports]}


class TraceError(ValueError):
    """The trace cannot be compared (missing fields, wrong shapes): not a numerical failure."""


def required_fields(case: GoldenCase) -> list[str]:
    """Fields a trace must hold to be checked step by step (``specs/golden.md`` §3)."""
    needed = list(STATE_FIELDS)
    if any(h["adaptive_noise"] for h in case.hyper):
        needed.append("grad_norm_ema")
    if case.vgs is not None:
        needed.extend(VGS_STATE_FIELDS)
    return needed


def _check_shapes(case: GoldenCase, trace: dict) -> None:
    t, n, s = case.steps, case.layout.num_logical, case.layout.num_segments
    expected = {ELEMENT: (t, n), SEGMENT: (t, s), SCALAR: (t,)}
    for name, value in trace.items():
        shape = (n,) if name == "params0" else expected[FIELDS[name][0]]
        if value.shape != shape:
            raise TraceError(f"trace field {name!r} has shape {value.shape}, case {case.name!r} needs {shape}")
        if name not in ("present", "segment_step") and not np.issubdtype(value.dtype, np.floating):
            raise TraceError(f"trace field {name!r} must be floating point, got {value.dtype}")
    if is_low_precision(case.dtype):  # a 16-bit case: values of its dtype (in it or float32), or float64
        params = trace["params"]
        if params.dtype.name != "float64" and (params.dtype.name not in (case.dtype.name, "float32") or not np.array_equal(
                params.astype(case.dtype).astype(params.dtype), params, equal_nan=True)):
            raise TraceError(f"trace field 'params' must hold {case.dtype.name} values (as {case.dtype.name} or "
                             f"float32), or be float64, for case {case.name!r}, got {params.dtype} values")
    elif trace["params"].dtype.name not in ("float32", "float64"):
        raise TraceError(f"trace field 'params' must be float32 or float64, got {trace['params'].dtype}")


def candidate_dtype(case: GoldenCase, trace: dict) -> np.dtype:
    """The dtype the contract judges: the case's for a 16-bit case, else the trace's ``params``'."""
    return case.dtype if is_low_precision(case.dtype) else trace["params"].dtype


def _ratios(candidate, truth, bound) -> np.ndarray:
    """``|candidate - truth| / bound`` per element: 0 when equal (NaN == NaN), inf when one is NaN."""
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), truth.shape).reshape(-1)
    error = np.abs(candidate - truth)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0.0, 0.0, error / bound)
    same_nan = np.isnan(candidate) & np.isnan(truth)
    one_nan = np.isnan(candidate) ^ np.isnan(truth)
    return np.where(same_nan, 0.0, np.where(one_nan, np.inf, ratio))


def _golden_errors(candidate, golden, dtype) -> tuple[float, float, float]:
    """Max absolute, relative and ulp error of the candidate against the golden trajectory."""
    c = np.asarray(candidate, dtype=np.float64).reshape(-1)
    g = np.asarray(golden, dtype=np.float64).reshape(-1)
    if not c.size:
        return 0.0, 0.0, 0.0
    both_nan = np.isnan(c) & np.isnan(g)
    error = np.where(both_nan, 0.0, np.abs(c - g))
    error = np.where(np.isnan(error), np.inf, error)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(error == 0.0, 0.0, error / np.abs(g))
        gap = (spacing(np.nan_to_num(g), dtype) if is_low_precision(dtype)
               else np.spacing(np.abs(np.nan_to_num(g)).astype(dtype)).astype(np.float64))
        ulp = np.where(error == 0.0, 0.0, error / gap)
    return float(error.max()), float(np.nanmax(rel)), float(np.nanmax(ulp))


def _where(case: GoldenCase, name: str, index: int) -> str:
    kind = FIELDS[name][0] if name in FIELDS else ELEMENT
    if kind == SCALAR:
        return "-"
    if kind == SEGMENT:
        return f"segment {index}"
    layout = case.layout
    # Zero-size segments share their offset with the next one; side="right" skips them.
    segment = int(np.searchsorted(np.asarray(layout.logical_offsets), index, side="right") - 1)
    return f"segment {segment} element {index - layout.logical_offsets[segment]}"


def _relative_bound(u: float, terms, scale) -> np.ndarray:
    """The contract's reduction rule: ``(REDUCTION_ULPS * u + n * 2**-53) * scale``."""
    return (REDUCTION_ULPS * u + np.asarray(terms, dtype=np.float64) * 2.0**-53) * np.abs(scale)


def step_bounds(case: GoldenCase, step: ReferenceStep, dtype, present) -> dict:
    """Allowed |candidate - truth| per field at one step (``specs/golden.md`` §3); a 16-bit
    candidate's arithmetic is float32's (its state fields: :func:`upgd_ref.tolerances.low_precision_bound`, in :func:`compare`)."""
    dtype = compute_dtype(dtype)
    u = unit_roundoff(dtype)
    sizes = case.layout.sizes
    per_segment = upgd_step_bounds(step.scales, dtype, sizes)
    bounds = {name: join_segments(per_segment[name]) for name in STATE_FIELDS}
    bounds["grad_norm"] = per_segment["grad_norm"]
    terms = sizes if case.config.noise_norm == "segment" else [sum(s for s, p in zip(sizes, present) if p)] * len(sizes)
    bounds["noise_std"] = _relative_bound(u, terms, step.values["noise_std"])
    bounds["grad_norm_ema"] = _relative_bound(u, terms, step.scales["grad_norm_ema"])
    scale_u = [s for s, p in zip(step.scales["utility"], present) if p and s.size]
    extreme = STATE_ULPS * u * max((float(np.max(s)) for s in scale_u), default=0.0)
    bounds["utility_min"] = bounds["utility_max"] = extreme
    if step.vgs_scales is not None:
        for name in ("vgs_factor", "vgs_normalized_variance"):
            bounds[name] = SCALAR_ULPS_F64 * 2.0**-53 * abs(step.values[name])
        for name in VGS_STATE_FIELDS:
            bounds[name] = _relative_bound(u, sizes, step.vgs_scales[name])
    return bounds


def _report(case, k, name, candidate, golden, truth, bound, dtype) -> FieldReport:
    ratios = _ratios(candidate, truth, bound)
    worst = int(np.argmax(ratios)) if ratios.size else 0
    flat = lambda x: np.asarray(x, dtype=np.float64).reshape(-1)  # noqa: E731
    pick = lambda x: float(flat(x)[worst]) if flat(x).size else math.nan  # noqa: E731
    return FieldReport(
        k, name, *_golden_errors(candidate, golden, dtype),
        contract=float(ratios.max()) if ratios.size else 0.0, where=_where(case, name, worst),
        candidate=pick(candidate), truth=pick(truth),
        bound=pick(np.broadcast_to(np.asarray(bound, dtype=np.float64), flat(truth).shape)),
    )


def compare(case: GoldenCase, trace: dict, *, per_step_callback=None) -> Comparison:
    """Check a candidate trace (field -> stacked array) against ``case`` (``specs/golden.md`` §3)."""
    trace = {k: np.asarray(v) for k, v in trace.items()}
    missing_required = [f for f in required_fields(case) if f not in trace]
    if missing_required:
        raise TraceError(f"trace lacks required field(s) {missing_required} for case {case.name!r}")
    if case.vgs is None and any(f.startswith("vgs_") for f in trace):
        raise TraceError(f"case {case.name!r} has no VGS but the trace has VGS fields")
    _check_shapes(case, trace)
    dtype = candidate_dtype(case, trace)
    gold = case.arrays
    fields = [f for f in ("params0", *FIELDS) if f in trace]
    result = Comparison(case.name, dtype.name, case.steps, fields,
                        [f for f in ("params0", *FIELDS) if f in gold and f not in trace])
    if "params0" in trace:
        result.reports.append(_report(case, 0, "params0", trace["params0"], gold["params0"], gold["params0"], 0.0, dtype))
    prev = case.initial_state()
    if "params0" in trace:
        prev["params"] = trace["params0"]
    for k in range(1, case.steps + 1):
        row = k - 1
        present = [bool(b) for b in gold["present"][row]]
        step = reference_step(case, k, prev)
        if case.vgs is not None and "vgs_factor" in trace:
            truth_f, candidate_f = step.values["vgs_factor"], float(trace["vgs_factor"][row])
            if candidate_f != truth_f and abs(candidate_f - truth_f) <= SCALAR_ULPS_F64 * 2.0**-53 * abs(truth_f):
                # f is within its contract: judge the rest of the step from the candidate's own f.
                step = reference_step(case, k, prev, candidate_f)
        bounds = step_bounds(case, step, dtype, present)
        if is_low_precision(dtype):  # p (and u, m, v of a 16-bit state) rounded once to the dtype
            bounds.update({name: low_precision_bound(trace[name][row], step.values[name], bounds[name], dtype)
                           for name in STATE_FIELDS})
        for name in fields:
            if name == "params0":
                continue
            golden_value = gold[name][row]
            if name in EXACT_FIELDS:
                result.reports.append(_report(case, k, name, trace[name][row], golden_value, golden_value, 0.0, dtype))
            else:
                result.reports.append(_report(case, k, name, trace[name][row], golden_value,
                                              step.values[name], bounds[name], dtype))
        # The next step starts from the candidate's state (golden values for fields it lacks).
        prev = {**prev, **{name: gold[name][row] for name in ("segment_step", "grad_norm_ema", *VGS_STATE_FIELDS)
                           if name in gold}}
        prev.update({name: trace[name][row] for name in (*STATE_FIELDS, "grad_norm_ema", *VGS_STATE_FIELDS)
                     if name in trace})
        if per_step_callback is not None:
            per_step_callback(k)
    return result


# --- the report ---------------------------------------------------------------------------


def format_comparison(result: Comparison, *, per_step: bool = False, limit: int = 10) -> str:
    """The human-readable report: per-field summary, optional per-step table, verdict."""
    lines = [f"golden case {result.case!r}: {result.steps} steps; trace dtype {result.dtype}",
             f"checked fields: {', '.join(result.fields)}"]
    if result.missing:
        lines.append(f"not in the trace (not checked): {', '.join(result.missing)}")
    header = f"{'field':<24} {'max abs err':>11} {'max rel err':>11} {'max ulps':>9} {'contract':>9}  worst at"
    rows = []
    for name in result.fields:
        reports = [r for r in result.reports if r.field == name]
        worst = max(reports, key=lambda r: (r.contract, r.max_abs))
        where = f"step {worst.step}, {worst.where}" if worst.contract > 0 else "-"
        rows.append(f"{name:<24} {max(r.max_abs for r in reports):11.3g} {max(r.max_rel for r in reports):11.3g} "
                    f"{max(r.max_ulp for r in reports):9.3g} {worst.contract:9.3g}  {where}")
    lines += ["", "vs golden trajectory (abs/rel/ulps) and vs contract (max error / bound, <= 1 passes):",
              header, *rows]
    if per_step:
        lines += ["", f"{'step':>4} {header}"]
        lines += [f"{r.step:>4} {r.field:<24} {r.max_abs:11.3g} {r.max_rel:11.3g} {r.max_ulp:9.3g} {r.contract:9.3g}  {r.where}"
                  for r in result.reports]
    lines.append("")
    first = result.first_divergence
    if first is None:
        lines.append("PASS: every step within the tolerance contract")
    else:
        lines.append(
            f"FAIL: first divergence at step {first.step}, field {first.field!r} ({first.where}): "
            f"trace {first.candidate!r}, reference {first.truth!r}, error {abs(first.candidate - first.truth):.3g} "
            f"> bound {first.bound:.3g}"
        )
        others = result.failures[1:limit]
        for r in others:
            lines.append(f"  also beyond the contract: step {r.step}, {r.field} ({r.where}), {r.contract:.3g} x bound")
        if len(result.failures) > limit:
            lines.append(f"  ... {len(result.failures) - limit} more")
    return "\n".join(lines)
