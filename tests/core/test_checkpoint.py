"""State dicts and checkpoint files of AdaptiveUPGD and VarianceGradientScaler.

* Round trip: a copy restored from ``state_dict()``/``load_state_dict()`` or from
  ``save()``/``load()`` steps in lockstep with the original, bit for bit, for 25 steps
  (VGS on, adaptive noise, frozen segments, parameter groups, zero-size segments).
* Malformed state dicts and corrupt files: a ``ValueError``/``TypeError`` naming the field
  or the problem, and the target object bit-identical to before.

Runs against every registered backend.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile

import numpy as np
import pytest

from tests.helpers.snapshots import assert_unchanged, fingerprint, random_buffers, snapshot
from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref.checkpoint import read_state_dict, write_state_dict
from upgd_ref.state import UPGD_FORMAT, UPGD_VERSION, VGS_FORMAT, VGS_VERSION

SHAPES = [(3, 4), (5,), (2, 2, 2)]

# name -> (shapes, dtype, layout groups, optimizer kwargs, scaler kwargs or None)
CONFIGS = {
    "groups+vgs+adaptive": (
        SHAPES, "float32", None,
        dict(lr=1e-2, sigma=0.05, adaptive_noise=True, seed=5, noise_ema_init=1.0,
             param_groups=[{"segments": [0], "instant_noise_scale": False},
                           {"segments": [1, 2], "lr": 3e-2, "noise_beta": 0.9, "beta1": 0.8}]),
        dict(warmup_steps=2, alpha=0.5),
    ),
    "global-norm+zero-size+float64": (
        [(4,), (0,), (3, 3), (2, 0)], "float64", None,
        dict(lr=5e-3, sigma=0.1, adaptive_noise=True, instant_noise_scale=False, noise_ema_init=0.0,
             noise_norm="global", seed=2**64 - 1, weight_decay=0.1),
        dict(warmup_steps=0, alpha=1.0, variance_cap=None, beta=0.9, min_scaling_factor=0.2),
    ),
    "layout-groups+fixed-noise, no vgs": (
        SHAPES, "float32", [0, 1, 0],
        dict(lr=1e-2, sigma=0.01, seed=123,
             param_groups=[{"beta_utility": 0.9}, {"sigma": 0.2, "adaptive_noise": True, "min_noise_std": 0.05}]),
        None,
    ),
}


def build(name, backend):
    shapes, dtype, groups, opt_kwargs, vgs_kwargs = CONFIGS[name]
    layout = FlatLayout(shapes, dtype=dtype, groups=groups)
    opt = AdaptiveUPGD(layout, backend=backend, **copy.deepcopy(opt_kwargs))
    vgs = None if vgs_kwargs is None else VarianceGradientScaler(layout, backend=backend, **vgs_kwargs)
    return layout, opt, vgs


def present_at(k, num_segments):
    """Which segments have a gradient at step k: one frozen most steps, all frozen at 13."""
    if k == 13:
        return [False] * num_segments
    return [k % (num_segments + 1) != i + 1 for i in range(num_segments)]


def gradients(layout, params, k, present):
    """Deterministic gradients of step k (depending on params); NaN in frozen segments."""
    rng = np.random.default_rng(1000 + k)
    out = []
    for i, (shape, p) in enumerate(zip(layout.shapes, layout.unpack(params))):
        g = 0.3 * p.astype(np.float64) + (1.0 + 0.5 * np.sin(k)) * rng.standard_normal(shape) + 0.2
        out.append(g if present[i] else np.full(shape, np.nan))
    return layout.pack(out)


def train_step(layout, opt, vgs, params, k, vgs_keyword=False):
    present = present_at(k, layout.num_segments)
    grads = gradients(layout, params, k, present)
    if vgs_keyword:  # scale, step and update in one call
        return snapshot(grads, opt.step(params, grads, present=present, vgs=vgs))
    factor = vgs.scale(grads, present=present) if vgs is not None else None
    info = opt.step(params, grads, present=present)
    if vgs is not None:
        vgs.update(grads, present=present)
    return snapshot(grads, info, factor)


def optimizer_state(opt):
    """Everything a restored optimizer must match (its constructor defaults excluded)."""
    return snapshot(opt.state, opt.param_groups, opt.seed, opt.noise_norm, opt.layout, opt.state_dict())


def scaler_state(vgs):
    return None if vgs is None else snapshot(vgs, vgs.state_dict())


def fresh_like(layout, backend, with_vgs):
    """A restore target built with default settings (seed, groups, hyper-parameters all differ)."""
    opt = AdaptiveUPGD(layout, backend=backend)
    vgs = VarianceGradientScaler(layout, backend=backend) if with_vgs else None
    return opt, vgs


@pytest.mark.parametrize("start", [0, 6])
@pytest.mark.parametrize("via", ["state_dict", "file"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_restored_copy_steps_in_lockstep(backend, config, via, start, tmp_path):
    layout, opt, vgs = build(config, backend)
    params = layout.pack([np.linspace(-1.0, 1.0, max(1, int(np.prod(s))))[: int(np.prod(s))].reshape(s)
                          for s in layout.shapes])
    for k in range(start):
        train_step(layout, opt, vgs, params, k)

    restored_opt, restored_vgs = fresh_like(layout, backend, vgs is not None)
    assert optimizer_state(restored_opt) != optimizer_state(opt)  # so that the load really restores something
    assert vgs is None or scaler_state(restored_vgs) != scaler_state(vgs)
    if via == "state_dict":
        restored_opt.load_state_dict(opt.state_dict())
        if vgs is not None:
            restored_vgs.load_state_dict(vgs.state_dict())
    else:
        opt.save(tmp_path / "opt.npz")
        restored_opt.load(tmp_path / "opt.npz")
        if vgs is not None:
            vgs.save(tmp_path / "vgs.npz")
            restored_vgs.load(tmp_path / "vgs.npz")
        assert sorted(os.listdir(tmp_path)) == sorted(["opt.npz"] + (["vgs.npz"] if vgs is not None else []))
    restored_params = params.copy()
    assert optimizer_state(restored_opt) == optimizer_state(opt)
    assert scaler_state(restored_vgs) == scaler_state(vgs)

    for k in range(start, start + 25):
        original = train_step(layout, opt, vgs, params, k)
        restored = train_step(layout, restored_opt, restored_vgs, restored_params, k)
        assert original == restored, f"step {k}: grads, StepInfo or VGS factor differ"
        assert snapshot(params) == snapshot(restored_params), f"step {k}: params differ"
        assert optimizer_state(restored_opt) == optimizer_state(opt), f"step {k}: optimizer state differs"
        assert scaler_state(restored_vgs) == scaler_state(vgs), f"step {k}: scaler state differs"
    # The run really exercised frozen segments and (where configured) VGS scaling.
    assert (opt.state.segment_step < opt.state.step).all()
    if vgs is not None:
        assert vgs.scaling_factor() < 1.0


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_restored_copy_steps_in_lockstep_with_vgs_keyword(backend, via, tmp_path):
    layout, opt, vgs = build("groups+vgs+adaptive", backend)
    params = random_buffers(layout, 12)[0]
    for k in range(5):
        train_step(layout, opt, vgs, params, k, vgs_keyword=True)
    restored_opt, restored_vgs = fresh_like(layout, backend, True)
    if via == "state_dict":
        restored_opt.load_state_dict(opt.state_dict())
        restored_vgs.load_state_dict(vgs.state_dict())
    else:
        opt.save(tmp_path / "opt.npz")
        vgs.save(tmp_path / "vgs.npz")
        restored_opt.load(tmp_path / "opt.npz")
        restored_vgs.load(tmp_path / "vgs.npz")
    restored_params = params.copy()
    for k in range(5, 27):
        assert train_step(layout, opt, vgs, params, k, True) == train_step(
            layout, restored_opt, restored_vgs, restored_params, k, True), f"step {k}"
        assert snapshot(params) == snapshot(restored_params), f"step {k}"
        assert optimizer_state(restored_opt) == optimizer_state(opt), f"step {k}"
        assert scaler_state(restored_vgs) == scaler_state(vgs), f"step {k}"
    assert vgs.scaling_factor() < 1.0 and vgs.state.step == 27


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_scaler_alone_round_trip_lockstep(backend, via, tmp_path):
    layout = FlatLayout(SHAPES, dtype="float64")
    vgs = VarianceGradientScaler(layout, warmup_steps=3, alpha=0.7, beta=0.9, min_scaling_factor=0.25,
                                 variance_cap=8.0, backend=backend)

    def grads_at(k):
        rng = np.random.default_rng(50 + k)
        present = present_at(k, layout.num_segments)
        g = layout.pack([rng.standard_normal(s) * (1 + k % 3) + 0.1 for s in layout.shapes])
        for i, is_present in enumerate(present):
            if not is_present:
                g[layout.segment_slice(i)] = np.nan  # frozen segments are not read
        return g, present

    for k in range(5):
        g, present = grads_at(k)
        vgs.scale(g, present=present)
        vgs.update(g, present=present)
    restored = VarianceGradientScaler(layout, backend=backend)
    if via == "state_dict":
        restored.load_state_dict(vgs.state_dict())
    else:
        vgs.save(tmp_path / "vgs.npz")
        restored.load(tmp_path / "vgs.npz")
    assert snapshot(restored) == snapshot(vgs)
    factors = []
    for k in range(5, 30):
        g, present = grads_at(k)
        g2 = g.copy()
        factors.append(vgs.scale(g, present=present))
        assert restored.scale(g2, present=present) == factors[-1]
        vgs.update(g, present=present)
        restored.update(g2, present=present)
        assert snapshot(restored, g2) == snapshot(vgs, g), f"step {k}"
    assert min(factors) < 1.0


def test_state_dict_is_a_copy(backend):
    layout, opt, vgs = build("groups+vgs+adaptive", backend)
    params = random_buffers(layout, 3)[0]
    for k in range(4):
        train_step(layout, opt, vgs, params, k)
    state, scaler = opt.state_dict(), vgs.state_dict()
    frozen = fingerprint(state), fingerprint(scaler)
    train_step(layout, opt, vgs, params, 4)  # stepping the original leaves the dicts alone
    assert (fingerprint(state), fingerprint(scaler)) == frozen

    restored_opt, restored_vgs = fresh_like(layout, backend, True)
    restored_opt.load_state_dict(state)
    restored_vgs.load_state_dict(scaler)
    after_load = optimizer_state(restored_opt), scaler_state(restored_vgs)
    for value in (*state["state"].values(), *scaler["state"].values()):  # editing the dicts afterwards
        if isinstance(value, np.ndarray):                                 # leaves the restored copy alone
            value[...] = 0
    state["param_groups"][0]["lr"] = 123.0
    scaler["hyperparams"]["beta"] = 0.5
    assert (optimizer_state(restored_opt), scaler_state(restored_vgs)) == after_load


def test_file_round_trip_equals_state_dict(backend, tmp_path):
    layout, opt, vgs = build("groups+vgs+adaptive", backend)
    params = random_buffers(layout, 4)[0]
    for k in range(3):
        train_step(layout, opt, vgs, params, k)
    for obj, name in ((opt, "opt.npz"), (vgs, "vgs.npz")):
        obj.save(tmp_path / name)
        assert fingerprint(read_state_dict(tmp_path / name)) == fingerprint(obj.state_dict())


def test_save_overwrites_atomically_and_cleans_up_on_failure(backend, tmp_path):
    layout, opt, vgs = build("groups+vgs+adaptive", backend)
    path = tmp_path / "opt.npz"
    opt.save(path)
    first = path.read_bytes()
    params = random_buffers(layout, 5)[0]
    train_step(layout, opt, vgs, params, 0)
    opt.save(path)  # overwrite
    assert path.read_bytes() != first and os.listdir(tmp_path) == ["opt.npz"]
    second = path.read_bytes()
    opt.param_groups[0]["lr"] = object()  # cannot be written
    with pytest.raises(TypeError, match="object"):
        opt.save(path)
    assert path.read_bytes() == second and os.listdir(tmp_path) == ["opt.npz"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_rejects_non_finite_values(backend, tmp_path, value):
    layout, opt, vgs = build("groups+vgs+adaptive", backend)
    opt.save(tmp_path / "opt.npz")
    vgs.save(tmp_path / "vgs.npz")
    saved = (tmp_path / "opt.npz").read_bytes(), (tmp_path / "vgs.npz").read_bytes()
    opt.param_groups[1]["sigma"] = value
    vgs.hyperparams["alpha"] = value
    with pytest.raises(ValueError, match=r"cannot be written|param_groups\[1\].*sigma"):
        opt.save(tmp_path / "opt.npz")
    with pytest.raises(ValueError, match=r"cannot be written|alpha"):
        vgs.save(tmp_path / "vgs.npz")
    assert ((tmp_path / "opt.npz").read_bytes(), (tmp_path / "vgs.npz").read_bytes()) == saved
    assert sorted(os.listdir(tmp_path)) == ["opt.npz", "vgs.npz"]


def test_partial_group_edit_uses_constructor_values_and_round_trips(backend):
    layout = FlatLayout(SHAPES, dtype="float32")
    kwargs = dict(lr=1e-2, sigma=0.05, adaptive_noise=True, seed=3, backend=backend)
    edited = AdaptiveUPGD(layout, **kwargs)
    edited.param_groups[0]["segments"] = [0, 2]
    edited.param_groups.append({"segments": [1], "sigma": 0.2})  # lr & co. from the constructor
    full = AdaptiveUPGD(layout, **kwargs, param_groups=[{"segments": [0, 2]}, {"segments": [1], "sigma": 0.2}])
    params = random_buffers(layout, 8)[0]
    full_params = params.copy()
    for k in range(3):
        assert train_step(layout, edited, None, params, k) == train_step(layout, full, None, full_params, k)
    assert snapshot(params, edited.state) == snapshot(full_params, full.state)
    restored = AdaptiveUPGD(layout, lr=1e-3, backend=backend)  # other constructor values
    restored.load_state_dict(edited.state_dict())
    restored_params = params.copy()
    for k in range(3, 8):
        assert train_step(layout, edited, None, params, k) == train_step(layout, restored, None, restored_params, k)
        assert snapshot(params, edited.state) == snapshot(restored_params, restored.state)


def test_numpy_scalar_hyperparameters_survive_a_file_round_trip(backend, tmp_path):
    layout, opt, vgs = build("groups+vgs+adaptive", backend)
    params = random_buffers(layout, 6)[0]
    opt.param_groups[1]["lr"] = np.float32(2e-2)
    opt.param_groups[1]["adaptive_noise"] = np.True_
    opt.param_groups[0]["segments"] = [np.int64(0)]
    vgs.hyperparams["warmup_steps"] = np.int64(1)
    train_step(layout, opt, vgs, params, 0)
    opt.save(tmp_path / "opt.npz")
    vgs.save(tmp_path / "vgs.npz")
    restored_opt, restored_vgs = fresh_like(layout, backend, True)
    restored_opt.load(tmp_path / "opt.npz")
    restored_vgs.load(tmp_path / "vgs.npz")
    restored_params = params.copy()
    for k in range(1, 6):
        assert train_step(layout, opt, vgs, params, k) == train_step(
            layout, restored_opt, restored_vgs, restored_params, k)
        assert snapshot(params, opt.state, vgs.state) == snapshot(restored_params, restored_opt.state, restored_vgs.state)


# --- malformed state dicts ---------------------------------------------------------------


def warm_pair(backend, dtype="float32", seed=5):
    """A trained optimizer and scaler (the source of state dicts)."""
    layout = FlatLayout(SHAPES, dtype=dtype)
    opt = AdaptiveUPGD(layout, lr=1e-2, sigma=0.05, adaptive_noise=True, seed=seed, backend=backend,
                       param_groups=[{"segments": [0, 2]}, {"segments": [1], "lr": 2e-2}])
    vgs = VarianceGradientScaler(layout, warmup_steps=1, backend=backend)
    params = random_buffers(layout, seed)[0]
    for k in range(4):
        train_step(layout, opt, vgs, params, k)
    return layout, opt, vgs


def _set(*path_and_value):
    *path, value = path_and_value

    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
        return sd
    return mutate


def _del(*path):
    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return sd
    return mutate


def _replace(value):
    return lambda sd: value


def _poke(index, value):
    def change(array):
        array = array.copy()
        array.reshape(-1)[index] = value
        return array
    return change


UPGD_MALFORMED = {
    "not a dict": (_replace([("format", UPGD_FORMAT)]), TypeError, r"state dict must be a dict"),
    "None": (_replace(None), TypeError, r"state dict must be a dict"),
    "format missing": (_del("format"), ValueError, r"format is None"),
    "format of the scaler": (_set("format", VGS_FORMAT), ValueError, r"format is 'upgd_ref.VarianceGradientScaler'"),
    "version missing": (_del("version"), ValueError, r"'version'"),
    "version newer": (_set("version", UPGD_VERSION + 1), ValueError, r"newer"),
    "version zero": (_set("version", 0), ValueError, r"'version' must be >= 1"),
    "version string": (_set("version", "1"), ValueError, r"'version' must be an int"),
    "version float": (_set("version", 1.0), ValueError, r"'version' must be an int"),
    "version bool": (_set("version", True), ValueError, r"'version' must be an int"),
    "state missing": (_del("state"), ValueError, r"'state' is missing"),
    "state not a dict": (_set("state", [1, 2]), ValueError, r"'state' is missing or not a dict"),
    "step missing": (_del("state", "step"), ValueError, r"'state.step' is missing"),
    "step negative": (_set("state", "step", -1), ValueError, r"'state.step' must lie in"),
    "step too large": (_set("state", "step", 2**63), ValueError, r"'state.step' must lie in"),
    "step float": (_set("state", "step", 4.0), TypeError, r"'state.step' must be an int"),
    "step bool": (_set("state", "step", True), TypeError, r"'state.step' must be an int"),
    "step string": (_set("state", "step", "4"), TypeError, r"'state.step' must be an int"),
    "segment_step float": (_set("state", "segment_step", lambda a: a.astype(np.float64)), TypeError,
                           r"'state.segment_step' has dtype float64"),
    "segment_step shape": (_set("state", "segment_step", lambda a: np.append(a, 0)), ValueError,
                           r"'state.segment_step' has shape \(4,\)"),
    "segment_step list": (_set("state", "segment_step", lambda a: a.tolist()), TypeError,
                          r"'state.segment_step' must be an array"),
    "segment_step negative": (_set("state", "segment_step", _poke(1, -1)), ValueError, r"'state.segment_step'"),
    "segment_step beyond step": (_set("state", "segment_step", _poke(2, 99)), ValueError, r"'state.segment_step'"),
    "grad_norm_ema NaN": (_set("state", "grad_norm_ema", _poke(0, np.nan)), ValueError,
                          r"'state.grad_norm_ema' holds non-finite"),
    "grad_norm_ema negative": (_set("state", "grad_norm_ema", _poke(1, -0.5)), ValueError, r"'state.grad_norm_ema'"),
    "grad_norm_ema float32": (_set("state", "grad_norm_ema", lambda a: a.astype(np.float32)), TypeError,
                              r"'state.grad_norm_ema' has dtype float32"),
    "utility NaN": (_set("state", "utility", _poke(-1, np.nan)), ValueError, r"'state.utility' holds non-finite"),
    "first_moment inf": (_set("state", "first_moment", _poke(3, np.inf)), ValueError,
                         r"'state.first_moment' holds non-finite"),
    "second_moment negative": (_set("state", "second_moment", _poke(5, -1e-3)), ValueError,
                               r"'state.second_moment' must be >= 0"),
    "second_moment -inf": (_set("state", "second_moment", _poke(0, -np.inf)), ValueError, r"'state.second_moment'"),
    "utility float64": (_set("state", "utility", lambda a: a.astype(np.float64)), TypeError,
                        r"'state.utility' has dtype float64"),
    "utility int": (_set("state", "utility", lambda a: a.astype(np.int32)), TypeError, r"'state.utility' has dtype int32"),
    "utility short": (_set("state", "utility", lambda a: a[:-1].copy()), ValueError, r"'state.utility' has shape"),
    "utility padded": (_set("state", "utility", lambda a: np.zeros(48, a.dtype)), ValueError, r"'state.utility' has shape"),
    "utility 2-D": (_set("state", "utility", lambda a: a.reshape(1, -1)), ValueError, r"'state.utility' has shape"),
    "utility missing": (_del("state", "utility"), ValueError, r"'state.utility' is missing"),
    "unknown state field": (_set("state", "exp_avg", np.zeros(3)), ValueError, r"state\.exp_avg"),
    "layout other shapes": (_set("layout", "shapes", [[4, 3], [5], [2, 4]]), ValueError, r"'layout.shapes'|segment shapes"),
    "layout fewer segments": (_set("layout", "shapes", [[3, 4], [5]]), ValueError, r"'layout.shapes'|segment shapes"),
    "layout shapes missing": (_del("layout", "shapes"), ValueError, r"'layout.shapes'|segment shapes"),
    "layout other dtype": (_set("layout", "dtype", "float64"), TypeError, r"'layout.dtype'"),
    "layout bad groups": (_set("layout", "groups", [0, "x", 1]), ValueError, r"'layout' is malformed"),
    "layout not a dict": (_set("layout", "FlatLayout([(3, 4)])"), ValueError, r"'layout' must be a dict"),
    "seed missing": (_del("seed"), ValueError, r"seed"),
    "seed negative": (_set("seed", -1), ValueError, r"seed"),
    "seed too large": (_set("seed", 2**64), ValueError, r"seed"),
    "seed string": (_set("seed", "5"), TypeError, r"seed must be an int"),
    "seed float": (_set("seed", 5.0), TypeError, r"seed must be an int"),
    "noise_norm unknown": (_set("noise_norm", "layer"), ValueError, r"noise_norm"),
    "noise_norm missing": (_del("noise_norm"), ValueError, r"noise_norm"),
    "param_groups missing": (_del("param_groups"), ValueError, r"'param_groups'"),
    "param_groups dict": (_set("param_groups", {"segments": [0, 1, 2]}), ValueError, r"'param_groups'"),
    "param_groups duplicate": (_set("param_groups", 1, "segments", [1, 2]), ValueError,
                               r"segment 2 is in param_groups\[0\] and param_groups\[1\]"),
    "param_groups unknown segment": (_set("param_groups", 1, "segments", [1, 3]), ValueError,
                                     r"param_groups\[1\] names segment 3"),
    "param_groups unknown key": (_set("param_groups", 0, "momentum", 0.9), ValueError,
                                 r"param_groups\[0\].*unknown.*momentum"),
    "param_groups bad lr": (_set("param_groups", 1, "lr", -2e-2), ValueError, r"param_groups\[1\].*lr"),
    "param_groups NaN beta": (_set("param_groups", 0, "beta2", float("nan")), ValueError, r"param_groups\[0\].*beta2"),
    "param_groups not dicts": (_set("param_groups", [[0, 2], [1]]), TypeError, r"param_groups\[0\] must be a dict"),
}

VGS_MALFORMED = {
    "not a dict": (_replace("state"), TypeError, r"state dict must be a dict"),
    "format of the optimizer": (_set("format", UPGD_FORMAT), ValueError, r"format is 'upgd_ref.AdaptiveUPGD'"),
    "version newer": (_set("version", VGS_VERSION + 7), ValueError, r"newer"),
    "state missing": (_del("state"), ValueError, r"'state'"),
    "step negative": (_set("state", "step", -3), ValueError, r"'state.step'"),
    "step float": (_set("state", "step", 1.5), TypeError, r"'state.step'"),
    "grad_mean_avg NaN": (_set("state", "grad_mean_avg", _poke(0, np.nan)), ValueError, r"'state.grad_mean_avg'"),
    "grad_mean_avg shape": (_set("state", "grad_mean_avg", lambda a: a[:2].copy()), ValueError, r"'state.grad_mean_avg'"),
    "grad_mean_avg float32": (_set("state", "grad_mean_avg", lambda a: a.astype(np.float32)), TypeError,
                              r"'state.grad_mean_avg'"),
    "grad_sq_avg negative": (_set("state", "grad_sq_avg", _poke(1, -1.0)), ValueError, r"'state.grad_sq_avg'"),
    "grad_sq_avg inf": (_set("state", "grad_sq_avg", _poke(2, np.inf)), ValueError, r"'state.grad_sq_avg'"),
    "grad_sq_avg missing": (_del("state", "grad_sq_avg"), ValueError, r"'state.grad_sq_avg' is missing"),
    "unknown state field": (_set("state", "k", 3), ValueError, r"state.k"),
    "num_segments differs": (_set("num_segments", 4), ValueError, r"'num_segments'"),
    "num_segments bool": (_set("num_segments", True), ValueError, r"'num_segments'"),
    "hyperparams missing": (_del("hyperparams"), ValueError, r"'hyperparams'"),
    "hyperparams list": (_set("hyperparams", [0.99]), ValueError, r"'hyperparams'"),
    "beta one": (_set("hyperparams", "beta", 1.0), ValueError, r"hyperparams.*beta"),
    "warmup negative": (_set("hyperparams", "warmup_steps", -1), ValueError, r"hyperparams.*warmup_steps"),
    "warmup float": (_set("hyperparams", "warmup_steps", 2.5), TypeError, r"hyperparams.*warmup_steps"),
    "variance_cap zero": (_set("hyperparams", "variance_cap", 0.0), ValueError, r"hyperparams.*variance_cap"),
    "min_scaling_factor zero": (_set("hyperparams", "min_scaling_factor", 0.0), ValueError,
                                r"hyperparams.*min_scaling_factor"),
    "unknown hyperparameter": (_set("hyperparams", "gamma", 0.5), ValueError, r"hyperparams.*unknown.*gamma"),
}


def test_unmodified_state_dicts_load(backend):
    """The control for the malformed cases: the untouched dicts are accepted."""
    layout, source_opt, source_vgs = warm_pair(backend)
    layout, target_opt, target_vgs = warm_pair(backend, seed=9)
    state, scaler = source_opt.state_dict(), source_vgs.state_dict()
    argument = fingerprint(state), fingerprint(scaler)
    target_opt.load_state_dict(state)
    target_vgs.load_state_dict(scaler)
    assert (fingerprint(state), fingerprint(scaler)) == argument  # the argument is not modified
    assert optimizer_state(target_opt) == optimizer_state(source_opt)
    assert scaler_state(target_vgs) == scaler_state(source_vgs)


MALFORMED = {"optimizer": (1, UPGD_MALFORMED), "scaler": (2, VGS_MALFORMED)}  # warm_pair index, cases


@pytest.mark.parametrize("which, case", [(w, c) for w, (_, table) in MALFORMED.items() for c in sorted(table)])
def test_rejects_malformed_state_dict(backend, which, case):
    index, table = MALFORMED[which]
    source = warm_pair(backend)[index]
    target = warm_pair(backend, seed=9)[index]
    mutate, exc, match = table[case]
    bad = mutate(copy.deepcopy(source.state_dict()))
    before = snapshot(target, bad)
    with pytest.raises(exc, match=match):
        target.load_state_dict(bad)
    assert_unchanged(before, snapshot(target, bad))


# --- corrupt checkpoint files ------------------------------------------------------------


def _npz_bytes(**members) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


def _meta(payload) -> np.ndarray:
    return np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8)


def _rewritten(mutate):
    """A checkpoint of the source optimizer, edited as a state dict and written normally."""
    def make(source, tmp_path):
        state_dict = mutate(source.state_dict())
        write_state_dict(tmp_path / "edited.npz", state_dict)
        return (tmp_path / "edited.npz").read_bytes()
    return make


def _other_optimizer(shapes, dtype):
    def make(source, tmp_path):
        other = AdaptiveUPGD(FlatLayout(shapes, dtype=dtype), adaptive_noise=True, seed=1)
        other.save(tmp_path / "other.npz")
        return (tmp_path / "other.npz").read_bytes()
    return make


def _scaler_file(source, tmp_path):
    VarianceGradientScaler(source.layout).save(tmp_path / "vgs.npz")
    return (tmp_path / "vgs.npz").read_bytes()


def _truncated(fraction=None, length=None):
    def make(source, tmp_path):
        source.save(tmp_path / "full.npz")
        data = (tmp_path / "full.npz").read_bytes()
        return data[: length if length is not None else int(len(data) * fraction)]
    return make


def _zip_with_text(source, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("meta", "not json")
        archive.writestr("notes.txt", "hello")
    return buffer.getvalue()


def _npy_file(source, tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(10))
    return buffer.getvalue()


def _valid_members(source):
    state = source.state_dict()
    return {f"state.{k}": v for k, v in state["state"].items() if isinstance(v, np.ndarray)}


CORRUPT_FILES = {
    "empty": (lambda s, t: b"", r"not a readable upgd_ref checkpoint"),
    "truncated to 1 byte": (_truncated(length=1), r"not a readable upgd_ref checkpoint"),
    "truncated to 30 bytes": (_truncated(length=30), r"not a readable upgd_ref checkpoint"),
    "truncated to half": (_truncated(0.5), r"not a readable upgd_ref checkpoint"),
    "last byte missing": (_truncated(length=-1), r"not a readable upgd_ref checkpoint"),
    "random bytes": (lambda s, t: np.random.default_rng(0).bytes(3000), r"not a readable upgd_ref checkpoint"),
    "random bytes after a zip signature": (lambda s, t: b"PK\x03\x04" + np.random.default_rng(1).bytes(3000),
                                           r"not a readable upgd_ref checkpoint"),
    "text": (lambda s, t: b'{"format": "upgd_ref.AdaptiveUPGD"}', r"not a readable upgd_ref checkpoint"),
    "a .npy file": (_npy_file, r"not an \.npz archive"),
    "zip without meta": (lambda s, t: _npz_bytes(**_valid_members(s)), r"no 'meta' member"),
    "zip of text files": (_zip_with_text, r"corrupt checkpoint metadata|no 'meta' member"),
    "meta not UTF-8": (lambda s, t: _npz_bytes(meta=np.frombuffer(b"\xff\xfe\xfd", np.uint8)),
                       r"corrupt checkpoint metadata"),
    "meta not JSON": (lambda s, t: _npz_bytes(meta=np.frombuffer(b"{format:", np.uint8)), r"corrupt checkpoint metadata"),
    "meta a JSON list": (lambda s, t: _npz_bytes(meta=_meta([1, 2])), r"corrupt checkpoint metadata"),
    "meta without state_scalars": (lambda s, t: _npz_bytes(meta=_meta({"format": UPGD_FORMAT})),
                                   r"corrupt checkpoint metadata"),
    "pickled object member": (lambda s, t: _npz_bytes(meta=_meta({"state_scalars": {}}),
                                                      **{"state.utility": np.array([{"a": 1}], dtype=object)}),
                              r"not a readable upgd_ref checkpoint"),
    "unexpected member": (lambda s, t: _npz_bytes(meta=_meta({"state_scalars": {}}), extra=np.zeros(2)),
                          r"unexpected member 'extra'"),
    "scaler checkpoint": (_scaler_file, r"format is 'upgd_ref.VarianceGradientScaler'"),
    "newer version": (_rewritten(_set("version", UPGD_VERSION + 1)), r"newer"),
    "other segment shapes": (_other_optimizer([(4, 3), (5,), (2, 4)], "float32"), r"'layout.shapes'|segment shapes"),
    "other segment count": (_other_optimizer([(3, 4), (5,)], "float32"), r"'layout.shapes'|segment shapes"),
    "other dtype": (_other_optimizer(SHAPES, "float64"), r"'layout.dtype'"),
    "NaN in utility": (_rewritten(_set("state", "utility", _poke(2, np.nan))), r"'state.utility' holds non-finite"),
    "inf in grad_norm_ema": (_rewritten(_set("state", "grad_norm_ema", _poke(0, np.inf))), r"'state.grad_norm_ema'"),
    "wrong array shape": (_rewritten(_set("state", "first_moment", lambda a: a[:7].copy())),
                          r"'state.first_moment' has shape \(7,\)"),
    "wrong array dtype": (_rewritten(_set("state", "second_moment", lambda a: a.astype(np.float64))),
                          r"'state.second_moment' has dtype float64"),
    "step stored as a float": (_rewritten(_set("state", "step", 4.0)), r"'state.step' must be an int"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_optimizer_rejects_corrupt_file(backend, case, tmp_path):
    layout, source, _ = warm_pair(backend)
    _, target, _ = warm_pair(backend, seed=9)
    make, match = CORRUPT_FILES[case]
    path = tmp_path / "corrupt.npz"
    path.write_bytes(make(source, tmp_path))
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError), match=match):
        target.load(path)
    assert_unchanged(before, snapshot(target))


@pytest.mark.parametrize("case", ["empty", "truncated to half", "random bytes", "zip without meta",
                                  "meta not JSON", "unexpected member"])
def test_scaler_rejects_corrupt_file(backend, case, tmp_path):
    layout, source, _ = warm_pair(backend)
    _, _, target = warm_pair(backend, seed=9)
    make, match = CORRUPT_FILES[case]
    path = tmp_path / "corrupt.npz"
    path.write_bytes(make(source, tmp_path))
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load(path)
    assert_unchanged(before, snapshot(target))
    source.save(tmp_path / "opt.npz")
    with pytest.raises(ValueError, match=r"format is 'upgd_ref.AdaptiveUPGD'"):
        target.load(tmp_path / "opt.npz")
    assert_unchanged(before, snapshot(target))


def test_missing_file_raises_file_not_found(backend, tmp_path):
    _, target, vgs = warm_pair(backend)
    before = snapshot(target, vgs)
    with pytest.raises(FileNotFoundError):
        target.load(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError):
        vgs.load(tmp_path / "nope.npz")
    assert_unchanged(before, snapshot(target, vgs))


def test_single_bit_flips_are_rejected_or_harmless(backend, tmp_path):
    """Any one flipped bit either raises ValueError/TypeError, or loads exactly the saved state."""
    layout, source, _ = warm_pair(backend)
    _, target, _ = warm_pair(backend, seed=9)
    source.save(tmp_path / "good.npz")
    good = (tmp_path / "good.npz").read_bytes()
    expected = optimizer_state(source)
    before = snapshot(target)
    rng = np.random.default_rng(2024)
    rejected = 0
    for bit in rng.choice(len(good) * 8, size=150, replace=False):
        damaged = bytearray(good)
        damaged[bit // 8] ^= 1 << (bit % 8)
        (tmp_path / "flipped.npz").write_bytes(bytes(damaged))
        try:
            target.load(tmp_path / "flipped.npz")
        except (ValueError, TypeError):
            rejected += 1
            assert_unchanged(before, snapshot(target))
        else:
            assert optimizer_state(target) == expected, f"bit {bit}: loaded a different state"
            target = warm_pair(backend, seed=9)[1]
    assert rejected > 50  # most of the file is checked (CRC-protected members, JSON)
