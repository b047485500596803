"""The one-time compile notice (``specs/kernels.md`` §7): the first kernel a process compiles
logs one WARNING on the ``upgd_ref`` logger, later compilations nothing, and a process that
loads every kernel from Numba's cache nothing at all.

Each case runs in a fresh process with its own ``NUMBA_CACHE_DIR`` (a temporary directory)
and compiles two small serial kernels (the VGS scale and the finiteness scan), so it takes a
few seconds. No timing is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys

from upgd_ref.kernels.compile_notice import MESSAGE

SCRIPT = """
import logging
import numpy as np
from upgd_ref import FlatLayout
from upgd_ref.kernels import NumbaBackend
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
layout = FlatLayout([(5,)], dtype="float64")
backend = NumbaBackend(parallel_min_size=2**62)
grads = layout.zeros() + 1.0
backend.scale(layout=layout, grads=grads, factor=0.5, present=[True])
backend.nonfinite_counts(layout=layout, buffer=grads, present=[True])
print("done", grads[0])
"""


def run_fresh_process(cache_dir) -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          check=True)


def test_the_notice_is_logged_once_on_a_cold_cache_and_never_on_a_warm_one(tmp_path):
    cold = run_fresh_process(tmp_path)
    assert "done 0.5" in cold.stdout
    assert cold.stderr.count(MESSAGE) == 1, cold.stderr
    assert f"upgd_ref WARNING {MESSAGE}" in cold.stderr

    warm = run_fresh_process(tmp_path)  # same cache: both kernels are loaded, none compiled
    assert "done 0.5" in warm.stdout
    assert MESSAGE not in warm.stderr, warm.stderr
