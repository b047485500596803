"""Config templates, from_config, and migrate-config (good and bad files)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import upgd_ref
from upgd_ref import cli
from upgd_ref.config import ConfigError, load_config, migrate, typical_norm_from_npz
from upgd_ref.hyperparams import UPGD_DEFAULTS, VGS_DEFAULTS

CONFIGS = Path(__file__).resolve().parents[1] / "specs" / "configs"
TEMPLATES = sorted(CONFIGS.glob("*.yaml"))
LAYOUT = upgd_ref.FlatLayout([(4, 3), (3,), (2,)], dtype="float64")


def write(tmp_path, text: str, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- templates ------------------------------------------------------------------------


def test_the_three_templates_exist():
    assert {p.stem for p in TEMPLATES} >= {"current_defaults", "recommended", "aggressive_exploration"}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_builds_what_it_says(path):
    raw = yaml.safe_load(path.read_text())  # plain YAML 1.1 reads the templates the same way
    built = upgd_ref.from_config(path, LAYOUT)
    for key, value in raw["optimizer_kwargs"].items():
        if key in UPGD_DEFAULTS:
            assert built.optimizer.defaults[key] == value, key
    assert built.optimizer.seed == raw["optimizer_kwargs"].get("seed", 0)
    assert built.optimizer.noise_norm == raw["optimizer_kwargs"].get("noise_norm", "segment")
    assert built.scaler is not None
    for key, value in raw["vgs"].items():
        assert built.scaler.hyperparams[key] == value, key


def test_current_defaults_is_every_library_default():
    built = upgd_ref.from_config(CONFIGS / "current_defaults.yaml", LAYOUT)
    assert built.optimizer.defaults == UPGD_DEFAULTS
    assert built.scaler.hyperparams == VGS_DEFAULTS


def test_recommended_keeps_the_noise_to_signal_ratio_at_sigma_under_vgs():
    built = upgd_ref.from_config(CONFIGS / "recommended.yaml", LAYOUT)
    sigma = built.optimizer.defaults["sigma"]
    rng = np.random.default_rng(0)
    params = LAYOUT.pack([rng.standard_normal(s) for s in LAYOUT.shapes])
    for _ in range(3):
        grads = LAYOUT.pack([rng.standard_normal(s) * 0.1 for s in LAYOUT.shapes])
        info = built.optimizer.step(params, grads, vgs=built.scaler)
        np.testing.assert_allclose(info.noise_to_signal, sigma, rtol=64 * 2.0**-53)


# --- from_config ------------------------------------------------------------------------


def test_dict_config_and_no_scaler():
    built = upgd_ref.from_config({"optimizer_kwargs": {"lr": 0.5}}, LAYOUT)
    assert built.optimizer.defaults["lr"] == 0.5 and built.scaler is None
    assert upgd_ref.from_config({"vgs": None}, LAYOUT).scaler is None
    disabled = upgd_ref.from_config({"vgs": {"enabled": False}}, LAYOUT).scaler
    assert disabled is not None and disabled.hyperparams["enabled"] is False


def test_exponent_without_a_dot_is_a_float(tmp_path):
    path = write(tmp_path, "optimizer_kwargs:\n  lr: 3e-4\n  min_noise_std: 1E-7\n")
    config = load_config(path)
    assert config.hyperparams["lr"] == 3e-4 and config.hyperparams["min_noise_std"] == 1e-7


def test_param_groups_and_backend(tmp_path):
    path = write(tmp_path, "optimizer_kwargs:\n  param_groups:\n    - segments: [1]\n      lr: 0.25\n")
    built = upgd_ref.from_config(path, LAYOUT, backend="reference")
    lrs = {s: g["lr"] for g in built.optimizer.param_groups for s in g["segments"]}
    assert lrs == {0: UPGD_DEFAULTS["lr"], 1: 0.25, 2: UPGD_DEFAULTS["lr"]}
    assert built.optimizer.backend == "reference"


def test_to_dict_round_trips():
    config = load_config(CONFIGS / "aggressive_exploration.yaml")
    again = load_config(config.to_dict())
    assert (again.hyperparams, again.vgs, again.seed, again.noise_norm) == (
        config.hyperparams, config.vgs, config.seed, config.noise_norm)


# --- the UPGD family (specs/algorithm.md §7) ---------------------------------------------------


FAMILY_CONFIGS = [
    ("AdaptiveUPGD", {}, "AdaptiveUPGD", upgd_ref.reference.PRODUCTION),
    ("AdaptiveUPGD", {"profile": "production"}, "AdaptiveUPGD", upgd_ref.reference.PRODUCTION),
    ("AdaptiveUPGD", {"profile": "paper"}, "AdaptiveUPGD",
     upgd_ref.reference.UPGDVariant("adam", "max", 2.0, "terms")),
    ("UPGD", {}, "UPGD", upgd_ref.reference.UPGDVariant(moments="none")),
    ("UPGD", {"profile": "paper"}, "UPGD", upgd_ref.reference.UPGDVariant("none", "max", 2.0, "sum")),
    ("UPGDW", {}, "UPGDW", upgd_ref.reference.PRODUCTION),
    ("UPGDW", {"profile": "production", "amsgrad": False}, "UPGDW", upgd_ref.reference.PRODUCTION),
]


@pytest.mark.parametrize("optimizer, extra, cls, variant", FAMILY_CONFIGS,
                         ids=[f"{o}-{e.get('profile', '-')}" for o, e, _, _ in FAMILY_CONFIGS])
def test_from_config_builds_each_family_member(tmp_path, optimizer, extra, cls, variant):
    text = yaml.safe_dump({"optimizer": optimizer, "optimizer_kwargs": {"sigma": 0.01, "seed": 3, **extra},
                           "vgs": {"warmup_steps": 2}})
    built = upgd_ref.from_config(write(tmp_path, text), LAYOUT, backend="reference")
    assert type(built.optimizer) is getattr(upgd_ref, cls)
    assert built.optimizer.variant == variant
    assert built.config.optimizer == optimizer and built.config.profile == extra.get("profile", "production")
    assert built.optimizer.defaults["sigma"] == 0.01 and built.optimizer.seed == 3
    direct = getattr(upgd_ref, cls)(LAYOUT, sigma=0.01, seed=3, backend="reference",
                                    **{k: v for k, v in extra.items() if not (cls == "UPGDW" and k == "profile")})
    assert built.optimizer.step_hyperparams() == direct.step_hyperparams()
    # the same trajectory as the class built by hand
    rng = np.random.default_rng(1)
    p1 = LAYOUT.pack([rng.standard_normal(s) for s in LAYOUT.shapes])
    p2 = p1.copy()
    for _ in range(3):
        g = LAYOUT.pack([rng.standard_normal(s) for s in LAYOUT.shapes])
        built.optimizer.step(p1, g.copy())
        direct.step(p2, g.copy())
    np.testing.assert_array_equal(p1, p2)
    # to_dict is explicit and round-trips to the same optimizer
    again = load_config(built.config.to_dict())
    assert (again.optimizer, again.profile, again.hyperparams) == (optimizer, built.config.profile,
                                                                   built.config.hyperparams)


def test_member_defaults():
    upgd = upgd_ref.from_config({"optimizer": "UPGD"}, LAYOUT).optimizer
    assert {k: upgd.defaults[k] for k in ("lr", "weight_decay", "beta_utility", "sigma")} == {
        "lr": 1e-5, "weight_decay": 0.001, "beta_utility": 0.999, "sigma": 0.001}
    upgdw = upgd_ref.from_config({"optimizer": "UPGDW"}, LAYOUT)
    d = upgdw.optimizer.defaults
    assert (d["lr"], d["beta1"], d["beta2"], d["eps"], d["weight_decay"], d["sigma"]) == (
        1e-4, 0.9, 0.999, 1e-8, 0.01, 0.001)
    assert upgdw.config.hyperparams["beta_utility"] == 0.999
    assert upgdw.config.to_dict()["optimizer_kwargs"]["betas"] == [0.9, 0.999]
    assert upgdw.config.to_dict()["optimizer_kwargs"]["amsgrad"] is False
    assert "beta_utility" not in upgdw.config.to_dict()["optimizer_kwargs"]
    paper = upgd_ref.from_config({"optimizer_kwargs": {"profile": "paper"}}, LAYOUT)
    assert paper.optimizer.defaults["eps"] == 1e-5 == paper.config.hyperparams["eps"]
    given = upgd_ref.from_config({"optimizer_kwargs": {"profile": "paper", "eps": 1e-3}}, LAYOUT)
    assert given.optimizer.defaults["eps"] == 1e-3


def test_upgdw_betas_set_beta_utility(tmp_path):
    path = write(tmp_path, "optimizer: UPGDW\noptimizer_kwargs:\n  betas: [0.8, 0.95]\n  lr: 0.01\n"
                           "  param_groups:\n    - segments: [1]\n      beta2: 0.5\n")
    built = upgd_ref.from_config(path, LAYOUT)
    hyper = built.optimizer.step_hyperparams()
    assert [(h["beta1"], h["beta2"], h["beta_utility"]) for h in hyper] == [
        (0.8, 0.95, 0.95), (0.8, 0.5, 0.5), (0.8, 0.95, 0.95)]
    assert built.config.hyperparams["beta_utility"] == 0.95


BAD_CONFIGS = [
    ("optimizer: UPGDW\noptimizer_kwargs:\n  amsgrad: true\n", "optimizer_kwargs.amsgrad must be false"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  amsgrad: 1\n", "optimizer_kwargs.amsgrad"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  betas: 0.9\n", "optimizer_kwargs.betas must be a list"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  betas: [0.9, 0.9, 0.9]\n", "optimizer_kwargs.betas must be a list"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  betas: [0.9, 1.0]\n", "optimizer_kwargs.betas[1] must be in [0, 1)"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  betas: [-0.1, 0.9]\n", "optimizer_kwargs.betas[0] must be in [0, 1)"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  beta_utility: 0.9\n", "optimizer_kwargs.beta_utility"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  beta2: 0.9\n", "optimizer_kwargs.beta2"),
    ("optimizer: UPGDW\noptimizer_kwargs:\n  profile: paper\n", "optimizer_kwargs.profile must be one of"),
    ("optimizer: UPGD\noptimizer_kwargs:\n  beta1: 0.9\n", "optimizer_kwargs.beta1"),
    ("optimizer: UPGD\noptimizer_kwargs:\n  eps: 1.0e-8\n", "optimizer_kwargs.eps"),
    ("optimizer: UPGD\noptimizer_kwargs:\n  betas: [0.9, 0.9]\n", "optimizer_kwargs.betas"),
    ("optimizer_kwargs:\n  profile: original\n", "optimizer_kwargs.profile must be one of"),
    ("optimizer_kwargs:\n  amsgrad: false\n", "optimizer_kwargs.amsgrad"),
    ("optimizer: upgd\n", "optimizer must be one of"),
    ("optimizer: [1, 2\n", "not valid YAML"),
    ("", "empty"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("optimiser: AdaptiveUPGD\n", "optimiser"),
    ("optimizer: Adam\n", "optimizer must be one of"),
    ("optimizer_kwargs: 3\n", "optimizer_kwargs must be a mapping"),
    ("optimizer_kwargs:\n  learning_rate: 0.1\n", "optimizer_kwargs.learning_rate"),
    ("optimizer_kwargs:\n  lr: fast\n", "optimizer_kwargs.lr must be a real number"),
    ("optimizer_kwargs:\n  lr: -1.0\n", "optimizer_kwargs.lr must be >= 0"),
    ("optimizer_kwargs:\n  beta1: 1.0\n", "optimizer_kwargs.beta1 must be in [0, 1)"),
    ("optimizer_kwargs:\n  sigma: .nan\n", "optimizer_kwargs.sigma must be finite"),
    ("optimizer_kwargs:\n  adaptive_noise: 1\n", "optimizer_kwargs.adaptive_noise must be a bool"),
    ("optimizer_kwargs:\n  noise_norm: layer\n", "optimizer_kwargs.noise_norm must be one of"),
    ("optimizer_kwargs:\n  seed: -3\n", "optimizer_kwargs.seed must be in"),
    ("optimizer_kwargs:\n  seed: true\n", "optimizer_kwargs.seed must be an int"),
    ("optimizer_kwargs:\n  param_groups: {lr: 1.0}\n", "optimizer_kwargs.param_groups must be a list"),
    ("optimizer_kwargs:\n  param_groups:\n    - segments: [0]\n      lr: -2.0\n",
     "optimizer_kwargs.param_groups[0].lr must be >= 0"),
    ("optimizer_kwargs:\n  param_groups:\n    - segments: [0]\n      betas: [0.9, 0.99]\n",
     "optimizer_kwargs.param_groups[0].betas"),
    ("optimizer_kwargs:\n  param_groups:\n    - segments: first\n", "param_groups[0].segments must be a list"),
    ("vgs: on\n", "vgs must be a mapping"),
    ("vgs:\n  alpha_: 0.1\n", "vgs.alpha_"),
    ("vgs:\n  beta: 0.0\n", "vgs.beta must be in (0, 1)"),
    ("vgs:\n  variance_cap: -1.0\n", "vgs.variance_cap must be > 0"),
    ("vgs:\n  min_scaling_factor: 0.0\n", "vgs.min_scaling_factor must be in (0, 1]"),
    ("vgs:\n  warmup_steps: 2.5\n", "vgs.warmup_steps must be an int"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_is_a_clear_error_naming_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        upgd_ref.from_config(path, LAYOUT)
    assert message in str(err.value)
    assert str(err.value).startswith(str(path))


def test_group_naming_a_missing_segment_is_caught_against_the_layout(tmp_path):
    path = write(tmp_path, "optimizer_kwargs:\n  param_groups:\n    - segments: [7]\n")
    load_config(path)  # fine without a layout
    with pytest.raises(ConfigError, match=r"optimizer_kwargs: .*segment 7"):
        upgd_ref.from_config(path, LAYOUT)


def test_missing_and_non_text_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(binary)
    with pytest.raises(ConfigError, match="path or a dict"):
        load_config(42)


# --- migration ----------------------------------------------------------------------------


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_migrate_with_given_grad_norm(tmp_path, capsys):
    old_path = CONFIGS / "current_defaults.yaml"
    old = load_config(old_path)
    out = tmp_path / "new.yaml"
    assert run_cli("migrate-config", old_path, "--grad-norm", "0.25", "--out", out) == 0
    printed = capsys.readouterr().out
    new = load_config(out)
    expected = float(f"{old.hyperparams['sigma'] / 0.25:.3g}")
    assert new.hyperparams["sigma"] == expected
    assert new.hyperparams["adaptive_noise"] and new.hyperparams["instant_noise_scale"]
    assert new.vgs == old.vgs
    assert f"{expected:g}" in printed and "noise-to-signal" in printed
    assert out.read_text().startswith("# Migrated by `upgd-ref migrate-config`")
    # The noise std at the typical norm is the old absolute sigma.
    layout = upgd_ref.FlatLayout([(16,)], dtype="float64")
    built = upgd_ref.from_config(out, layout)
    grads = layout.pack([np.full(16, 0.25 / 4.0)])  # ||g|| = 0.25
    info = built.optimizer.step(layout.zeros(), grads)
    assert math.isclose(info.noise_std[0], old.hyperparams["sigma"], rel_tol=1e-2)


def test_migrate_default_output_name_and_refusals(tmp_path, capsys):
    old = tmp_path / "prod.yaml"
    old.write_text((CONFIGS / "current_defaults.yaml").read_text())
    assert run_cli("migrate-config", old, "--grad-norm", "1.0") == 0
    assert (tmp_path / "prod.adaptive.yaml").exists()
    assert run_cli("migrate-config", old, "--grad-norm", "1.0", "--out", old) == 2
    assert "--out must differ" in capsys.readouterr().err
    assert run_cli("migrate-config", CONFIGS / "recommended.yaml", "--grad-norm", "1.0",
                   "--out", tmp_path / "x.yaml") == 2
    assert "already true" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a norm must be a positive number
        run_cli("migrate-config", old, "--grad-norm", "-1")
    with pytest.raises(SystemExit):  # one source of the norm is required
        run_cli("migrate-config", old)


def test_migrate_bad_input_file(tmp_path, capsys):
    bad = write(tmp_path, "optimizer_kwargs:\n  sigmaa: 0.1\n")
    assert run_cli("migrate-config", bad, "--grad-norm", "1.0") == 2
    assert "optimizer_kwargs.sigmaa" in capsys.readouterr().err


def test_migrate_groups_and_ema_form():
    config = load_config({"optimizer_kwargs": {
        "sigma": 0.002, "instant_noise_scale": False,
        "param_groups": [{"segments": [0], "sigma": 0.004}, {"segments": [1], "adaptive_noise": True, "sigma": 0.5},
                         {"segments": [2], "lr": 0.1}]}})
    new, lines = migrate(config, 0.2, "test")
    groups = new["optimizer_kwargs"]["param_groups"]
    assert new["optimizer_kwargs"]["sigma"] == float(f"{0.002 / 0.2:.3g}")
    assert groups[0]["sigma"] == float(f"{0.004 / 0.2:.3g}") and groups[0]["adaptive_noise"] is True
    assert groups[1]["sigma"] == 0.5  # already relative: untouched
    assert "sigma" not in groups[2]  # inherits the migrated default
    assert new["optimizer_kwargs"]["instant_noise_scale"] is True
    assert any("known flaw 1" in line for line in lines)
    with pytest.raises(ConfigError, match="finite number > 0"):
        migrate(config, 0.0, "test")


def test_typical_norm_from_npz(tmp_path):
    rng = np.random.default_rng(3)
    grads = {"w": rng.standard_normal((5, 3, 2)), "b": rng.standard_normal((5, 4)) * 10, "frozen": np.zeros((5, 2))}
    path = tmp_path / "grads.npz"
    np.savez(path, **grads)
    per_segment = [np.linalg.norm(g.reshape(5, -1), axis=1) for g in grads.values()]
    expected_segment = np.median(np.concatenate([n[n > 0] for n in per_segment]))
    expected_global = np.median(np.sqrt(sum(n**2 for n in per_segment)))
    assert typical_norm_from_npz(path) == pytest.approx(expected_segment, rel=1e-15)
    assert typical_norm_from_npz(path, "global") == pytest.approx(expected_global, rel=1e-15)


@pytest.mark.parametrize("arrays, message", [
    ({}, "holds no arrays"),
    ({"g": np.arange(4)}, "must be a float array"),
    ({"g": np.array([[np.nan, 1.0]])}, "non-finite"),
    ({"g": np.zeros((3, 2))}, "every gradient is zero"),
])
def test_bad_gradient_files(tmp_path, arrays, message):
    path = tmp_path / "g.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=message):
        typical_norm_from_npz(path)


def test_bad_gradient_file_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such gradient file"):
        typical_norm_from_npz(tmp_path / "none.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable"):
        typical_norm_from_npz(junk)
    np.savez(junk, a=np.ones((2, 3)), b=np.ones((3, 3)))
    with pytest.raises(ConfigError, match="same number of steps"):
        typical_norm_from_npz(junk, "global")


def test_migrate_with_probes(tmp_path, capsys):
    from upgd_ref.demo import probe_grad_norm

    old_path = CONFIGS / "current_defaults.yaml"
    out = tmp_path / "probe.yaml"
    assert run_cli("migrate-config", old_path, "--probe", "demo", "--probe-steps", "30", "--out", out) == 0
    norm = probe_grad_norm(load_config(old_path), steps=30)
    assert load_config(out).hyperparams["sigma"] == float(f"{0.001 / norm:.3g}")
    grads = tmp_path / "grads.npz"
    np.savez(grads, a=np.full((4, 9), 0.5))  # every step's norm is 1.5
    assert run_cli("migrate-config", old_path, "--probe", grads, "--out", out, "--force") == 0
    assert load_config(out).hyperparams["sigma"] == float(f"{0.001 / 1.5:.3g}")
    assert run_cli("migrate-config", old_path, "--probe", tmp_path / "missing.npz", "--out", out, "--force") == 2
    assert "no such gradient file" in capsys.readouterr().err
