"""Thread safety (``specs/step.md`` §5, ``specs/kernels.md`` §2.1).

* One optimizer (and its scaler) stepped from two threads at once: the calls are serialised,
  so no step is lost, the per-segment counts never pass the global one, and the result is the
  sequential run's, bit for bit (every step gets the same gradient, so the order of the
  threads' steps cannot change it). Every NumPy backend.
* Two optimizers in two threads, each in a subprocess with ``NUMBA_NUM_THREADS=2``: the
  kernels run split over the launch pool (layouts above ``PARALLEL_MIN_SIZE``), nothing aborts,
  and both results equal the sequential ones bit for bit; the kernels never start Numba's
  threading layer, and a user who started it (``numba.set_num_threads``, here on
  ``workqueue``, which aborts on concurrent parallel launches) sets the thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from upgd_ref import AdaptiveUPGD, FlatLayout, UPGDW, VarianceGradientScaler

from tests.helpers.snapshots import random_buffers, snapshot

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40  # per thread


def _in_threads(*targets) -> None:
    """Run each target in its own thread, started together; re-raise the first error."""
    errors, start = [], threading.Barrier(len(targets))

    def run(target):
        try:
            start.wait()
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


@pytest.fixture
def tiny_switch_interval():
    """Let the interpreter switch threads as often as it can, so an unserialised step would race."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _setup(backend, with_vgs):
    layout = FlatLayout([(64, 33), (0,), (129,)], dtype="float32")
    opt = UPGDW(layout, lr=1e-2, sigma=0.05, adaptive_noise=True, seed=3, backend=backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=2, backend=backend) if with_vgs else None
    params, grads = random_buffers(layout, 8)
    return layout, opt, vgs, params, grads


@pytest.mark.parametrize("with_vgs", [False, True], ids=["alone", "fused-vgs"])
def test_one_optimizer_from_two_threads_is_serialised(backend, with_vgs, tiny_switch_interval):
    layout, opt, vgs, params, grads = _setup(backend, with_vgs)
    _, ref_opt, ref_vgs, ref_params, _ = _setup(backend, with_vgs)

    def steps(o, v, p):
        for _ in range(STEPS):
            g = grads.copy()  # the same gradient every step: the order of the steps does not matter
            o.step(p, g, vgs=v)

    _in_threads(lambda: steps(opt, vgs, params), lambda: steps(opt, vgs, params))
    steps(ref_opt, ref_vgs, ref_params)
    steps(ref_opt, ref_vgs, ref_params)
    assert opt.state.step == 2 * STEPS and (opt.state.segment_step == 2 * STEPS).all()
    if with_vgs:
        assert vgs.state.step == 2 * STEPS
    assert snapshot(params, opt, vgs) == snapshot(ref_params, ref_opt, ref_vgs)
    opt.load_state_dict(opt.state_dict())  # the optimizer's own checkpoint still loads


def test_one_scaler_from_two_threads_is_serialised(backend, tiny_switch_interval):
    layout, _, vgs, _, grads = _setup(backend, True)
    _, _, ref_vgs, _, _ = _setup(backend, True)

    def updates(v):
        for _ in range(STEPS):
            v.update(grads)
            v.scaling_factor()

    _in_threads(lambda: updates(vgs), lambda: updates(vgs))
    updates(ref_vgs)
    updates(ref_vgs)
    assert vgs.state.step == 2 * STEPS
    assert snapshot(vgs) == snapshot(ref_vgs)


def test_state_dict_in_another_thread_sees_whole_steps(backend, tiny_switch_interval):
    """``state_dict`` taken while another thread steps is always the state after some
    complete step, exactly as the sequential run has it, and loads into a fresh optimizer."""
    layout, opt, _, params, grads = _setup(backend, False)
    _, ref_opt, _, ref_params, _ = _setup(backend, False)
    after = [snapshot(ref_opt.state_dict()["state"])]
    for _ in range(STEPS):
        ref_opt.step(ref_params, grads.copy())
        after.append(snapshot(ref_opt.state_dict()["state"]))
    seen = []

    def stepper():
        for _ in range(STEPS):
            opt.step(params, grads.copy())

    def saver():
        for _ in range(3 * STEPS):
            state = opt.state_dict()
            seen.append(snapshot(state["state"]) == after[state["state"]["step"]])
            UPGDW(layout, backend=backend).load_state_dict(state)

    _in_threads(stepper, saver)
    assert opt.state.step == STEPS and all(seen)


def test_copies_and_pickles_get_their_own_lock():
    import copy
    import pickle

    layout = FlatLayout([(3,)], dtype="float64")
    opt, vgs = AdaptiveUPGD(layout), VarianceGradientScaler(layout)
    for obj in (opt, vgs):
        for clone in (copy.deepcopy(obj), pickle.loads(pickle.dumps(obj))):
            assert clone.exclusive() is not obj.exclusive()
            assert snapshot(clone) == snapshot(obj)
            with clone.exclusive():  # free, and re-entrant
                with clone.exclusive():
                    pass


# --- two optimizers in two threads, on the kernels' launch pool ----------------------------

_SCRIPT = r"""
import json, sys, threading, numpy as np, numba, upgd_ref
from numba.np.ufunc import parallel as numba_parallel
from upgd_ref.kernels.numba_backend import PARALLEL_MIN_SIZE
from upgd_ref.kernels.numba_launch import thread_count
if sys.argv[1] == "set_num_threads":
    numba.set_num_threads(2)
layout = upgd_ref.FlatLayout([(PARALLEL_MIN_SIZE + 1000,), (7, 5)], dtype="float32")

def run(seed, out):
    opt = upgd_ref.AdaptiveUPGD(layout, lr=1e-2, sigma=0.05, adaptive_noise=True, seed=seed, backend="numba")
    vgs = upgd_ref.VarianceGradientScaler(layout, warmup_steps=1, backend="numba")
    rng = np.random.default_rng(seed)
    params = layout.pack([rng.standard_normal(s) for s in layout.shapes])
    for k in range(12):
        grads = layout.pack([rng.standard_normal(s) for s in layout.shapes])
        opt.step(params, grads, vgs=vgs)
        opt.noise()
    out[seed] = (params.tobytes() + opt.state.utility.tobytes() + opt.state.second_moment.tobytes()
                 + vgs.state.grad_sq_avg.tobytes()).hex()

sequential, threaded = {}, {}
for seed in (1, 2):
    run(seed, sequential)
for _ in range(3):
    threads = [threading.Thread(target=run, args=(seed, threaded)) for seed in (1, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert threaded == sequential, "threaded results differ from the sequential ones"
print(json.dumps({"layer_started": numba_parallel._is_initialized, "threads": thread_count(),
                  "equal": threaded == sequential}))
"""


@pytest.mark.parametrize("numba_layer", ["untouched", "set_num_threads"])
def test_two_optimizers_in_two_threads(numba_layer):
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, numba_layer], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, f"{numba_layer}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "layer_started": numba_layer == "set_num_threads", "threads": 2, "equal": True}
