"""`upgd-ref tune`: the digits MLP's backprop, the Adam baseline, and the sweep on a tiny grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

import upgd_ref
from upgd_ref import cli, tune



@pytest.fixture(scope="module")
def task():
    return tune.load_digits_task(train_size=256)


def test_split_is_fixed_and_disjoint():
    a, b = tune.load_digits_task(), tune.load_digits_task()
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (1078, 359, 360)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_backprop_matches_finite_differences():
    layout = upgd_ref.FlatLayout([(5, 64), (5,), (10, 5), (10,)], dtype="float64")
    rng = np.random.default_rng(1)
    params = layout.pack([rng.standard_normal(s) * 0.3 for s in layout.shapes])
    x, y = rng.random((4, 64)), rng.integers(0, 10, 4)
    _, grads = tune.forward_backward(layout, params, x, y)
    for j in rng.choice([i for s, o in zip(layout.sizes, layout.offsets) for i in range(o, o + s)], 40, replace=False):
        up, down = params.copy(), params.copy()
        up[j] += 1e-6
        down[j] -= 1e-6
        numeric = (tune.forward_backward(layout, up, x, y)[0] - tune.forward_backward(layout, down, x, y)[0]) / 2e-6
        assert grads[j] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_adam_first_step_is_lr_times_the_sign():
    params, grads = np.zeros(3), np.array([0.5, -2.0, 1e-3])
    m, v = np.zeros(3), np.zeros(3)
    tune.adam_update(params, grads, m, v, 1, 0.1)
    np.testing.assert_allclose(params, -0.1 * grads / (np.abs(grads) + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(m, 0.1 * grads) and np.testing.assert_allclose(v, 0.001 * grads**2)


def test_tiny_sweep_is_sane_and_reproducible(task):
    grid = tune.QUICK_GRID
    rows = tune.sweep(grid, task)
    again = tune.sweep(grid, task)
    assert rows == again  # every run is a function of its seed
    assert len(rows) == len(tune.LR_SERIES) * len(grid.lrs) + len(grid.sigmas) + len(grid.alphas)
    assert tune.runs_in(grid) == len(rows) * len(grid.seeds)
    assert {r["vgs_warmup"] for r in rows if r["series"] == "VGS on, warmup 0"} == {0}
    for row in rows:
        assert 0.0 <= row["test_acc"] <= 1.0 and np.isfinite(row["train_loss"])
    adam = [r for r in rows if r["optimizer"] == "adam"]
    assert max(r["val_acc"] for r in adam) > 0.5  # well above chance (0.1) after two epochs
    best = tune.recommend(rows)
    assert best["adam"]["val_acc"] == max(r["val_acc"] for r in adam)
    assert best["lr_ratio_vgs_on"] == best["upgd_vgs_on"]["lr"] / best["adam"]["lr"]
    assert best["upgd_vgs_on_no_warmup"]["series"] == "VGS on, warmup 0"
    vgs_rows = [r for r in rows if r["alpha"] == 0.1]
    assert vgs_rows and all(r["vgs_factor"] < 1.0 for r in vgs_rows)  # VGS engaged after the short warmup
    assert all(r["vgs_factor"] == 1.0 for r in rows if r["alpha"] is None)
    text = tune.format_tuning(rows)
    assert "best settings measured" in text and f"lr {best['adam']['lr']:g}" in text


def test_train_run_refuses_an_unknown_optimizer(task):
    with pytest.raises(ValueError, match="optimizer must be"):
        tune.train_run(task, "sgd", 0.1, 0, 1)


def test_cli_quick_writes_plot_and_table(tmp_path, capsys):
    assert cli.main(["tune", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    assert "best settings measured" in capsys.readouterr().out
    assert (tmp_path / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert saved["quick"] and saved["recommended"]["adam"]["optimizer"] == "adam"
