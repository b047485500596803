"""The native path under sharding (``specs/adapters-jax.md`` §11): 8 host devices in a
subprocess (``tests/helpers/jax_sharded.py``), every family member, VGS on and off,
adaptive noise on, 10 steps, the tree replicated, sharded on dim 0, on dim 1 and over a
2-D mesh under ``jax.jit``, and written per device with ``shard_map`` (each placement taken by
two members, to bound the compilations).

Asserted: the final parameters and every state leaf are **bit-identical** to the unsharded
run, on every placement: the per-segment statistics (step counts, ``n_i`` from the folded
sums of ``g**2``, the VGS statistics from the folded means, the skip counter) and the
element-wise fields (parameters, ``u``, ``m``, ``v``; the step is re-emitted with its
divisions by scalars, its float32 ``exp`` and its multiply-adds made program-independent,
§11). The per-device draw of the normals is checked against the core directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.jax_sharded import CONFIGS

ROOT = Path(__file__).resolve().parents[3]
ELEMENTWISE = ("['params']", "utility", "first_moment", "second_moment")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "runs.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "tests.helpers.jax_sharded", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(out) as data:
        return dict(data)


def _placements(runs, config):
    return sorted({key.split("/")[1] for key in runs if key.startswith(config + "/")} - {"unsharded"})


def test_every_placement_runs():
    placements = {p for _, _, assigned in CONFIGS for p in assigned}
    assert placements == {"jit-replicated", "jit-dim0", "jit-dim1", "jit-mesh2d", "shard_map-dim0", "shard_map-mesh2d"}
    assert {vgs for _, vgs, _ in CONFIGS} == {False, True}


@pytest.mark.parametrize("member,vgs,assigned", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_sharded_runs_equal_the_unsharded_run(runs, member, vgs, assigned):
    config = f"{member}-vgs{int(vgs)}"
    placements = _placements(runs, config)
    assert placements == sorted(assigned)
    base = {key.split("/", 2)[2]: value for key, value in runs.items() if key.startswith(f"{config}/unsharded/")}
    statistics = [name for name in base if not any(tag in name for tag in ELEMENTWISE)]
    assert any("grad_norm_ema" in name for name in statistics)
    assert not vgs or any("grad_sq_avg" in name for name in statistics)
    assert len(statistics) < len(base)  # the element-wise fields are compared too
    for placement in placements:
        for name, want in base.items():
            np.testing.assert_array_equal(runs[f"{config}/{placement}/{name}"], want, err_msg=f"{placement} {name}")


def test_normals_drawn_by_global_index_equal_the_core():
    """The per-device draw (``normals_at``) at strided and unaligned indices, across the
    ``block_hi`` boundary at ``2**34``: the core's normals, in float64 and float32."""
    import jax.numpy as jnp

    from upgd_ref import rng
    from upgd_ref.adapters.jax.leaves import x64_scope
    from upgd_ref.adapters.jax.normals import normals_at

    starts = [0, 3, 1001, 2**34 - 6]
    with x64_scope():
        for start in starts:
            index = start + 3 * np.arange(40, dtype=np.uint64).reshape(8, 5)
            want = np.stack([rng.standard_normals(2**40 + 5, 2**33 + 1, int(i), 1) for i in index.ravel()])
            for dtype in (np.float64, np.float32):
                got = normals_at(2**40 + 5, jnp.asarray(2**33 + 1, dtype=jnp.uint64), jnp.asarray(index), dtype)
                np.testing.assert_array_equal(np.asarray(got).ravel(), want.ravel().astype(dtype))
