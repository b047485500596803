"""Registration and plumbing of the numba backend: ``"auto"`` picks it for NumPy buffers, the
package works without Numba, ``warmup`` compiles everything, and the chunk table covers every
element exactly once (``specs/kernels.md`` §2)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref import FlatLayout
from upgd_ref.backends import BACKENDS, auto_order, available_backends, select_backend
from upgd_ref.kernels import NumbaBackend
from upgd_ref.kernels.numba_backend import chunk_table, kernel_cache_stats
from upgd_ref.kernels.numba_step import CHUNK, KERNELS, LENGTH, LOGICAL, SEGMENT, START


def test_auto_picks_numba_for_numpy_buffers():
    assert auto_order()[0] == "numba" and isinstance(BACKENDS["numba"], NumbaBackend)
    assert select_backend("auto", np.zeros(3, dtype=np.float32)) is BACKENDS["numba"]
    assert select_backend("auto", np.zeros(3)) is BACKENDS["reference"]  # float64: the literal truth


def test_package_imports_and_steps_without_numba():
    """With ``numba`` unimportable the reference serves ``"auto"`` and nothing needs compiling."""
    script = """
import sys, json
sys.modules["numba"] = None  # import numba now raises ImportError
import numpy as np, upgd_ref
from upgd_ref.backends import BACKENDS, auto_order
layout = upgd_ref.FlatLayout([(3,), (2, 2)], dtype="float64")
params = layout.pack([np.ones(3), np.ones((2, 2))])
info = upgd_ref.AdaptiveUPGD(layout, lr=0.1).step(params, layout.pack([np.full(3, 0.5), np.zeros((2, 2))]))
print(json.dumps({"backends": list(BACKENDS), "auto": auto_order(), "warmup": upgd_ref.warmup(),
                  "step": info.step, "numba_loaded": "upgd_ref.kernels.numba_backend" in sys.modules}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["backends"][0] == "reference" and "numba" not in result["backends"]
    assert set(result["backends"]) <= {"reference", "cupy", "cuda-emulator"}  # the CUDA ones need no Numba
    assert result["auto"] == ["reference"] and "numba" not in result["warmup"]
    assert result["step"] == 1 and result["numba_loaded"] is False


def test_warmup_compiles_or_loads_every_kernel():
    timings = upgd_ref.warmup(("float32",))
    assert set(timings) == set(available_backends(emulators=True)) - {"reference"} and timings["numba"] >= 0.0
    assert all(kernel.signatures for kernel in KERNELS)  # every kernel has a compiled version
    hits, misses = kernel_cache_stats()
    assert hits + misses >= len(KERNELS)


shapes = st.lists(st.one_of(st.integers(0, 3 * CHUNK + 5), st.sampled_from([0, CHUNK - 1, CHUNK, CHUNK + 1])),
                  min_size=1, max_size=6)


@settings(max_examples=50, deadline=None)
@given(sizes=shapes, dtype=st.sampled_from(["float32", "float64"]))
def test_chunk_table_covers_every_element_once_in_order(sizes, dtype):
    layout = FlatLayout([(n,) for n in sizes], dtype=dtype)
    table = chunk_table(layout)
    assert table.dtype == np.int64 and not table.flags.writeable
    assert np.all((table[:, LENGTH] >= 1) & (table[:, LENGTH] <= CHUNK))
    for i in range(layout.num_segments):
        rows = table[table[:, SEGMENT] == i]
        covered = np.concatenate([np.arange(a, a + n) for a, n in zip(rows[:, START], rows[:, LENGTH])] or [[]])
        assert np.array_equal(covered, np.arange(layout.offsets[i], layout.offsets[i] + layout.sizes[i]))
        assert np.array_equal(rows[:, LOGICAL] - layout.logical_offsets[i], rows[:, START] - layout.offsets[i])
    assert np.all(np.diff(table[:, SEGMENT]) >= 0)  # chunk order is segment order
