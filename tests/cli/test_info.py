"""``upgd-ref info``: versions without importing frameworks, backends and why not, Numba."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import numba
import numpy as np
import pytest

from upgd_ref import backends
from upgd_ref.cli import main
from upgd_ref.environment import backend_report, package_versions


def test_info_reports_versions_backends_threads_and_caches(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"numpy              {np.__version__}" in text
    assert f"numba              {numba.__version__}" in text
    assert f"torch              {importlib.metadata.version('torch')}" in text
    for entry in backend_report():
        assert entry["name"] in text
    assert "threading layer" in text and "kernel cache" in text
    assert f"in use of {numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)" in text


def test_info_json_matches_the_library_report(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"] == package_versions()
    assert [b["name"] for b in report["backends"]] == list(backends.BACKENDS.registrations)
    assert report["numba"]["threads"] == numba.config.NUMBA_NUM_THREADS
    assert report["numba"]["threading_layer"] in report["numba"]["threading_layers_loadable"]


def test_every_unavailable_backend_says_why():
    for entry in backend_report():
        assert entry["available"] == (entry["reason"] is None)
        if entry["name"] in ("reference", "numba"):
            assert entry["available"]
    assert backends.absence_reason("reference") is None
    cupy = next(b for b in backend_report() if b["name"] == "cupy")
    if not backends._cuda_driver_loads():
        assert cupy["reason"] == "no CUDA driver: libcuda.so.1 does not load"


def test_absence_reason_names_unknown_backends():
    with pytest.raises(ValueError, match="no-such-backend"):
        backends.absence_reason("no-such-backend")


def test_info_imports_no_framework():
    script = ("import sys\nfrom upgd_ref.cli import main\nmain(['info'])\n"
              "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'keras', 'optax', 'cupy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"
