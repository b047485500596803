"""A built wheel holds everything an installed copy needs (the golden data, the CUDA source,
the command line) and verifies the golden vectors from outside the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "upgd_ref" / "golden" / "data"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, text=True)
    (path,) = out.glob("upgd_ref-*.whl")
    return path


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_wheel_holds_the_golden_data_the_cuda_source_and_the_cli(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in GOLDEN.iterdir() if p.suffix in (".npz", ".json")}
    assert len(shipped) == 26 and {f"upgd_ref/golden/data/{n}" for n in shipped} <= names
    assert "upgd_ref/kernels/upgd_step.cu" in names
    cli = {p.name for p in (ROOT / "upgd_ref" / "cli").glob("*.py")}
    assert {f"upgd_ref/cli/{n}" for n in cli} <= names
    assert not any(n.startswith(("benchmarks/", "tests/", "specs/")) for n in names)


def test_the_unpacked_wheel_verifies_the_golden_vectors_from_elsewhere(unpacked, tmp_path):
    where = _run(unpacked, tmp_path, "-c", "import json, upgd_ref, upgd_ref.golden as g, upgd_ref.bench as b; "
                 "print(json.dumps([upgd_ref.__file__, str(g.DEFAULT_DIR), [str(p) for p in b.default_baselines()]]))")
    package, data, baselines = json.loads(where.stdout.splitlines()[-1])
    assert Path(package).is_relative_to(unpacked) and Path(data) == unpacked / "upgd_ref" / "golden" / "data"
    assert baselines == []  # the PyTorch baseline stays in the checkout
    done = _run(unpacked, tmp_path, "-m", "upgd_ref.cli", "golden", "verify", "--backend", "reference")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "all golden cases verified"
    assert done.stdout.count("ok   reference") == 35  # 25 cases; 10 with VGS on both paths (16-bit: fused)
