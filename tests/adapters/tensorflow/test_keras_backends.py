"""The Keras optimizer on the JAX and torch Keras backends, and under a TensorFlow
``MirroredStrategy`` (``specs/adapters-tensorflow.md`` §3, §8): each run in its own
subprocess (the Keras backend and the logical devices are fixed at import), bounded in time.

JAX: ``model.fit`` with ``jit_compile=True`` runs the native step; torch: the host path (the
core classes), bit-identical to the core API. On both, every step lies within the tolerance
contract of the float64 reference (normals drawn by the test as ``upgd_ref.noise``), the loss
falls, and save -> load -> continue equals uninterrupted training bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upgd_ref import tolerances

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT_S = 420


def _run(backend: str, mode: str, tmp_path) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, KERAS_BACKEND=backend, UPGD_TEST_TMP=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-m", "tests.helpers.keras_backends", mode, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_fit_on_the_backend_is_within_the_contract_and_resumes_exactly(backend, tmp_path):
    result = _run(backend, "fit", tmp_path)
    assert result["backend"] == backend
    assert len(result["worst"]) == 6 and max(result["worst"]) <= 1.0, result["worst"]
    assert result["upgd_step"] == 6
    assert result["losses"][-1] < result["losses"][0]
    if backend == "torch":  # the host path: the core classes themselves
        assert all(result["identical"])
    assert result["resumed_equal"]


def test_mirrored_strategy_on_two_devices_equals_one_device(tmp_path):
    result = _run("tensorflow", "mirrored", tmp_path)
    assert result["replicas"] == 2
    assert result["replicas_equal"]  # the replicas' copies agree bit for bit
    assert result["upgd_step"] == 6
    # Two replicas sum their half-batch gradients in another order than one device, and the
    # single device runs under XLA: the trajectories differ by rounding, at most the
    # contract's parameter ulps per step, accumulated over the steps (relative to max |p|).
    bound = tolerances.unit_roundoff("float32") * tolerances.PARAM_ULPS * result["upgd_step"]
    assert result["max_difference"] <= bound, result
