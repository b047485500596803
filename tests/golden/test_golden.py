"""Golden vectors: integrity, coverage, every backend against them, the comparator, determinism."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from upgd_ref import cli, golden
from upgd_ref import reference as ref
from upgd_ref.backends import backends_for
from upgd_ref.config import build, load_config
from upgd_ref.golden.comparator import step_bounds
from upgd_ref.golden.truth import reference_step
from upgd_ref.trace import FIELDS, TraceWriter, read_trace, write_npz, write_trace

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = golden.load_manifest()
CASE_NAMES = [c["name"] for c in MANIFEST["cases"]]


@pytest.fixture(scope="module")
def cases():
    return {name: golden.load_case(name) for name in CASE_NAMES}


# --- integrity and coverage -----------------------------------------------------------------


def test_manifest_hashes_match_the_files():
    assert golden.check_manifest() == []


def test_a_modified_file_or_a_stray_file_is_reported(tmp_path):
    golden.generate(tmp_path, specs=golden.CASES[:2])
    assert golden.check_manifest(tmp_path) == []
    first = tmp_path / golden.load_manifest(tmp_path)["cases"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-200] ^= 1
    first.write_bytes(bytes(data))
    (tmp_path / "extra.npz").write_bytes(b"")
    problems = golden.check_manifest(tmp_path)
    assert any("sha256" in p and first.name in p for p in problems)
    assert any("extra.npz" in p for p in problems)
    with pytest.raises(ValueError, match="modified"):
        golden.load_case(golden.CASES[0].name, tmp_path)


def test_checked_in_files_are_small():
    total = sum((golden.DEFAULT_DIR / c["file"]).stat().st_size for c in MANIFEST["cases"])
    assert total < 3 * 2**20


def test_cases_cover_every_mode(cases):
    def any_case(predicate):
        return any(predicate(c) for c in cases.values())

    hyper = lambda c: c.hyper  # noqa: E731
    assert any_case(lambda c: not any(h["adaptive_noise"] for h in hyper(c)))
    assert any_case(lambda c: any(h["adaptive_noise"] and h["instant_noise_scale"] for h in hyper(c)))
    for init in (0.0, 1.0):
        assert any_case(lambda c: any(h["adaptive_noise"] and not h["instant_noise_scale"]
                                      and h["noise_ema_init"] == init for h in hyper(c)))
    assert any_case(lambda c: c.config.noise_norm == "global")
    assert any_case(lambda c: any(np.any(c.arrays["noise_std"][:, i] == h["min_noise_std"])
                                  for i, h in enumerate(hyper(c)) if h["adaptive_noise"]))
    assert any_case(lambda c: c.vgs is not None and c.vgs["warmup_steps"] > 0
                    and c.arrays["vgs_factor"][0] == 1.0 and c.arrays["vgs_factor"].min() < 1.0)
    assert any_case(lambda c: c.vgs is not None and c.vgs["variance_cap"] is not None
                    and np.any(c.arrays["vgs_normalized_variance"] == c.vgs["variance_cap"])
                    and c.arrays["vgs_factor"].min() > c.vgs["min_scaling_factor"])
    assert any_case(lambda c: c.vgs is not None and np.any(c.arrays["vgs_factor"] == c.vgs["min_scaling_factor"]))
    assert any_case(lambda c: c.vgs is not None and c.vgs["variance_cap"] is None
                    and np.any((c.arrays["vgs_factor"] > c.vgs["min_scaling_factor"]) & (c.arrays["vgs_factor"] < 1)))
    assert any_case(lambda c: 0 in c.layout.sizes)
    assert any_case(lambda c: (~c.arrays["present"]).all(axis=0).any())  # a segment never present
    assert any_case(lambda c: (~c.arrays["present"]).all(axis=1).any())  # a step with no gradient
    assert any_case(lambda c: len({json.dumps(h, sort_keys=True) for h in hyper(c)}) > 1)  # groups differ
    assert {c.dtype.name for c in cases.values()} == {"float32", "float64", "float16", "bfloat16"}


# Every member of the UPGD family (specs/algorithm.md §7.2), by class and profile.
FAMILY = {
    ("AdaptiveUPGD", "production"): ref.PRODUCTION,
    ("UPGD", "production"): ref.UPGDVariant(moments="none"),
    ("UPGDW", "production"): ref.PRODUCTION,
    ("AdaptiveUPGD", "paper"): ref.UPGDVariant(moments="adam", protection="max", update_factor=2.0,
                                               noise_placement="terms"),
    ("UPGD", "paper"): ref.UPGDVariant(moments="none", protection="max", update_factor=2.0, noise_placement="sum"),
}


def test_cases_cover_every_family_member(cases):
    seen = {}
    for case in cases.values():
        key = (case.config.optimizer, case.config.profile)
        assert FAMILY[key] == case.variant
        seen.setdefault(key, set()).add(case.dtype.name)
    assert set(seen) == set(FAMILY)
    for key, dtypes in seen.items():  # every member in both wide dtypes; the 16-bit cases are production ones
        assert dtypes - {"float16", "bfloat16"} == {"float32", "float64"}, key
        assert key == ("AdaptiveUPGD", "production") or not dtypes & {"float16", "bfloat16"}, key
    for case in cases.values():
        if case.variant.protection == "max":  # paper cases: utilities positive, so the trace is finite
            assert (case.arrays["utility_max"] > 0).all() and np.isfinite(case.arrays["params"]).all()
        if case.config.optimizer == "UPGDW":  # beta_utility is beta2 in every segment
            assert all(h["beta_utility"] == h["beta2"] for h in case.hyper)
        if case.variant.moments == "none":  # no moments: m and v stay 0
            assert not case.arrays["first_moment"].any() and not case.arrays["second_moment"].any()


def test_manifest_entries_name_their_class_profile_and_variant(cases):
    assert MANIFEST["version"] == golden.GOLDEN_VERSION
    for entry in MANIFEST["cases"]:
        case = cases[entry["name"]]
        kwargs = entry["config"]["optimizer_kwargs"]
        assert entry["config"]["optimizer"] in ("AdaptiveUPGD", "UPGD", "UPGDW")
        assert kwargs.get("profile", "production") == case.config.profile
        assert ref.check_variant(entry["variant"]) == case.variant
        built = build(case.config, case.layout, backend="reference").optimizer
        assert type(built).__name__ == entry["config"]["optimizer"] and built.variant == case.variant


def test_a_case_replayed_with_the_wrong_member_fails_at_step_one(cases):
    case = cases["paper_adam_f64"]
    assert golden.compare(case, golden.replay(case, "reference")).passed
    production = load_config({**case.entry["config"], "optimizer_kwargs": {
        **case.entry["config"]["optimizer_kwargs"], "profile": "production"}})
    mismatched = golden.GoldenCase(case.name, case.entry, case.layout, production, case.hyper, case.arrays,
                                   ref.PRODUCTION)
    result = golden.compare(case, golden.replay(mismatched, "reference"))
    assert not result.passed and (result.first_divergence.step, result.first_divergence.field) == (1, "params")


def test_manifest_versions(tmp_path):
    golden.generate(tmp_path, specs=golden.CASES[:1])
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    del data["cases"][0]["variant"]
    data["version"] = 1  # version 1: no variant field, production AdaptiveUPGD only
    path.write_text(json.dumps(data))
    assert golden.load_case(golden.CASES[0].name, tmp_path).variant == ref.PRODUCTION
    data["version"] = 2  # version 2: the family's variant, no 16-bit cases; read by this reader
    data["cases"][0]["variant"] = dict(ref.PRODUCTION._asdict())
    path.write_text(json.dumps(data))
    assert golden.load_case(golden.CASES[0].name, tmp_path).variant == ref.PRODUCTION
    data["version"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 4"):
        golden.load_manifest(tmp_path)


def test_specs_golden_md_lists_every_case():
    text = (ROOT / "specs" / "golden.md").read_text()
    for name in CASE_NAMES:
        assert f"`{name}`" in text, name


# --- every backend against the golden vectors ---------------------------------------------


@pytest.mark.parametrize("backend", backends_for("numpy", emulators=True))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_backend_reproduces_golden_case(cases, backend, name):
    case = cases[name]
    for fused in golden.replay_paths(case):
        result = golden.compare(case, golden.replay(case, backend, fused=fused))
        assert result.passed, golden.format_comparison(result)
        assert set(result.fields) >= set(FIELDS) - ({"vgs_factor", "vgs_normalized_variance", "vgs_grad_mean_avg",
                                                     "vgs_grad_sq_avg"} if case.vgs is None else set())


def test_golden_trace_itself_passes_exactly(cases):
    for case in cases.values():
        result = golden.compare(case, dict(case.arrays))
        assert result.passed
        assert max(r.contract for r in result.reports) == 0.0


def test_independent_numpy_port_example_passes_every_case(cases):
    spec = importlib.util.spec_from_file_location("port_trace_numpy", ROOT / "examples" / "port_trace_numpy.py")
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    for case in cases.values():
        if case.variant != ref.PRODUCTION:  # the example ports AdaptiveUPGD (and UPGDW, a production variant)
            continue
        result = golden.compare(case, port.port_run(case).arrays())
        assert result.passed, golden.format_comparison(result)


# --- the comparator finds a single perturbed element ----------------------------------------


def _bound_at(case, trace, k, name, index):
    """The contract bound of one element at step k, from the trace's own state after k - 1."""
    prev = case.initial_state()
    for row in range(k - 1):
        prev.update({f: trace[f][row] for f in (*golden.STATE_FIELDS, "segment_step", "grad_norm_ema",
                                                  *golden.VGS_STATE_FIELDS) if f in trace})
    step = reference_step(case, k, prev)
    present = [bool(b) for b in case.arrays["present"][k - 1]]
    bounds = step_bounds(case, step, trace["params"].dtype, present)
    return float(np.broadcast_to(np.asarray(bounds[name], dtype=np.float64), trace[name][k - 1].shape)[index])


PERTURBATIONS = [
    ("adaptive_instant_f32", "params", 9),
    ("adaptive_instant_f64", "utility", 4),
    ("fixed_f32", "first_moment", 30),
    ("vgs_quantile_f64", "second_moment", 12),
    ("adaptive_ema_init1_f64", "grad_norm_ema", 3),
    ("global_norm_f64", "noise_std", 7),
    ("param_groups_f64", "grad_norm", 11),
    ("vgs_warmup_cap_f64", "vgs_grad_mean_avg", 8),
    ("vgs_min_factor_f32", "vgs_grad_sq_avg", 17),
    ("vgs_quantile_f64", "vgs_factor", 6),
    ("frozen_zero_size_f64", "utility_max", 5),
    ("paper_adam_f32", "params", 8),
    ("paper_plain_f64", "params", 12),
    ("upgd_plain_f64", "utility", 7),
    ("upgdw_f64", "second_moment", 9),
]


def _perturbed(trace, field, k, factor, case):
    """A copy of ``trace`` with the largest element of ``field`` at step k moved by factor x its bound."""
    out = {n: a.copy() for n, a in trace.items()}
    row = out[field][k - 1]
    index = np.unravel_index(int(np.nanargmax(np.abs(row.astype(np.float64)))), row.shape) if row.ndim else ()
    bound = _bound_at(case, trace, k, field, index)
    assert bound > 0
    if row.ndim:
        row[index] += row.dtype.type(factor * bound)
    else:
        out[field][k - 1] = row + row.dtype.type(factor * bound)
    assert not np.array_equal(out[field], trace[field])
    return out


@pytest.mark.parametrize("name, field, k", PERTURBATIONS)
def test_one_element_just_beyond_the_bound_fails_at_that_step_and_field(cases, name, field, k):
    case = cases[name]
    trace = golden.replay(case, "reference")
    assert golden.compare(case, trace).passed
    result = golden.compare(case, _perturbed(trace, field, k, 3.0, case))
    first = result.first_divergence
    assert not result.passed and (first.step, first.field) == (k, field)
    if field != "vgs_factor":  # the rest of a step is judged from the candidate's own f
        # Half the bound at the last step (nothing downstream) passes: the verdict is the
        # contract, not exact equality.
        assert golden.compare(case, _perturbed(trace, field, case.steps, 0.5, case)).passed


@pytest.mark.parametrize("field", ["normals", "grads", "segment_step", "present"])
def test_inputs_and_counts_must_match_exactly(cases, field):
    case = cases["frozen_zero_size_f64"]
    trace = golden.replay(case, "reference")
    k = 13
    if field == "present":
        trace[field][k - 1, 0] = ~trace[field][k - 1, 0]
    elif field == "segment_step":
        trace[field][k - 1, 0] += 1
    else:
        trace[field][k - 1, 0] = np.nextafter(trace[field][k - 1, 0], np.inf)
    result = golden.compare(case, trace)
    assert (result.first_divergence.step, result.first_divergence.field) == (k, field)


def test_missing_required_fields_and_wrong_shapes_are_trace_errors(cases):
    case = cases["vgs_warmup_cap_f64"]
    trace = golden.replay(case, "reference")
    with pytest.raises(golden.TraceError, match="vgs_grad_sq_avg"):
        golden.compare(case, {k: v for k, v in trace.items() if k != "vgs_grad_sq_avg"})
    with pytest.raises(golden.TraceError, match="shape"):
        golden.compare(case, {**trace, "params": trace["params"][:-1]})
    with pytest.raises(golden.TraceError, match="no VGS"):
        golden.compare(cases["fixed_f64"], {**golden.replay(cases["fixed_f64"]), "vgs_factor": np.ones(30)})


def test_optional_fields_may_be_left_out(cases):
    case = cases["param_groups_layout_f32"]
    trace = golden.replay(case, "reference")
    minimal = {k: trace[k] for k in golden.required_fields(case)}
    result = golden.compare(case, minimal)
    assert result.passed and "normals" in result.missing


# --- the command line ---------------------------------------------------------------------------


def test_cli_compare_exact_perturbed_and_bad(cases, tmp_path, capsys):
    case = cases["adaptive_instant_f32"]
    trace = golden.replay(case, "reference")
    exact = tmp_path / "exact.npz"
    write_trace(exact, trace, case=case.name)
    assert cli.main(["golden", "compare", str(exact)]) == 0
    assert "PASS" in capsys.readouterr().out

    k = 17
    trace["utility"][k - 1, 5] *= np.float32(1.001)
    bad = tmp_path / "bad.npz"
    write_trace(bad, trace)  # no case in the meta: --case names it
    report = tmp_path / "report.json"
    assert cli.main(["golden", "compare", str(bad), "--case", case.name, "--per-step", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert f"first divergence at step {k}, field 'utility'" in out
    assert json.loads(report.read_text())["passed"] is False

    assert cli.main(["golden", "compare", str(bad)]) == 2
    assert "--case" in capsys.readouterr().err
    assert cli.main(["golden", "compare", str(exact), "--case", "no_such_case"]) == 2
    assert "no golden case" in capsys.readouterr().err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    assert cli.main(["golden", "compare", str(junk)]) == 2


def test_cli_list_and_verify(capsys):
    assert cli.main(["golden", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in CASE_NAMES)
    assert cli.main(["golden", "verify", "--backend", "reference"]) == 0
    assert "all golden cases verified" in capsys.readouterr().out


# --- determinism and the trace format -------------------------------------------------------


def test_generate_is_byte_deterministic_and_matches_the_checked_in_vectors(tmp_path, cases):
    first = golden.generate(tmp_path / "a")
    second = golden.generate(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for entry in first["cases"]:
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    assert [e["sha256"] for e in first["cases"]] == [e["sha256"] for e in second["cases"]]
    # Against the repository: same cases and metadata, bit-identical inputs, outputs within
    # the contract (a machine whose libm rounds exp differently may change the last bits).
    strip = lambda entries: [{k: v for k, v in e.items() if k != "sha256"} for e in entries]  # noqa: E731
    assert strip(first["cases"]) == strip(MANIFEST["cases"])
    for entry in first["cases"]:
        _, regenerated = read_trace(tmp_path / "a" / entry["file"])
        checked_in = cases[entry["name"]]
        for name in ("params0", "grads", "present", "normals"):
            np.testing.assert_array_equal(regenerated[name], checked_in.arrays[name])
        assert golden.compare(checked_in, regenerated).passed


def test_npz_writer_fixes_order_dates_and_compression(tmp_path):
    arrays = {"b": np.arange(3.0), "a": np.ones((2, 2), dtype=np.float32)}
    write_npz(tmp_path / "x.npz", arrays)
    with zipfile.ZipFile(tmp_path / "x.npz") as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == ["a.npy", "b.npy"]
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and i.compress_type == zipfile.ZIP_STORED for i in infos)
    with np.load(tmp_path / "x.npz") as data:
        np.testing.assert_array_equal(data["a"], arrays["a"])


def test_trace_writer_round_trip_and_validation(tmp_path):
    writer = TraceWriter(case="fixed_f64")
    writer.set_initial([np.zeros((2, 2)), np.ones(3)])
    for k in range(2):
        writer.add_step(params=[np.full((2, 2), k), np.ones(3)], utility_min=float(k))
    with pytest.raises(ValueError, match="unknown trace field"):
        writer.add_step(parameters=np.ones(7))
    with pytest.raises(ValueError, match="step 3 has fields"):
        writer.add_step(params=np.ones(7))
    writer.save(tmp_path / "t.npz")
    meta, arrays = read_trace(tmp_path / "t.npz")
    assert meta["case"] == "fixed_f64" and arrays["params"].shape == (2, 7)
    np.testing.assert_array_equal(arrays["utility_min"], [0.0, 1.0])
    np.savez(tmp_path / "odd.npz", params=np.ones((2, 7)), extra=np.ones(1))
    with pytest.raises(ValueError, match="unknown trace member"):
        read_trace(tmp_path / "odd.npz")
    np.savez(tmp_path / "meta.npz", meta=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))
    with pytest.raises(ValueError, match="meta.format"):
        read_trace(tmp_path / "meta.npz")
