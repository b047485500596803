"""`upgd-ref demo --quick`: the "design says / measured" table and the alpha sweep, checked
against NSR computed here from the recorded noise std and the gradient norms NumPy measured on
the backpropagated gradients (``backprop_grad_norm``, before VGS) times the recorded factor."""

from __future__ import annotations

import re

import numpy as np
import pytest

from upgd_ref import claims, demo
from upgd_ref.config import load_config
from upgd_ref.tolerances import REDUCTION_ULPS, SCALAR_ULPS_F64, UNIT_ROUNDOFF

F64_RTOL = SCALAR_ULPS_F64 * 2.0**-53  # f and NSR are float64 scalars of a few roundings
# The optimizer's norm is a float32 reduction of the gradient after VGS scaled it in float32:
# the reduction bound plus the scaling's rounding and the division, against NumPy's float64 norm.
NORM_RTOL = (REDUCTION_ULPS + 2) * UNIT_ROUNDOFF["float32"]
SEED = 0


@pytest.fixture(scope="module")
def quick():
    steps, workload, config = demo.quick_settings(load_config(demo.DEMO_CONFIG, source="demo defaults"), SEED)
    runs = demo.Runs(workload, steps, SEED)
    result = demo.run_demo(config, steps=steps, seed=SEED, runs=runs)
    measured = claims.run_claims(config, runs)
    return {"config": config, "result": result, "claims": measured, "text": claims.report(result, measured)}


def _after_warmup(log, warmup):
    return np.asarray([r.step for r in log.records]) > warmup


def _nsr(log, warmup, norms: str = "backprop") -> float:
    """Median over the steps after warmup of the median over segments of std_i / ||g_i||, with
    ||g_i|| = f * the NumPy norm of the backpropagated gradient (``norms="backprop"``) or the
    optimizer's recorded norm (``"recorded"``); never the records' own NSR summaries."""
    per_step = []
    for record, keep in zip(log.records, _after_warmup(log, warmup)):
        if keep:
            if norms == "backprop":
                norm = record.vgs_factor * np.asarray(record.metrics["backprop_grad_norm"])
            else:
                norm = np.asarray(record.grad_norm, dtype=np.float64)
            ratios = np.asarray(record.noise_std, dtype=np.float64) / norm
            per_step.append(np.median(ratios[np.isfinite(ratios)]))
    return float(np.median(per_step))


def _assert_printed(printed: str, value: float, scale: float = 100.0) -> None:
    """A number printed with two decimals is ``value * scale`` to half a unit in the last
    digit, plus the norms' tolerance."""
    assert abs(float(printed) - scale * value) <= 0.005 + scale * value * NORM_RTOL, (printed, value)


def _section(text: str, claim: str) -> str:
    """The "measured:" line of a claim."""
    start = text.find("measured:", text.index(claim))
    return text[start:text.find("\n", start)]


def _percents(line: str) -> list[str]:
    return re.findall(r"(\d+\.\d\d)%", line)


def test_worked_examples_nsr_match_an_independent_computation(quick):
    logs, text = quick["claims"]["logs"], quick["text"]
    warmup = demo.QUICK["warmup_steps"]
    off = _nsr(logs["fixed, VGS off"], warmup)
    alpha1 = claims.alpha_for_factor(claims.DESIGN["example1"]["factor"], 50.0)
    for claim, run in (("worked example 1", f"fixed, alpha {alpha1:.4g}"), ("worked example 2", "fixed, alpha 0.3")):
        on = _nsr(logs[run], warmup)
        measured = _section(text, claim)
        printed_off, printed_on = _percents(measured)
        _assert_printed(printed_off, off)
        _assert_printed(printed_on, on)
        _assert_printed(re.search(r"\((\d+\.\d\d)x\)", measured).group(1), on / off, scale=1.0)
        assert quick["claims"]["measured"][run]["nsr"] == pytest.approx(on, rel=NORM_RTOL)
        assert quick["claims"]["measured"][run]["nsr"] == _nsr(logs[run], warmup, norms="recorded")
    adaptive = _section(text, "adaptive sigma 0.05 with VGS")
    on, off = _nsr(logs["adaptive, alpha 0.3"], warmup), _nsr(logs["adaptive, VGS off"], warmup)
    assert _percents(adaptive) == ["5.00", "5.00"]
    assert on == pytest.approx(0.05, rel=NORM_RTOL) and off == pytest.approx(0.05, rel=NORM_RTOL)


def test_the_design_numbers_appear_next_to_the_measured_ones(quick):
    text = quick["text"]
    for design in ("NSR 2.50% -> 3.85% (1.54x)", "gradients 38% smaller, NSR 3.96% -> 5.22% (1.32x)",
                   "NSR stays 5.00%", "1.3x-1.8x depending on configuration"):
        assert design in text
    assert "2.50%/0.62 = 4.03% (1.61x)" in text  # the design's own arithmetic, recomputed
    for config in ("variance cap", "below the cap", "fixed sigma 0.005, VGS off", "noise_ema_init 1",
                   "noise_ema_init 0", "min_noise_std floor", "global norm"):
        assert config in text


def test_vgs_factor_is_the_capped_formula_and_the_cap_row_says_so(quick):
    warmup, logs = demo.QUICK["warmup_steps"], quick["claims"]["logs"]
    for row in claims.alpha_sweep(quick["claims"]):
        if row["alpha"] == 0:
            continue
        log = logs[f"fixed, alpha {row['alpha']:.4g}"]
        after = _after_warmup(log, warmup)
        g = np.asarray([r.vgs_normalized_variance for r in log.records])[after]
        f = np.asarray([r.vgs_factor for r in log.records])[after]
        assert np.all(g == 50.0)  # G at the cap on every step after warmup (this workload)
        np.testing.assert_allclose(f, max(1 / (1 + row["alpha"] * 50.0), 0.1), rtol=F64_RTOL)
        assert row["factor"] == pytest.approx(float(np.mean(f)), rel=F64_RTOL)
    assert "G at the cap on 100% of the steps after warmup" in quick["text"]
    free = logs["fixed, no cap"]
    g_free = np.asarray([r.vgs_normalized_variance for r in free.records])[_after_warmup(free, warmup)]
    assert np.median(g_free) > 50.0 and np.ptp([r.vgs_factor for r in free.records][warmup:]) > 0.1


def test_sweep_amplification_is_nsr_over_the_vgs_off_run(quick):
    warmup, logs = demo.QUICK["warmup_steps"], quick["claims"]["logs"]
    off = _nsr(logs["fixed, VGS off"], warmup)
    rows = claims.alpha_sweep(quick["claims"])
    assert [r["alpha"] for r in rows] == sorted({0.0, *claims.SWEEP_ALPHAS, claims.alpha_for_factor(0.62, 50.0)})
    table = claims.format_sweep(rows).splitlines()[2:]
    for row, line in zip(rows, table):
        name = "fixed, VGS off" if row["alpha"] == 0 else f"fixed, alpha {row['alpha']:.4g}"
        nsr = _nsr(logs[name], warmup)
        assert row["amplification"] == pytest.approx(nsr / off, rel=2 * NORM_RTOL)
        _assert_printed(re.search(r"(\d+\.\d\d)%", line).group(1), nsr)
        assert abs(float(re.search(r"(\d+\.\d{3})x", line).group(1)) - nsr / off) <= 0.0005 + 2 * NORM_RTOL
    # Per step, fixed noise makes NSR_i * f * pre-VGS norm = sigma exactly (the 1/f law).
    log = logs["fixed, alpha 0.1"]
    for record in log.records:
        np.testing.assert_allclose(record.noise_to_signal * record.vgs_factor * record.pre_vgs_grad_norm,
                                   claims.FIXED_SIGMA, rtol=F64_RTOL)


def test_floor_and_ema_rows_from_the_recorded_std(quick):
    warmup, logs, text = demo.QUICK["warmup_steps"], quick["claims"]["logs"], quick["text"]
    floor = logs["adaptive, floor"]
    std = np.asarray([r.noise_std for r in floor.records])[_after_warmup(floor, warmup)]
    share = float(np.mean(std == 1e-6))
    assert share > 0.5 and f"floor hit in {share:.0%} of segment-steps" in text
    ema = logs["adaptive EMA, init 1"]
    first = ema.records[0]
    assert f"NSR at step 1 {np.median(first.noise_std / first.grad_norm) / 0.05:.3g}x sigma" in text


def test_measure_refuses_a_run_without_steps_after_warmup(quick):
    config = quick["claims"]["configs"]["fixed, alpha 0.1"]
    short = demo.train(config, demo.Workload(drift_every=40), 5, SEED)
    with pytest.raises(ValueError, match="no step after the VGS warmup"):
        claims.measure(short, config)
