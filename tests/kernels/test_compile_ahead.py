"""Kernels compiled ahead of need in forked children (``specs/kernels.md`` §7): on a cold
cache the first step's reduction and pass 2 are loaded from the cache the children wrote
while the process compiled pass 1, with the same result as a process that loads every kernel from a warm cache; a warm
process forks nothing. The compile notice is logged once, by the process itself.

Each case runs in a fresh process with its own ``NUMBA_CACHE_DIR`` (a temporary directory),
so it takes some seconds. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from upgd_ref.kernels import compile_ahead
from upgd_ref.kernels.compile_notice import MESSAGE
from upgd_ref.kernels.numba_step import segment_reductions

SCRIPT = """
import json, logging, os
import numpy as np
import upgd_ref
from upgd_ref.kernels import compile_ahead, numba_step as k
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
forks = []
fork = os.fork
os.fork = lambda: forks.append(1) or fork()
layout = upgd_ref.FlatLayout([(300,), (7,)], dtype="float32")
rng = np.random.default_rng(5)
params = layout.pack([rng.standard_normal(300), rng.standard_normal(7)])
grads = layout.pack([rng.standard_normal(300), rng.standard_normal(7)])
upgd_ref.AdaptiveUPGD(layout, backend="numba", seed=3, adaptive_noise=True).step(params, grads)
def stats(kernel):
    return [sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values())]
print(json.dumps({"pass1": stats(k.pass1_chunks), "pass2": stats(k.pass2_chunks),
                  "reduce": stats(k.segment_reductions), "forks": len(forks),
                  "children": len(compile_ahead._children), "params": params.tobytes().hex()}))
"""


def run_fresh_process(cache_dir, **environment) -> tuple[dict, str]:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **environment)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          check=True)
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")
def test_pass2_is_compiled_by_a_forked_child_on_a_cold_cache_only(tmp_path):
    cold, cold_stderr = run_fresh_process(tmp_path)
    assert cold["forks"] == 2 and cold["children"] == 0  # forked, and waited for
    assert cold["pass1"] == [0, 1]  # compiled here
    # loaded from the cache the children wrote: the predicted signatures
    assert cold["reduce"] == [1, 0] and cold["pass2"] == [1, 0]
    assert cold_stderr.count(MESSAGE) == 1, cold_stderr

    warm, warm_stderr = run_fresh_process(tmp_path)
    assert warm["forks"] == 0 and warm["pass1"] == warm["reduce"] == warm["pass2"] == [1, 0]
    assert MESSAGE not in warm_stderr, warm_stderr
    assert warm["params"] == cold["params"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")
def test_the_environment_switch_compiles_everything_in_the_process(tmp_path):
    cold, cold_stderr = run_fresh_process(tmp_path / "off", **{compile_ahead.ENVIRONMENT_SWITCH: "0"})
    assert cold["forks"] == 0
    assert cold["pass1"] == cold["reduce"] == cold["pass2"] == [0, 1]  # compiled here
    assert cold_stderr.count(MESSAGE) == 1, cold_stderr
    forked, _ = run_fresh_process(tmp_path / "on")
    assert forked["forks"] == 2 and forked["params"] == cold["params"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")
def test_a_child_that_uses_no_cpu_is_killed_and_reaped(monkeypatch):
    """A child stuck on a lock it inherited (here: asleep) costs ``STALL_S``, not a hang."""
    monkeypatch.setattr(compile_ahead, "STALL_S", 0.2)
    args = (np.zeros((1, 4), np.int64), np.ones(1, np.bool_), np.zeros((1, 7)), 1)
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    key = (segment_reductions, compile_ahead._signature(segment_reductions, args))
    monkeypatch.setitem(compile_ahead._children, key, pid)
    start = time.monotonic()
    compile_ahead.wait_for(segment_reductions, args)
    assert time.monotonic() - start < 30 and not compile_ahead._children
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(pid, 0)
