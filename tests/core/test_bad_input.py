"""Bad input to AdaptiveUPGD and VarianceGradientScaler: a clear exception naming the
problem (segment index or field name), and params, grads, optimizer and scaler state
bit-identical to before the call. Runs against every registered backend.

In-memory state dicts and checkpoint files are covered by ``test_checkpoint.py``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from tests.helpers.snapshots import assert_unchanged, random_buffers, snapshot
from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler

SHAPES = [(3, 4), (5,), (2, 2, 2)]
GROUPS = [{"segments": [0, 2], "lr": 2e-2}, {"segments": [1], "adaptive_noise": False, "sigma": 1e-3}]


def make_optimizer(layout, backend, **overrides):
    kwargs = dict(lr=1e-2, sigma=0.05, adaptive_noise=True, seed=11, backend=backend,
                  param_groups=copy.deepcopy(GROUPS))
    kwargs.update(overrides)
    return AdaptiveUPGD(layout, **kwargs)


def warm(backend, dtype="float32", steps=3):
    """A layout, optimizer and scaler with non-trivial state, and fresh params/grads."""
    layout = FlatLayout(SHAPES, dtype=dtype)
    opt = make_optimizer(layout, backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=1, backend=backend)
    params, grads = random_buffers(layout, 0)
    for k in range(steps):
        grads[...] = random_buffers(layout, 100 + k)[1]
        vgs.scale(grads)
        opt.step(params, grads)
        vgs.update(grads)
    grads[...] = random_buffers(layout, 999)[1]
    assert opt.step_count == steps and vgs.state.step == steps
    assert vgs.scaling_factor() < 1.0  # the scaler really scales from here on
    return layout, opt, vgs, params, grads


def expect_rejected(exc, match, call, *watched):
    """``call()`` raises ``exc`` matching ``match``; every watched object is bit-identical."""
    before = snapshot(*watched)
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(before, snapshot(*watched))


# --- buffers with exactly one defect ---------------------------------------------------


def misaligned(buffer):
    """Same values at an address that is not a multiple of the itemsize."""
    raw = np.zeros(buffer.nbytes + 2 * 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + 1
    out = raw[start : start + buffer.nbytes].view(buffer.dtype)
    out[...] = buffer
    assert out.ctypes.data % buffer.dtype.itemsize != 0
    return out


def strided(buffer):
    big = np.zeros(2 * buffer.size, dtype=buffer.dtype)
    out = big[::2]
    out[...] = buffer
    return out


def read_only(buffer):
    out = buffer.copy()
    out.flags.writeable = False
    return out


def other_float(buffer):
    return buffer.astype(np.float64 if buffer.dtype == np.float32 else np.float32)


def big_endian(buffer):
    return buffer.astype(buffer.dtype.newbyteorder(">"))


DEFECTS = {
    "truncated": (lambda b: b[:-1].copy(), ValueError, r"must have shape"),
    "too long": (lambda b: np.concatenate([b, np.zeros(16, b.dtype)]), ValueError, r"must have shape"),
    "2-D": (lambda b: b.reshape(1, -1).copy(), ValueError, r"must have shape"),
    "other float dtype": (other_float, TypeError, r"dtype"),
    "big-endian": (big_endian, TypeError, r"dtype"),
    "float16": (lambda b: b.astype(np.float16), TypeError, r"dtype"),
    "int32": (lambda b: b.astype(np.int32), TypeError, r"integer dtype"),
    "int64": (lambda b: b.astype(np.int64), TypeError, r"integer dtype"),
    "bool": (lambda b: b.astype(bool), TypeError, r"dtype"),
    "list": (lambda b: b.tolist(), TypeError, r"must be a NumPy array"),
    "non-contiguous": (strided, ValueError, r"contiguous"),
    "misaligned": (misaligned, ValueError, r"misaligned"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("which", ["params", "grads"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_rejects_defective_buffer(backend, dtype, which, defect):
    layout, opt, vgs, params, grads = warm(backend, dtype)
    make_bad, exc, match = DEFECTS[defect]
    bad = make_bad(params if which == "params" else grads)
    args = (bad, grads) if which == "params" else (params, bad)
    expect_rejected(exc, rf"{which}\b.*{match}", lambda: opt.step(*args), opt, params, grads, bad)


def test_step_rejects_read_only_params(backend):
    layout, opt, vgs, params, grads = warm(backend)
    frozen = read_only(params)
    expect_rejected(ValueError, r"params is read-only", lambda: opt.step(frozen, grads), opt, frozen, grads)


def test_step_accepts_read_only_grads_and_never_writes_them(backend):
    layout, opt, vgs, params, grads = warm(backend)
    reference = copy.deepcopy(opt), params.copy()
    grads_ro = read_only(grads)
    before = snapshot(grads_ro)
    opt.step(params, grads_ro)
    assert_unchanged(before, snapshot(grads_ro))
    reference[0].step(reference[1], grads)  # the same step on writable grads
    assert snapshot(opt, params) == snapshot(*reference)


@pytest.mark.parametrize("overlap", ["same array", "shifted view", "same memory, new object"])
def test_step_rejects_params_sharing_memory_with_grads(backend, overlap):
    layout, opt, vgs, params, grads = warm(backend)
    if overlap == "same array":
        p, g = params, params
    elif overlap == "shifted view":
        base = np.concatenate([params, grads])
        p, g = base[: layout.size], base[16 : 16 + layout.size]
    else:
        p, g = params, params.view()
    watched = (opt, p, g, params, grads)
    expect_rejected(ValueError, r"params and grads share memory", lambda: opt.step(p, g), *watched)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["params", "grads"])
@pytest.mark.parametrize("segment", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_rejects_non_finite_naming_the_segment(backend, dtype, segment, which, value):
    layout, opt, vgs, params, grads = warm(backend, dtype)
    target = params if which == "params" else grads
    target[layout.segment_slice(segment)][-1] = value  # only the last element of the segment
    expect_rejected(ValueError, rf"{which}: segment {segment} holds a non-finite value",
                    lambda: opt.step(params, grads), opt, params, grads)


@pytest.mark.parametrize(
    "present, exc, match",
    [
        ([True, True], ValueError, r"present has 2 entries for 3 segments"),
        ([True] * 4, ValueError, r"present has 4 entries for 3 segments"),
        ([], ValueError, r"present has 0 entries"),
        ([True, 1, True], TypeError, r"present\[1\] must be a bool"),
        ([True, False, None], TypeError, r"present\[2\] must be a bool"),
        ((True, "False", True), TypeError, r"present\[1\] must be a bool"),
        ([1.0, True, True], TypeError, r"present\[0\] must be a bool"),
        (np.array([1, 0, 1]), TypeError, r"present\[0\] must be a bool"),
        (np.array([[True, True, True]]), ValueError, r"present must be 1-D"),
        ({True, False}, TypeError, r"present must be"),
        ("TTT", TypeError, r"present must be"),
        (True, TypeError, r"present must be"),
    ],
)
def test_step_rejects_bad_present(backend, present, exc, match):
    layout, opt, vgs, params, grads = warm(backend)
    expect_rejected(exc, match, lambda: opt.step(params, grads, present=present), opt, params, grads)
    expect_rejected(exc, match, lambda: vgs.scale(grads, present=present), vgs, grads)
    expect_rejected(exc, match, lambda: vgs.update(grads, present=present), vgs, grads)


# --- frozen segments: not read, not written -------------------------------------------


@pytest.mark.parametrize("frozen", range(len(SHAPES)))
def test_non_finite_in_frozen_segment_is_not_read(backend, frozen):
    layout, opt, vgs, params, grads = warm(backend, "float64")
    present = [i != frozen for i in range(len(SHAPES))]
    control_opt, control_vgs = copy.deepcopy(opt), copy.deepcopy(vgs)
    control_params, control_grads = params.copy(), grads.copy()
    control_grads[layout.segment_slice(frozen)] = 123.0  # finite junk: must not matter either

    s = layout.segment_slice(frozen)
    grads[s] = np.nan
    grads[s][0] = np.inf
    params[s][-1] = -np.inf
    frozen_before = {
        "params": params[s].tobytes(), "grads": grads[s].tobytes(),
        **{name: getattr(opt.state, name)[s].tobytes() for name in ("utility", "first_moment", "second_moment")},
        "segment_step": int(opt.state.segment_step[frozen]),
        "grad_norm_ema": opt.state.grad_norm_ema[frozen].tobytes(),
        "vgs_a": vgs.state.grad_mean_avg[frozen].tobytes(), "vgs_b": vgs.state.grad_sq_avg[frozen].tobytes(),
    }
    step_before = opt.step_count

    factor = vgs.scale(grads, present=present)
    info = opt.step(params, grads, present=present)
    vgs.update(grads, present=present)

    frozen_after = {
        "params": params[s].tobytes(), "grads": grads[s].tobytes(),
        **{name: getattr(opt.state, name)[s].tobytes() for name in ("utility", "first_moment", "second_moment")},
        "segment_step": int(opt.state.segment_step[frozen]),
        "grad_norm_ema": opt.state.grad_norm_ema[frozen].tobytes(),
        "vgs_a": vgs.state.grad_mean_avg[frozen].tobytes(), "vgs_b": vgs.state.grad_sq_avg[frozen].tobytes(),
    }
    assert frozen_after == frozen_before
    assert opt.step_count == step_before + 1
    assert math.isnan(info.grad_norm[frozen]) and math.isnan(info.noise_std[frozen])
    for i in range(len(SHAPES)):
        if i != frozen:  # the present segments did move
            assert not np.array_equal(params[layout.segment_slice(i)], control_params[layout.segment_slice(i)])

    # The same step with finite junk in the frozen segment gives the same bits elsewhere.
    control_factor = control_vgs.scale(control_grads, present=present)
    control_opt.step(control_params, control_grads, present=present)
    control_vgs.update(control_grads, present=present)
    assert control_factor == factor
    params[s] = control_params[s]
    grads[s] = control_grads[s]
    assert snapshot(opt, vgs, params, grads) == snapshot(control_opt, control_vgs, control_params, control_grads)


def test_all_segments_frozen_changes_only_the_step_counter(backend):
    layout, opt, vgs, params, grads = warm(backend, "float64")
    grads[...] = np.nan
    before = snapshot(opt.state.segment_step, opt.state.utility, opt.state.first_moment,
                      opt.state.second_moment, opt.state.grad_norm_ema, params, grads)
    opt.step(params, grads, present=[False] * len(SHAPES))
    assert opt.step_count == 4
    assert_unchanged(before, snapshot(opt.state.segment_step, opt.state.utility, opt.state.first_moment,
                                      opt.state.second_moment, opt.state.grad_norm_ema, params, grads))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_padding_is_neither_read_nor_written(backend, dtype):
    layout, opt, vgs, params, grads = warm(backend, dtype)
    control = copy.deepcopy(opt), copy.deepcopy(vgs), params.copy(), grads.copy()
    padding = np.ones(layout.size, dtype=bool)
    for i in range(layout.num_segments):
        padding[layout.segment_slice(i)] = False
    assert padding.any()
    params[padding] = 7.0
    grads[padding] = np.nan
    factor = vgs.scale(grads)
    opt.step(params, grads)
    vgs.update(grads)
    assert (params[padding] == 7.0).all() and np.isnan(grads[padding]).all()
    control_factor = control[1].scale(control[3])
    control[0].step(control[2], control[3])
    control[1].update(control[3])
    assert control_factor == factor
    params[padding] = grads[padding] = 0.0
    assert snapshot(opt, vgs, params, grads) == snapshot(*control)


# --- hyper-parameters and constructors --------------------------------------------------

BAD_UPGD_HYPER = [
    ("lr", -1e-3, ValueError), ("lr", math.nan, ValueError), ("lr", math.inf, ValueError),
    ("lr", "0.1", TypeError), ("lr", None, TypeError), ("lr", True, TypeError), ("lr", 1j, TypeError),
    ("weight_decay", -1e-9, ValueError), ("sigma", -0.1, ValueError), ("eps", -1e-8, ValueError),
    ("eps", 0.0, ValueError), ("lr", 10**400, ValueError), ("noise_ema_init", -(10**400), ValueError),
    ("min_noise_std", -1e-6, ValueError), ("noise_ema_init", -1.0, ValueError),
    ("beta_utility", 1.0, ValueError), ("beta_utility", -0.1, ValueError), ("beta1", 1.0, ValueError),
    ("beta1", math.nan, ValueError), ("beta2", 1.5, ValueError), ("beta2", -1e-12, ValueError),
    ("noise_beta", 1.0, ValueError), ("noise_beta", -0.5, ValueError),
    ("adaptive_noise", 1, TypeError), ("adaptive_noise", "yes", TypeError),
    ("instant_noise_scale", 0, TypeError), ("instant_noise_scale", None, TypeError),
]


@pytest.mark.parametrize("name, value, exc", BAD_UPGD_HYPER)
def test_constructor_rejects_invalid_hyperparameter(backend, name, value, exc):
    layout = FlatLayout(SHAPES)
    with pytest.raises(exc, match=name):
        AdaptiveUPGD(layout, backend=backend, **{name: value})
    group = [{"segments": [1], name: value}]
    with pytest.raises(exc, match=rf"param_groups\[0\].*{name}"):
        AdaptiveUPGD(layout, backend=backend, param_groups=group)


@pytest.mark.parametrize("name, value", [
    ("lr", 0.0), ("weight_decay", 0.0), ("sigma", 0.0), ("eps", 1e-44), ("min_noise_std", 0.0),
    ("beta_utility", 0.0), ("beta1", 0.0), ("beta2", 0.0), ("noise_beta", 0.0), ("noise_ema_init", 0.0),
    ("beta2", 1.0 - 2.0**-53), ("lr", np.float32(1e-3)), ("adaptive_noise", np.True_), ("lr", 1),
])
def test_constructor_accepts_boundary_hyperparameters(backend, name, value):
    layout = FlatLayout(SHAPES)
    opt = AdaptiveUPGD(layout, backend=backend, **{name: value})
    assert opt.defaults[name] == value
    params, grads = random_buffers(layout, 1)
    opt.step(params, grads)
    assert np.isfinite(params).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"noise_norm": "layer"}, ValueError, r"noise_norm"),
    ({"noise_norm": None}, ValueError, r"noise_norm"),
    ({"seed": -1}, ValueError, r"seed"),
    ({"seed": 2**64}, ValueError, r"seed"),
    ({"seed": 1.5}, TypeError, r"seed"),
    ({"seed": True}, TypeError, r"seed"),
    ({"backend": "no-such-backend"}, ValueError, r"unknown backend"),
    ({"unknown_option": 1}, TypeError, r"unknown_option"),
])
def test_constructor_rejects_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AdaptiveUPGD(FlatLayout(SHAPES), **kwargs)


def test_constructors_reject_non_layout():
    with pytest.raises(TypeError, match="layout must be a FlatLayout"):
        AdaptiveUPGD([(3, 4)])
    with pytest.raises(TypeError, match="layout must be a FlatLayout"):
        VarianceGradientScaler([(3, 4)])


BAD_GROUPS = [
    ([{"segments": [0, 1]}, {"segments": [1, 2]}], ValueError, r"segment 1 is in param_groups\[0\] and param_groups\[1\]"),
    ([{"segments": [0, 0]}], ValueError, r"segment 0 is in param_groups\[0\] and param_groups\[0\]"),
    ([{"segments": [3]}], ValueError, r"param_groups\[0\] names segment 3"),
    ([{"segments": [0]}, {"segments": [-1]}], ValueError, r"param_groups\[1\] names segment -1"),
    ([{"segments": [0], "learning_rate": 0.1}], ValueError, r"param_groups\[0\].*unknown.*learning_rate"),
    ([{"segments": [0], "params": [1]}], ValueError, r"param_groups\[0\] has both 'segments' and 'params'"),
    ([{"segments": [0]}, {"segments": [1], "lr": -1.0}], ValueError, r"param_groups\[1\].*lr"),
    ([{"segments": [1.0]}], TypeError, r"param_groups\[0\].*segment index"),
    ([{"segments": ["1"]}], TypeError, r"param_groups\[0\].*segment index"),
    ([{"segments": [True]}], TypeError, r"param_groups\[0\].*segment index"),
    ([{"segments": 1}], TypeError, r"param_groups\[0\].*'segments' must be a list"),
    ([{"segments": "01"}], TypeError, r"param_groups\[0\].*'segments' must be a list"),
    ([[0, 1]], TypeError, r"param_groups\[0\] must be a dict"),
    ({"segments": [0]}, TypeError, r"param_groups must be a list"),
    (5, TypeError, r"param_groups must be a list"),
]


@pytest.mark.parametrize("groups, exc, match", BAD_GROUPS)
def test_constructor_rejects_invalid_param_groups(backend, groups, exc, match):
    before = snapshot(groups)
    with pytest.raises(exc, match=match):
        AdaptiveUPGD(FlatLayout(SHAPES), backend=backend, param_groups=groups)
    assert_unchanged(before, snapshot(groups))


def test_constructor_does_not_modify_param_groups_argument(backend):
    groups = [{"segments": [2, 0], "lr": 2e-2}, {"params": [1], "sigma": 0.5}]
    before = snapshot(groups)
    opt = AdaptiveUPGD(FlatLayout(SHAPES), backend=backend, param_groups=groups)
    assert_unchanged(before, snapshot(groups))
    assert [g["segments"] for g in opt.param_groups] == [[2, 0], [1]]
    assert opt.param_groups[0] is not groups[0]


# --- edits of opt.param_groups (and other public attributes) between steps ------------


def _set(key, value, group=0):
    def edit(opt):
        opt.param_groups[group][key] = value
    return edit


def _append_group(group):
    def edit(opt):
        opt.param_groups.append(group)
    return edit


def _delete(key, group=0):
    def edit(opt):
        del opt.param_groups[group][key]
    return edit


def _replace(value):
    def edit(opt):
        opt.param_groups = value
    return edit


EDITS = {
    "lr negative": (_set("lr", -1e-3), ValueError, r"param_groups\[0\].*lr"),
    "lr NaN": (_set("lr", math.nan, 1), ValueError, r"param_groups\[1\].*lr"),
    "lr string": (_set("lr", "1e-3"), TypeError, r"param_groups\[0\].*lr"),
    "beta1 one": (_set("beta1", 1.0, 1), ValueError, r"param_groups\[1\].*beta1"),
    "noise_beta negative": (_set("noise_beta", -0.1), ValueError, r"param_groups\[0\].*noise_beta"),
    "adaptive_noise int": (_set("adaptive_noise", 1), TypeError, r"param_groups\[0\].*adaptive_noise"),
    "unknown key": (_set("momentum", 0.9, 1), ValueError, r"param_groups\[1\].*unknown.*momentum"),
    "segment twice": (_append_group({"segments": [1]}), ValueError, r"segment 1 is in param_groups\[1\] and param_groups\[2\]"),
    "segment out of range": (_set("segments", [0, 2, 3]), ValueError, r"param_groups\[0\] names segment 3"),
    "segment negative": (_set("segments", [0, -1]), ValueError, r"param_groups\[0\] names segment -1"),
    "segment float": (_set("segments", [0.0, 2]), TypeError, r"param_groups\[0\].*segment index"),
    "segments string": (_set("segments", "02"), TypeError, r"param_groups\[0\].*'segments' must be a list"),
    "segment dropped": (_set("segments", [0]), ValueError, r"segments \[2\] belong to no parameter group"),
    "segments key deleted": (_delete("segments", 1), ValueError, r"param_groups\[1\] has no 'segments'"),
    "group not a dict": (_append_group([1]), TypeError, r"param_groups\[2\] must be a dict"),
    "param_groups None": (_replace(None), TypeError, r"param_groups must be a list"),
    "param_groups dict": (_replace({"segments": [0, 1, 2]}), TypeError, r"param_groups must be a list"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_invalid_param_group_edit_raises_at_step_with_nothing_changed(backend, edit):
    layout, opt, vgs, params, grads = warm(backend)
    control = copy.deepcopy(opt), params.copy()
    saved_groups = copy.deepcopy(opt.param_groups)
    apply, exc, match = EDITS[edit]
    apply(opt)
    expect_rejected(exc, match, lambda: opt.step(params, grads), opt, params, grads)
    # Undo the edit: the optimizer continues exactly like one that was never edited.
    opt.param_groups = saved_groups
    opt.step(params, grads)
    control[0].step(control[1], grads)
    assert snapshot(opt, params) == snapshot(*control)


def test_valid_param_group_edit_takes_effect(backend):
    layout, opt, vgs, params, grads = warm(backend)
    control = copy.deepcopy(opt), params.copy()
    before = params.copy()
    opt.param_groups[1]["lr"] = 0.0  # segment 1 stops moving, the others are unaffected
    opt.step(params, grads)
    control[0].step(control[1], grads)
    s0, s1, s2 = (layout.segment_slice(i) for i in range(3))
    assert np.array_equal(params[s1], before[s1])
    assert not np.array_equal(control[1][s1], before[s1])
    assert np.array_equal(params[s0], control[1][s0]) and np.array_equal(params[s2], control[1][s2])
    assert snapshot(opt.state) == snapshot(control[0].state)


def test_invalid_seed_edit_raises_at_step(backend):
    layout, opt, vgs, params, grads = warm(backend)
    opt.seed = -1
    expect_rejected(ValueError, r"seed", lambda: opt.step(params, grads), opt, params, grads)


def test_invalid_noise_norm_edit_raises_at_step(backend):
    layout, opt, vgs, params, grads = warm(backend)
    opt.noise_norm = "layer"
    expect_rejected(ValueError, r"noise_norm", lambda: opt.step(params, grads), opt, params, grads)


def test_step_counter_overflow_raises(backend):
    layout, opt, vgs, params, grads = warm(backend)
    state = opt.state_dict()
    state["state"]["step"] = 2**63 - 3
    opt.load_state_dict(state)
    opt.step(params, grads)  # step 2**63 - 2: the largest a checkpoint can hold
    expect_rejected((ValueError, OverflowError), r"step", lambda: opt.step(params, grads), opt, params, grads)


def test_scaler_counter_overflow_raises(backend):
    layout, opt, vgs, params, grads = warm(backend)
    state = vgs.state_dict()
    state["state"]["step"] = 2**63 - 3
    vgs.load_state_dict(state)
    vgs.update(grads)
    expect_rejected((ValueError, OverflowError), r"step", lambda: vgs.update(grads), vgs, grads)


# --- VarianceGradientScaler ------------------------------------------------------------

BAD_VGS_HYPER = [
    ("beta", 0.0, ValueError), ("beta", 1.0, ValueError), ("beta", -0.5, ValueError), ("beta", math.nan, ValueError),
    ("beta", "0.9", TypeError), ("alpha", -1e-3, ValueError), ("alpha", math.inf, ValueError),
    ("eps", 0.0, ValueError), ("eps", -1e-8, ValueError), ("warmup_steps", -1, ValueError),
    ("warmup_steps", 1.5, TypeError), ("warmup_steps", 10.0, TypeError), ("warmup_steps", True, TypeError),
    ("min_scaling_factor", 0.0, ValueError), ("min_scaling_factor", 1.5, ValueError),
    ("min_scaling_factor", -0.1, ValueError), ("variance_cap", 0.0, ValueError),
    ("variance_cap", -1.0, ValueError), ("variance_cap", math.nan, ValueError), ("variance_cap", "50", TypeError),
    ("enabled", 1, TypeError), ("enabled", None, TypeError),
]


@pytest.mark.parametrize("name, value, exc", BAD_VGS_HYPER)
def test_vgs_constructor_rejects_invalid_hyperparameter(backend, name, value, exc):
    with pytest.raises(exc, match=name):
        VarianceGradientScaler(FlatLayout(SHAPES), backend=backend, **{name: value})


@pytest.mark.parametrize("name, value", [
    ("alpha", 0.0), ("warmup_steps", 0), ("min_scaling_factor", 1.0), ("variance_cap", None),
    ("beta", 1e-300), ("enabled", False), ("enabled", np.True_), ("warmup_steps", np.int64(5)),
])
def test_vgs_constructor_accepts_boundary_hyperparameters(backend, name, value):
    vgs = VarianceGradientScaler(FlatLayout(SHAPES), backend=backend, **{name: value})
    assert vgs.hyperparams[name] == value


@pytest.mark.parametrize("name, value, exc", BAD_VGS_HYPER)
def test_invalid_vgs_hyperparameter_edit_raises_with_nothing_changed(backend, name, value, exc):
    layout, opt, vgs, params, grads = warm(backend)
    vgs.hyperparams[name] = value
    expect_rejected(exc, name, lambda: vgs.scale(grads), vgs, grads)
    expect_rejected(exc, name, lambda: vgs.update(grads), vgs, grads)


def test_unknown_vgs_hyperparameter_edit_raises(backend):
    layout, opt, vgs, params, grads = warm(backend)
    vgs.hyperparams["gamma"] = 0.5
    expect_rejected(ValueError, r"unknown.*gamma", lambda: vgs.scale(grads), vgs, grads)
    expect_rejected(ValueError, r"unknown.*gamma", lambda: vgs.update(grads), vgs, grads)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("method", ["scale", "update"])
def test_vgs_rejects_defective_buffer(backend, method, defect):
    layout, opt, vgs, params, grads = warm(backend, "float64")
    make_bad, exc, match = DEFECTS[defect]
    bad = make_bad(grads)
    expect_rejected(exc, rf"grads\b.*{match}", lambda: getattr(vgs, method)(bad), vgs, grads, bad)


def test_vgs_scale_rejects_read_only_grads_and_update_accepts_them(backend):
    layout, opt, vgs, params, grads = warm(backend)
    grads_ro = read_only(grads)
    expect_rejected(ValueError, r"grads is read-only", lambda: vgs.scale(grads_ro), vgs, grads_ro)
    control = copy.deepcopy(vgs)
    vgs.update(grads_ro)
    control.update(grads)
    assert snapshot(vgs) == snapshot(control)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("segment", range(len(SHAPES)))
@pytest.mark.parametrize("method", ["scale", "update"])
def test_vgs_rejects_non_finite_naming_the_segment(backend, method, segment, value):
    layout, opt, vgs, params, grads = warm(backend)
    grads[layout.segment_slice(segment)][0] = value
    expect_rejected(ValueError, rf"grads: segment {segment} holds a non-finite value",
                    lambda: getattr(vgs, method)(grads), vgs, grads)


# --- step(..., vgs=scaler): scale, step and update as one call ---------------------------



@pytest.mark.parametrize("which", ["params", "grads"])
def test_step_with_vgs_rejects_non_finite_before_scaling(backend, which):
    layout, opt, vgs, params, grads = warm(backend)
    (params if which == "params" else grads)[layout.segment_slice(2)][1] = np.nan
    expect_rejected(ValueError, rf"{which}: segment 2", lambda: opt.step(params, grads, vgs=vgs),
                    opt, vgs, params, grads)


def test_step_with_vgs_rejects_read_only_grads(backend):
    layout, opt, vgs, params, grads = warm(backend)
    grads_ro = read_only(grads)
    expect_rejected(ValueError, r"grads is read-only", lambda: opt.step(params, grads_ro, vgs=vgs),
                    opt, vgs, params, grads_ro)


def test_step_with_vgs_rejects_invalid_scaler_hyperparameters(backend):
    layout, opt, vgs, params, grads = warm(backend)
    vgs.hyperparams["beta"] = 1.0
    expect_rejected(ValueError, r"beta", lambda: opt.step(params, grads, vgs=vgs), opt, vgs, params, grads)


def test_step_with_vgs_rejects_invalid_param_group_edit(backend):
    layout, opt, vgs, params, grads = warm(backend)
    opt.param_groups[1]["lr"] = -1.0
    expect_rejected(ValueError, r"param_groups\[1\].*lr", lambda: opt.step(params, grads, vgs=vgs),
                    opt, vgs, params, grads)


def test_step_with_vgs_rejects_foreign_scaler(backend):
    layout, opt, vgs, params, grads = warm(backend)
    other = VarianceGradientScaler(FlatLayout([(3, 4), (5,)], dtype=layout.dtype), backend=backend)
    expect_rejected((ValueError, TypeError), r"layout|segment", lambda: opt.step(params, grads, vgs=other),
                    opt, other, params, grads)
    expect_rejected(TypeError, r"vgs", lambda: opt.step(params, grads, vgs=object()), opt, params, grads)
