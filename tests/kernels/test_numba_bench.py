"""``upgd-ref bench``: it runs, prints and writes every row, and its PyTorch production loop
really is the algorithm (checked lockstep against the float64 reference with the contract of
``upgd_ref.tolerances``, noise switched off so both sides draw nothing)."""

from __future__ import annotations

import json
import math

import numba
import numpy as np
import pytest
import torch

from upgd_ref import FlatLayout, bench, cli, reference as ref, tolerances
from upgd_ref.hyperparams import UPGD_DEFAULTS

# The PyTorch baseline lives outside the package (benchmarks/), loaded as `upgd-ref bench` does.
(PRODUCTION_FILE,) = bench.default_baselines()
production = bench.load_baseline(PRODUCTION_FILE)

NUMPY_ROWS = ["numba full step (VGS + adaptive noise)", "numba noise-free step",
              "numba noisy step (fixed noise, no VGS)", "numba noise alone", "numba noise alone, noise format 2",
              "numba full step, noise format 2", "copy (the full step's bytes)",
              "NumPy reference step (VGS + adaptive noise)"]
TORCH_ROWS = ["torch fused Adam", "torch.randn (same count)",
              "torch per-tensor loop (production: VGS + adaptive noise)"]


def test_bench_measures_every_row_and_ratio():
    result = bench.run_benchmark(sizes=[3000], dtypes=["float32", "float64"], repeats=2, baselines=[production])
    assert [r["name"] for r in result["rows"]] == (NUMPY_ROWS + TORCH_ROWS) * 2
    # a row whose warm-up call took longer than SLOW_CALL_SECONDS (a loaded machine) gets MIN_SLOW_REPEATS
    assert all(r["seconds"] > 0 and math.isfinite(r["ns_per_param"]) and r["repeats"] in (2, bench.MIN_SLOW_REPEATS)
               for r in result["rows"])
    assert result["config"]["torch"] == torch.__version__
    assert result["baselines"] == [{"name": production.NAME, "file": str(PRODUCTION_FILE),
                                     "versions": {"torch": torch.__version__}, "available": True, "reason": None}]
    assert result["jit"]["seconds"] >= 0
    for entry in result["ratios"]:
        assert set(bench.TARGETS) <= set(entry)
    text = bench.format_report(result)
    assert all(name in text for name in NUMPY_ROWS + TORCH_ROWS)
    assert "not measured" in text  # the targets are judged at 10M parameters only


def test_bench_command_writes_json_and_can_leave_torch_out(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--sizes", "2k", "--dtypes", "float64", "--repeats", "1", "--no-torch",
                     "--scaling", "", "--json", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert [r["name"] for r in result["rows"]] == NUMPY_ROWS
    assert result["config"]["sizes"] == [2000] and result["config"]["torch"] is None
    assert all(r["name"] in printed for r in result["rows"])
    assert f"{result['rows'][0]['ns_per_param']:.3f}" in printed


@pytest.mark.parametrize("argv", [["--sizes", "0"], ["--sizes", "1.5"], ["--sizes", "ten"],
                                  ["--dtypes", "float8"], ["--repeats", "0"], ["--threads", "0"]])
def test_bench_command_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        cli.main(["bench", *argv])


def test_bench_rejects_more_threads_than_numba_has():
    with pytest.raises(ValueError, match="threads"):
        bench.run_benchmark(sizes=[100], threads=numba.config.NUMBA_NUM_THREADS + 1)


def _torch_state(states, params, key, default):
    """Per-tensor state ``key`` as NumPy copies (``default(shape)`` before the first step)."""
    return [states[p][key].numpy().copy() if p in states else default(tuple(p.shape)) for p in params]


def test_torch_production_loop_is_the_algorithm():
    layout = FlatLayout([(50,), (3, 4), (7,)], dtype="float64")
    hyper = {**UPGD_DEFAULTS, "lr": 0.05, "weight_decay": 0.01, "sigma": 0.0, "min_noise_std": 0.0,
             "adaptive_noise": True, "noise_ema_init": 0.0}
    data = np.random.default_rng(0)
    params = [torch.nn.Parameter(torch.from_numpy(data.standard_normal(s))) for s in layout.shapes]
    states, vgs = {}, production.torch_vgs_state(len(params), warmup_steps=1, alpha=2.0)
    vgs_hyper = {k: vgs[k] for k in ("enabled", "beta", "alpha", "eps", "warmup_steps", "min_scaling_factor",
                                      "variance_cap")}
    unit = tolerances.unit_roundoff(np.float64)
    for step in range(5):
        present = [True, step != 2, True]  # a tensor without a gradient sits step 2 out
        grads = [data.standard_normal(s) * (step + 1) for s in layout.shapes]
        for p, g, has_grad in zip(params, grads, present):
            p.grad = torch.from_numpy(g.copy()) if has_grad else None
        pre_vgs = ref.VGSState(np.int64(vgs["k"]), np.array(vgs["a"]), np.array(vgs["b"]))
        factor, _ = ref.vgs_scaling_factor(pre_vgs, **vgs_hyper)
        torch_factor = production.torch_vgs_factor(torch, vgs)
        assert abs(torch_factor - float(factor)) <= tolerances.SCALAR_ULPS_F64 * unit * abs(float(factor))
        scaled = ref.vgs_scale(grads, factor, present)
        pre = ref.UPGDState(
            step=np.int64(step),
            segment_step=np.array([states[p]["step"] if p in states else 0 for p in params], dtype=np.int64),
            utility=_torch_state(states, params, "avg_utility", np.zeros),
            first_moment=_torch_state(states, params, "exp_avg", np.zeros),
            second_moment=_torch_state(states, params, "exp_avg_sq", np.zeros),
            grad_norm_ema=np.array([states[p]["grad_norm_ema"] if p in states else 0.0 for p in params]),
        )
        normals = [np.zeros(s) for s in layout.shapes]
        (new_params, new_state, _), scales = tolerances.upgd_step_scales(
            [p.detach().numpy().copy() for p in params], scaled, pre, normals, [hyper] * len(params), present)
        bounds = tolerances.upgd_step_bounds(scales, np.float64, layout.sizes)

        production.torch_production_step(torch, params, states, vgs, hyper)

        torch_keys = {"utility": "avg_utility", "first_moment": "exp_avg", "second_moment": "exp_avg_sq"}
        assert [states[p]["step"] for p in params] == list(new_state.segment_step)
        for i, p in enumerate(params):
            assert tolerances.max_violation(p.detach().numpy(), new_params[i], bounds["params"][i]) <= 1.0
            for name, key in torch_keys.items():
                got, truth = states[p][key].numpy(), getattr(new_state, name)[i]
                assert tolerances.max_violation(got, truth, bounds[name][i]) <= 1.0
        truth_vgs = ref.vgs_update(pre_vgs, scaled, beta=vgs["beta"], present=present)
        assert vgs["k"] == int(truth_vgs.step)
        relative = np.array([tolerances.REDUCTION_ULPS * unit + n * 2.0**-53 for n in layout.sizes])
        for got, truth, old, terms in (
            ("a", truth_vgs.grad_mean_avg, pre_vgs.grad_mean_avg, [np.abs(g) for g in scaled]),
            ("b", truth_vgs.grad_sq_avg, pre_vgs.grad_sq_avg, [g * g for g in scaled]),
        ):
            scale = np.abs(vgs["beta"] * old) + (1 - vgs["beta"]) * np.array([np.mean(t) for t in terms])
            assert tolerances.max_violation(np.array(vgs[got]), truth, relative * scale) <= 1.0
    assert factor < 1.0  # the production scaler did scale
