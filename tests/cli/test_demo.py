"""`upgd-ref demo`: the workload, the measured effect, the table, the picture; diagnostics records."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

import upgd_ref
from upgd_ref import cli, demo
from upgd_ref.cli.progress import ProgressBar
from upgd_ref.config import load_config
from upgd_ref.diagnostics import StepLog, StepRecord, record_step
from upgd_ref.tolerances import SCALAR_ULPS_F64

# NSR = max(sigma * r, floor) / r evaluated in float64: a few roundings of sigma.
NSR_RTOL = SCALAR_ULPS_F64 * 2.0**-53
STEPS = 160
FAST = {"optimizer": "AdaptiveUPGD", "optimizer_kwargs": {"lr": 3.0e-3, "sigma": 0.001},
        "vgs": {"enabled": True, "warmup_steps": 20}}


@pytest.fixture(scope="module")
def result():
    return demo.run_demo(load_config(FAST), steps=STEPS, seed=3, workload=demo.Workload(drift_every=60))


def test_backprop_matches_finite_differences():
    workload = demo.Workload(inputs=3, hidden=4, teacher_hidden=2, batch=5)
    layout = upgd_ref.FlatLayout(workload.shapes(), dtype="float64")
    rng = np.random.default_rng(0)
    params = layout.pack([rng.standard_normal(s) for s in layout.shapes])
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 1))
    _, grads = demo.forward_backward(layout, params, x, y)
    h = 1e-6
    for j in range(layout.size):
        if not any(layout.offsets[i] <= j < layout.offsets[i] + layout.sizes[i] for i in range(4)):
            continue  # padding
        up, down = params.copy(), params.copy()
        up[j] += h
        down[j] -= h
        numeric = (demo.forward_backward(layout, up, x, y)[0] - demo.forward_backward(layout, down, x, y)[0]) / (2 * h)
        assert grads[j] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_stream_is_a_function_of_seed_and_step_and_drifts():
    workload = demo.Workload(drift_every=5)
    a, b = demo.DriftingTeacherStream(workload, 1), demo.DriftingTeacherStream(workload, 1)
    xa, ya = a.batch(7)
    b.batch(1)
    xb, yb = b.batch(7)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert a.teacher(5) is a.teacher(1)  # same regime
    assert not np.array_equal(a.teacher(6)[0], a.teacher(5)[0])  # redrawn at the drift


def test_adaptive_noise_keeps_nsr_at_sigma_with_and_without_vgs(result):
    sigma = result["sigma_rel"]
    for label, adaptive, _ in demo.RUNS:
        if adaptive:
            nsr = result["logs"][label].column("nsr")
            np.testing.assert_allclose(nsr, sigma, rtol=NSR_RTOL)
            assert result["summaries"][label]["nsr_spread"] == pytest.approx(1.0, rel=NSR_RTOL)


def test_fixed_noise_nsr_rises_by_one_over_f_when_vgs_shrinks_gradients(result):
    on = result["logs"]["fixed sigma, VGS on"]
    factor = on.column("vgs_factor")
    assert factor.min() < 0.5  # VGS engaged on this workload
    # Same absolute std, gradients scaled by f: per step NSR * f is sigma / pre-VGS norm.
    np.testing.assert_allclose(on.column("noise_to_signal") * factor[:, None],
                               result["sigma_abs"] / on.column("pre_vgs_grad_norm"), rtol=1e-12)
    summaries = result["summaries"]
    assert summaries["fixed sigma, VGS on"]["nsr_end"] > summaries["fixed sigma, VGS off"]["nsr_end"]
    assert summaries["fixed sigma, VGS off"]["mean_vgs_factor"] == 1.0


def test_calibration_makes_the_two_noise_modes_equal_at_the_typical_norm(result):
    assert result["sigma_abs"] == FAST["optimizer_kwargs"]["sigma"]
    assert result["sigma_rel"] * result["probe_grad_norm"] == pytest.approx(result["sigma_abs"], rel=1e-15)


def test_runs_share_data_and_initial_weights(result):
    logs = result["logs"]
    first_loss = {label: log.column("loss")[0] for label, log in logs.items()}
    assert len(set(first_loss.values())) == 1


def test_table_has_a_row_per_run_with_the_summaries(result):
    table = demo.format_table(result["summaries"])
    lines = table.splitlines()
    assert len(lines) == 2 + len(demo.RUNS)
    for (label, _, _), line in zip(demo.RUNS, lines[2:]):
        assert line.startswith(label)
        assert f"{result['summaries'][label]['final_loss']:.4g}" in line
    findings = demo.findings(result["summaries"], result["sigma_rel"])
    assert any("VGS on/off NSR ratio" in f for f in findings)


def test_cli_quick_writes_png_and_json_with_the_claims(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--seed", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    for label, _, _ in demo.RUNS:
        assert label in printed
    assert "design says:" in printed and "NSR / NSR(VGS off)" in printed
    assert "100%" in captured.err  # progress on stderr, not in the report
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["summaries"]) == {label for label, _, _ in demo.RUNS}
    assert summary["steps"] == demo.QUICK["steps"] and summary["seed"] == 2 and summary["quick"]
    assert summary["claims"][0]["claim"].startswith("worked example 1")
    assert [row["alpha"] for row in summary["alpha_sweep"]][0] == 0.0


def test_cli_with_an_adaptive_template_and_bad_inputs(tmp_path, capsys):
    from pathlib import Path

    template = Path(__file__).resolve().parents[2] / "specs" / "configs" / "recommended.yaml"
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet", "--config", str(template)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["sigma_rel"] == load_config(template).hyperparams["sigma"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer_kwargs:\n  lr: -1.0\n")
    assert cli.main(["demo", "--config", str(bad), "--out", str(out)]) == 2
    assert "optimizer_kwargs.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "3"])
    assert cli.main(["demo", "--steps", "100", "--out", str(out), "--quiet"]) == 2  # not past the warmup
    assert "--steps must be more than the VGS warmup" in capsys.readouterr().err
    no_vgs = tmp_path / "no_vgs.yaml"  # no scaler in the base: the claims' VGS runs take the default warmup
    no_vgs.write_text("optimizer_kwargs:\n  lr: 0.003\nvgs: null\n")
    assert cli.main(["demo", "--steps", "50", "--out", str(out), "--quiet", "--config", str(no_vgs)]) == 2
    assert "VGS warmup (100 steps), got 50" in capsys.readouterr().err


def test_progress_bar_reports_without_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(8, stream=stream)
    bar.set_label("run")
    for _ in range(8):
        bar.advance()
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("100% (run")
    assert len(stream.getvalue().splitlines()) == 4


# --- diagnostics records ------------------------------------------------------------------


def test_step_record_fields_summaries_and_json():
    layout = upgd_ref.FlatLayout([(3,), (0,), (2,)], dtype="float64")
    opt = upgd_ref.AdaptiveUPGD(layout, adaptive_noise=True, sigma=0.1)
    scaler = upgd_ref.VarianceGradientScaler(layout, warmup_steps=0)
    params = layout.zeros()
    log = StepLog()
    for step in range(1, 4):
        grads = layout.pack([np.array([1.0, -2.0, 2.0]) * step, np.zeros(0), np.array([3.0, 4.0])])
        log.append(record_step(opt, params, grads, scaler, present=[True, True, step != 2], loss=1.0 / step))
    first, second = log.records[0], log.records[1]
    assert first.grad_norm[0] == pytest.approx(3.0) and first.global_grad_norm == pytest.approx(math.hypot(3.0, 5.0))
    assert first.nsr == pytest.approx(0.1)  # zero-size segment (inf NSR) left out of the median
    assert math.isnan(second.grad_norm[2]) and second.present.tolist() == [True, True, False]
    assert log.column("loss").tolist() == [1.0, 0.5, 1.0 / 3.0]
    assert log.column("grad_norm").shape == (3, 3)
    as_dict = first.to_dict()
    json.dumps(as_dict, allow_nan=False)  # NaN/inf became None
    assert as_dict["noise_to_signal"][1] is None and as_dict["loss"] == 1.0
    assert log.records[2].vgs_factor <= 1.0
    with pytest.raises(KeyError, match="no field"):
        log.column("nope")


def test_record_without_scaler_has_nan_factor_and_unscaled_pre_vgs_norm(tmp_path):
    layout = upgd_ref.FlatLayout([(2,)], dtype="float64")
    opt = upgd_ref.AdaptiveUPGD(layout)
    record = record_step(opt, layout.zeros(), layout.pack([np.array([3.0, 4.0])]))
    assert isinstance(record, StepRecord) and math.isnan(record.vgs_factor)
    assert record.pre_vgs_grad_norm.tolist() == [5.0]
    log = StepLog()
    log.append(record)
    log.write_jsonl(tmp_path / "log.jsonl")
    assert json.loads((tmp_path / "log.jsonl").read_text())["vgs_factor"] is None
