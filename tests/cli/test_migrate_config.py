"""``upgd-ref migrate-config``: no silent overwrite, the template's comments kept, and a
``--probe demo`` that measures the number the demo prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from upgd_ref.cli import main
from upgd_ref.config import load_config
from upgd_ref.demo import DEMO_CONFIG

CONFIGS = Path(__file__).resolve().parents[2] / "specs" / "configs"


def _comments(text: str) -> list[str]:
    return [line[line.index("#"):].strip() for line in text.splitlines() if "#" in line]


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "new.yaml"
    out.write_text("keep me\n")
    argv = ["migrate-config", str(CONFIGS / "current_defaults.yaml"), "--grad-norm", "0.5", "--out", str(out)]
    assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert main([*argv, "--force"]) == 0
    assert load_config(out).hyperparams["sigma"] == 0.002


def test_refuses_to_overwrite_the_default_output(tmp_path, capsys):
    old = tmp_path / "prod.yaml"
    old.write_text((CONFIGS / "current_defaults.yaml").read_text())
    assert main(["migrate-config", str(old), "--grad-norm", "1.0"]) == 0
    first = (tmp_path / "prod.adaptive.yaml").read_text()
    assert main(["migrate-config", str(old), "--grad-norm", "2.0"]) == 2
    assert (tmp_path / "prod.adaptive.yaml").read_text() == first


def test_keeps_every_comment_and_key_order_of_the_template(tmp_path):
    template = CONFIGS / "current_defaults.yaml"
    out = tmp_path / "new.yaml"
    assert main(["migrate-config", str(template), "--grad-norm", "0.25", "--out", str(out)]) == 0
    old_text, new_text = template.read_text(), out.read_text()
    new_comments = _comments(new_text)
    assert all(comment in new_comments for comment in _comments(old_text))
    keys = lambda text: re.findall(r"^\s*(\w+):", text, re.M)  # noqa: E731
    assert keys(new_text) == keys(old_text)  # nothing added: adaptive_noise etc. are in the template
    assert "new values: optimizer_kwargs.sigma, optimizer_kwargs.adaptive_noise" in new_text
    migrated = yaml.safe_load(new_text)  # plain YAML 1.1 readers see numbers, not strings
    assert migrated["optimizer_kwargs"]["sigma"] == 0.004 and migrated["optimizer_kwargs"]["adaptive_noise"] is True
    unchanged = yaml.safe_load(old_text)
    for section in ("optimizer_kwargs", "vgs"):
        for key, value in unchanged[section].items():
            if key not in ("sigma", "adaptive_noise"):
                assert migrated[section][key] == value, key


def test_probe_demo_reports_the_demo_calibration_norm(tmp_path, capsys):
    """Same config, steps and seed: `demo` and `migrate-config --probe demo` print one number,
    described the same way."""
    config = tmp_path / "demo.yaml"
    short_warmup = dict(DEMO_CONFIG, vgs={"enabled": True, "warmup_steps": 10})  # the demo needs steps > warmup
    config.write_text(yaml.safe_dump(short_warmup, sort_keys=False))
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "20", "--seed", "3", "--out", str(out), "--quiet", "--config", str(config)]) == 0
    demo_text = capsys.readouterr().out
    norm = json.loads((out / "demo.json").read_text())["probe_grad_norm"]
    assert main(["migrate-config", str(config), "--probe", "demo", "--probe-steps", "20", "--probe-seed", "3",
                 "--out", str(tmp_path / "m.yaml")]) == 0
    migrate_text = capsys.readouterr().out
    assert f"typical gradient norm N = {norm:.4g}" in migrate_text
    assert f"calibration norm N = {norm:.4g}" in demo_text
    description = re.search(r"calibration norm N = \S+: (.*)", demo_text).group(1)
    assert description.startswith("median per-segment gradient norm before VGS over the first 20 steps")
    assert description in migrate_text
    expected_sigma = float(f"{DEMO_CONFIG['optimizer_kwargs']['sigma'] / norm:.3g}")
    assert load_config(tmp_path / "m.yaml").hyperparams["sigma"] == expected_sigma
