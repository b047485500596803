"""``upgd-ref bench``: baselines come from files outside the package; a missing framework is
reported with its reason instead of its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from upgd_ref import bench
from upgd_ref.cli import main
from upgd_ref.traffic import step_traffic

ROOT = Path(__file__).resolve().parents[2]
FAKE = '''
from upgd_ref.bench import Case
NAME = "fake framework"
def setup(threads):
    import {module}
    return {{"fake": "1.0"}}
def cases(layout, rng, step_hyper, vgs_hyper):
    return [Case("fake copy", lambda: None)]
'''


def _baseline(tmp_path, module="json"):
    path = tmp_path / f"fake_{module}.py"
    path.write_text(FAKE.format(module=module))
    return path


def test_a_checkout_finds_the_production_torch_baseline():
    assert bench.default_baselines() == [ROOT / "benchmarks" / "production_torch.py"]
    assert not (ROOT / "upgd_ref" / "bench.py").read_text().count("torch_production_step")


def test_bench_times_a_baseline_file(tmp_path, capsys):
    path, out = _baseline(tmp_path), tmp_path / "bench.json"
    assert main(["bench", "--sizes", "1k", "--dtypes", "float64", "--repeats", "1", "--quiet", "--scaling", "",
                 "--baseline", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]][-1] == "fake copy"
    assert result["baselines"][0]["versions"] == {"fake": "1.0"} and result["baselines"][0]["available"]
    assert "baseline fake framework: measured" in capsys.readouterr().out


def test_a_missing_framework_is_reported_not_run(tmp_path, capsys):
    path = _baseline(tmp_path, "no_such_framework_xyz")
    assert main(["bench", "--sizes", "1k", "--dtypes", "float64", "--repeats", "1", "--quiet", "--scaling", "",
                 "--baseline", str(path)]) == 0
    text = capsys.readouterr().out
    assert "baseline fake framework: unavailable, no_such_framework_xyz is not installed" in text
    assert "fake copy" not in text


def test_without_baselines_the_table_says_where_they_come_from():
    result = bench.run_benchmark(sizes=[1000], dtypes=["float64"], repeats=1)
    assert result["baselines"] == [] and result["config"]["torch"] is None
    assert "baselines: none (the PyTorch rows come from benchmarks/production_torch.py" in bench.format_report(result)


def test_bad_baseline_files(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such baseline file"):
        bench.load_baseline(tmp_path / "none.py")
    incomplete = tmp_path / "incomplete.py"
    incomplete.write_text("NAME = 'x'\n")
    with pytest.raises(ValueError, match="lacks setup, cases"):
        bench.load_baseline(incomplete)
    assert main(["bench", "--sizes", "1k", "--scaling", "", "--baseline", str(tmp_path / "none.py")]) == 2
    assert "no such baseline file" in capsys.readouterr().err


def test_16bit_rows(capsys):
    """``--dtypes float16,bfloat16``: the numba rows of a 16-bit step (widened to float32,
    rounded back) and the stochastic-rounding row; no framework baselines for them."""
    assert main(["bench", "--sizes", "4096", "--dtypes", "float16,bfloat16", "--repeats", "1", "--quiet",
                 "--scaling", "", "--no-torch"]) == 0
    text = capsys.readouterr().out
    for dtype in ("float16", "bfloat16"):
        rows = [line for line in text.splitlines() if f" {dtype} " in line]
        assert any("numba full step" in r for r in rows) and any("stochastic rounding" in r for r in rows)


def test_rows_carry_bytes_bandwidth_and_the_copy_share(tmp_path, capsys):
    """Bytes per parameter from ``upgd_ref.traffic`` (the spec's table), GB/s = bytes / time,
    % copy = GB/s over the copy's GB/s at the same size; the scaling table likewise."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "4k", "--dtypes", "float32,float64", "--repeats", "1", "--quiet", "--no-torch",
                 "--scaling", "4k,8k", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = {bench.FULL_STEP: lambda d: step_traffic("AdaptiveUPGD", d, vgs=True).total,
                bench.NOISE_FREE: lambda d: step_traffic("AdaptiveUPGD", d).total,
                bench.NOISY: lambda d: step_traffic("AdaptiveUPGD", d).total,
                bench.NOISE: lambda d: {"float32": 4, "float64": 8}[d],
                bench.FULL_STEP_V2: lambda d: step_traffic("AdaptiveUPGD", d, vgs=True).total,
                bench.NOISE_V2: lambda d: {"float32": 4, "float64": 8}[d],
                bench.COPY: lambda d: step_traffic("AdaptiveUPGD", d, vgs=True).total}
    for rows in (result["rows"], result["scaling"]):
        copies = {(r["size"], r["dtype"]): r["gb_per_second"] for r in rows if r["name"] == bench.COPY}
        for r in rows:
            if r["name"] not in expected:  # the NumPy reference: bytes not modelled
                assert r["bytes_per_param"] is None and r["gb_per_second"] is None and r["percent_of_copy"] is None
                continue
            assert r["bytes_per_param"] == expected[r["name"]](r["dtype"])
            assert r["gb_per_second"] == pytest.approx(r["bytes_per_param"] * r["size"] / r["seconds"] / 1e9)
            assert r["percent_of_copy"] == pytest.approx(100 * r["gb_per_second"] / copies[r["size"], r["dtype"]])
    assert [(r["size"], r["name"]) for r in result["scaling"]] == [
        (size, name) for size in (4000, 8000) for name in (bench.FULL_STEP, bench.NOISE_FREE, bench.COPY)]
    ratios = {(e["size"], e["dtype"]): e for e in result["ratios"]}
    seconds = {(r["dtype"], r["name"]): r["seconds"] for r in result["rows"]}
    for dtype in ("float32", "float64"):
        entry = ratios[4000, dtype]
        assert entry["full_step_over_noise_free_step"] == pytest.approx(
            seconds[dtype, bench.FULL_STEP] / seconds[dtype, bench.NOISE_FREE])
        assert entry["full_step_v2_over_noise_free_step"] == pytest.approx(
            seconds[dtype, bench.FULL_STEP_V2] / seconds[dtype, bench.NOISE_FREE])
        assert "noise_v2_over_torch_randn" not in entry  # --no-torch
        assert entry["noise_in_step_over_noise_alone"] == pytest.approx(
            (seconds[dtype, bench.NOISY] - seconds[dtype, bench.NOISE_FREE]) / seconds[dtype, bench.NOISE])
    header = next(line for line in text.splitlines() if "ns/param" in line)
    assert all(column in header for column in ("B/param", "GB/s", "% copy"))
    assert "scaling (float32" in text
    full = next(r for r in result["rows"] if r["name"] == bench.FULL_STEP and r["dtype"] == "float32")
    line = next(line for line in text.splitlines() if bench.FULL_STEP in line and " float32 " in line)
    assert f"{full['gb_per_second']:7.1f}" in line and f"{full['percent_of_copy']:7.0f}" in line
