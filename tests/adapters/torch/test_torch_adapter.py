"""The PyTorch adapter's AdaptiveUPGD: drop-in API, flat buffers, state, checkpoints.

Modelled on torch's own optimizer tests (``OptimizerInfo``): state-dict round trip stepping
in lockstep, gradients set to None at some step, zero-size parameters, several param groups,
float32 and float64, a scheduler, a closure, deepcopy, frozen parameters; and bit-identity
with the core :class:`upgd_ref.AdaptiveUPGD` run on the same flat buffers.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import upgd_ref
from upgd_ref.adapters.torch import (
    CHECKPOINT_KEY,
    HYPERPARAMETER_KEYS,
    AdaptiveUPGD,
    VarianceGradientScaler,
)

PRODUCTION_DEFAULTS = dict(lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001, beta1=0.9, beta2=0.999,
                           eps=1e-8, adaptive_noise=False, noise_beta=0.999, min_noise_std=1e-6,
                           instant_noise_scale=True)
DTYPES = [torch.float32, torch.float64]
SHAPES = ((4, 3), (0,), (5,), (2, 3, 2), (1,))


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def grads_for(step, params, absent=()):
    gen = torch.Generator().manual_seed(500 + step)
    return [None if i in absent else torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + 0.01 * i
            for i, p in enumerate(params)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def snapshot(opt):
    """Bit-exact description of an adapter optimizer: params, flat state, counters, groups."""
    state = opt.core.state
    return (
        [p.detach().numpy().tobytes() for p in opt._partition.buckets[0].params],
        state.step, state.segment_step.tobytes(), state.grad_norm_ema.tobytes(),
        state.utility.tobytes(), state.first_moment.tobytes(), state.second_moment.tobytes(),
        opt.seed, repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    )


def core_twin(opt):
    """A core optimizer with the adapter's layout, seed and groups, on its own flat buffers."""
    groups, start = [], 0
    for group in opt.param_groups:
        n = len(group["params"])
        groups.append({"segments": list(range(start, start + n)), **{k: group[k] for k in HYPERPARAMETER_KEYS}})
        start += n
    core = upgd_ref.AdaptiveUPGD(opt.layout, seed=opt.seed, param_groups=groups)
    params = opt.layout.pack([p.detach().numpy() for p in opt._partition.buckets[0].params])
    return core, params


# --- API ----------------------------------------------------------------------------------


def test_defaults_param_group_keys_and_repr_match_production():
    opt = AdaptiveUPGD(make_params(), seed=0)
    assert opt.defaults == PRODUCTION_DEFAULTS
    assert list(opt.param_groups[0]) == ["params", *HYPERPARAMETER_KEYS]
    assert isinstance(opt, torch.optim.Optimizer)
    assert "AdaptiveUPGD" in repr(opt)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(beta_utility=1.0), "Invalid beta_utility parameter: 1.0"),
    (dict(sigma=-1e-3), "Invalid sigma value: -0.001"),
    (dict(beta1=-0.5), "Invalid beta1 parameter: -0.5"),
    (dict(beta2=1.5), "Invalid beta2 parameter: 1.5"),
    (dict(eps=-1e-8), "Invalid eps value: -1e-08"),
    (dict(noise_beta=1.0), "Invalid noise_beta parameter: 1.0"),
    (dict(min_noise_std=-1.0), "Invalid min_noise_std value: -1.0"),
    (dict(lr=float("inf")), "lr must be finite"),
    (dict(seed=-1), "seed must be an int"),
    (dict(backend="nope"), "unknown backend"),
])
def test_validation_errors(kwargs, message):
    params = make_params()
    before = [p.data_ptr() for p in params]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdaptiveUPGD(params, **kwargs)
    assert [p.data_ptr() for p in params] == before  # nothing was re-homed


def test_torch_optimizer_errors_are_kept():
    with pytest.raises(ValueError, match="empty parameter list"):
        AdaptiveUPGD([])
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        AdaptiveUPGD(make_params()[0])
    params = make_params()
    with pytest.raises(ValueError, match="more than one parameter group"):
        AdaptiveUPGD([{"params": params[:2]}, {"params": params[1:]}])


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    params = make_params()
    opt = AdaptiveUPGD(params, lr=1e-2, seed=1)
    target = [torch.ones_like(p) for p in params]

    def closure():
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert all(opt.state[p]["step"] == 1 for p in params if p.numel())
    assert opt.step() is None


def test_zero_grad_defaults_to_none_and_keeps_views_when_zeroing():
    params = make_params()
    opt = AdaptiveUPGD(params, seed=1)
    set_grads(params, grads_for(0, params))
    opt.step()
    views = [p.grad.data_ptr() for p in params]
    opt.zero_grad(set_to_none=False)
    assert [p.grad.data_ptr() for p in params] == views and all(not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# --- flat buffers --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_are_rehomed_into_one_aligned_flat_buffer(dtype):
    params = make_params(dtype)
    values = [p.detach().clone() for p in params]
    opt = AdaptiveUPGD(params, seed=1)
    bucket, layout = opt._partition.buckets[0], opt.layout
    base = bucket.param_flat.ctypes.data
    assert base % 64 == 0
    for i, (p, v) in enumerate(zip(params, values)):
        assert p.is_leaf and p.requires_grad and p.dtype == dtype and p.shape == v.shape
        assert torch.equal(p.detach(), v)
        if p.numel():  # (an empty tensor's data_ptr() is 0)
            assert p.data_ptr() == base + layout.offsets[i] * p.element_size()
            assert p.data_ptr() % 64 == 0
    params[0].data.mul_(2)  # an in-place edit through the tensor is seen by the flat buffer
    assert np.array_equal(layout.unpack(bucket.param_flat)[0], (2 * values[0]).numpy())


def test_autograd_accumulates_in_the_flat_gradient_buffer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = AdaptiveUPGD(model.parameters(), lr=1e-3, seed=3)
    x = torch.randn(5, 3)
    model(x).square().sum().backward()  # grads are fresh tensors: gathered (copied) at the step
    present, copied = opt._partition.buckets[0].gather_grads()
    assert all(present) and copied == [0, 1, 2, 3]
    opt.step()
    bucket = opt._partition.buckets[0]
    assert [p.grad.data_ptr() for p in model.parameters()] == bucket.grad_ptrs
    opt.zero_grad(set_to_none=False)
    model(x).square().sum().backward()  # now autograd writes into the flat buffer itself
    assert [p.grad.data_ptr() for p in model.parameters()] == bucket.grad_ptrs
    assert opt._partition.buckets[0].gather_grads()[1] == []  # nothing to copy
    expected = [p.grad.clone() for p in model.parameters()]
    model(x).square().sum().backward()  # accumulation, in place
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, 2 * e)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_to_the_core_on_the_same_buffers(dtype):
    """Two groups, a zero-size parameter, a frozen one, gradients None at some steps."""
    params = make_params(dtype)
    params[4].requires_grad_(False)
    opt = AdaptiveUPGD([{"params": params[:3], "lr": 0.03, "adaptive_noise": True, "sigma": 0.1},
                        {"params": params[3:], "beta_utility": 0.9}], lr=0.01, sigma=0.05, seed=99)
    core, flat = core_twin(opt)
    for k in range(6):
        absent = {4} | ({0, 3} if k == 2 else set())
        grads = grads_for(k, params, absent)
        set_grads(params, grads)
        opt.step()
        present = [g is not None for g in grads]
        flat_grads = opt.layout.pack([g.numpy() if g is not None else np.zeros(tuple(p.shape), p.detach().numpy().dtype)
                                      for g, p in zip(grads, params)])
        core.step(flat, flat_grads, present)
        assert opt._partition.buckets[0].param_flat.tobytes() == flat.tobytes()
        for name in ("utility", "first_moment", "second_moment", "segment_step", "grad_norm_ema"):
            assert getattr(opt.core.state, name).tobytes() == getattr(core.state, name).tobytes()
    frozen = params[4]
    assert frozen not in opt.state and opt.state[frozen] == {}


def test_scheduler_and_manual_edits_are_read_at_every_step():
    params = make_params(torch.float64)
    opt = AdaptiveUPGD(params, lr=0.1, seed=4)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    core, flat = core_twin(opt)
    for k in range(6):
        if k == 3:
            opt.param_groups[0]["weight_decay"] = 0.2
            opt.param_groups[0]["sigma"] = 0.0
        grads = grads_for(k, params)
        set_grads(params, grads)
        for name in ("lr", "weight_decay", "sigma"):
            core.param_groups[0][name] = opt.param_groups[0][name]
        opt.step()
        scheduler.step()
        core.step(flat, opt.layout.pack([g.numpy() for g in grads]))
        assert opt._partition.buckets[0].param_flat.tobytes() == flat.tobytes()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert "initial_lr" in opt.param_groups[0]  # schedulers' own keys are carried, not used


# --- state -------------------------------------------------------------------------------


def test_state_exposes_production_keys_as_views():
    params = make_params()
    opt = AdaptiveUPGD([{"params": params[:2], "adaptive_noise": True}, {"params": params[2:]}], seed=2)
    assert len(opt.state) == 0 and len(opt.state[params[0]]) == 0
    set_grads(params, grads_for(0, params, absent={2}))
    opt.step()
    assert list(opt.state[params[0]]) == ["step", "avg_utility", "first_moment", "sec_moment", "grad_norm_ema"]
    assert list(opt.state[params[3]]) == ["step", "avg_utility", "first_moment", "sec_moment"]
    assert params[2] not in opt.state and params[3] in opt.state
    entry = opt.state[params[0]]
    assert type(entry["step"]) is int and entry["step"] == 1
    assert type(entry["grad_norm_ema"]) is float
    util = entry["avg_utility"]
    assert util.shape == params[0].shape and util.dtype == params[0].dtype
    util.fill_(0.25)  # a view: the core's flat state sees the edit
    assert (opt.layout.unpack(opt.core.state.utility)[0] == 0.25).all()
    entry["step"] = 7
    assert opt.core.state.segment_step[0] == 7 and opt.core.state.step >= 7
    entry["custom"] = "kept"
    assert opt.state[params[0]]["custom"] == "kept"
    del opt.state[params[0]]
    assert params[0] not in opt.state and opt.core.state.segment_step[0] == 0
    assert not opt.layout.unpack(opt.core.state.utility)[0].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip_steps_in_lockstep_bit_identically(dtype, tmp_path):
    params = make_params(dtype)
    opt = AdaptiveUPGD([{"params": params[:2], "adaptive_noise": True, "instant_noise_scale": False},
                        {"params": params[2:], "lr": 0.02}], lr=0.01, sigma=0.05, seed=11)
    for k in range(4):  # at k = 2 no parameter has a gradient: the noise counter still moves
        set_grads(params, grads_for(k, params, absent={1} if k == 1 else (range(5) if k == 2 else ())))
        opt.step()
    assert opt.core.step_count == 4 and max(opt.core.state.segment_step) == 3
    saved = copy.deepcopy(opt.state_dict())
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path)  # weights_only=True: the state dict holds only plain types and tensors

    twins = []
    for sd in (saved, loaded):
        twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = AdaptiveUPGD([{"params": twin_params[:2]}, {"params": twin_params[2:]}], seed=12345)
        twin.load_state_dict(sd)
        twins.append((twin, twin_params))
        assert snapshot(twin) == snapshot(opt)
    for k in range(4, 8):
        grads = grads_for(k, params, absent={0} if k == 5 else ())
        for o, ps in [(opt, params)] + twins:
            set_grads(ps, grads)
            o.step()
        for twin, _ in twins:
            assert snapshot(twin) == snapshot(opt)


def test_state_dict_is_plain_data_with_copies():
    params = make_params()
    opt = AdaptiveUPGD(params, seed=3)
    set_grads(params, grads_for(0, params))
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", CHECKPOINT_KEY}
    assert sd[CHECKPOINT_KEY]["seed"] == 3 and sd[CHECKPOINT_KEY]["step"] == 1
    entry = sd["state"][0]
    assert isinstance(entry["step"], int) and entry["avg_utility"].is_contiguous()
    entry["avg_utility"].fill_(9.0)  # a copy: the optimizer is unaffected
    assert not (opt.state[params[0]]["avg_utility"] == 9.0).any()
    assert "grad_norm_ema" not in entry


def test_load_accepts_tensor_steps_and_casts_dtypes():
    params64 = make_params(torch.float64)
    opt64 = AdaptiveUPGD(params64, seed=3)
    set_grads(params64, grads_for(0, params64))
    opt64.step()
    sd = copy.deepcopy(opt64.state_dict())
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(float(entry["step"]))  # torch.optim style
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params64]
    opt32 = AdaptiveUPGD(params32, seed=1)
    opt32.load_state_dict(sd)
    assert opt32.state[params32[0]]["step"] == 1
    assert opt32.state[params32[0]]["avg_utility"].dtype == torch.float32
    assert torch.equal(opt32.state[params32[0]]["avg_utility"], opt64.state[params64[0]]["avg_utility"].float())


def test_load_state_dict_errors_leave_everything_unchanged():
    params = make_params()
    opt = AdaptiveUPGD(params, seed=3)
    set_grads(params, grads_for(0, params))
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    before = snapshot(opt)
    bad_cases = []
    sd = copy.deepcopy(good); sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))  # noqa: E702
    bad_cases.append((sd, "different number of parameter groups"))
    sd = copy.deepcopy(good); sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]  # noqa: E702
    bad_cases.append((sd, "doesn't match the size"))
    sd = copy.deepcopy(good); sd["state"][0]["avg_utility"] = torch.zeros(3)  # noqa: E702
    bad_cases.append((sd, "shape"))
    sd = copy.deepcopy(good); sd["state"][2]["step"] = -1  # noqa: E702
    bad_cases.append((sd, "non-negative integer"))
    sd = copy.deepcopy(good); del sd["state"][3]["sec_moment"]  # noqa: E702
    bad_cases.append((sd, "lacks"))
    sd = copy.deepcopy(good); sd["state"][3]["sec_moment"] = -torch.ones(2, 3, 2)  # noqa: E702
    bad_cases.append((sd, "second_moment"))
    sd = copy.deepcopy(good); sd["param_groups"][0]["lr"] = -1.0  # noqa: E702
    bad_cases.append((sd, "lr"))
    sd = copy.deepcopy(good); sd[CHECKPOINT_KEY]["seed"] = "x"  # noqa: E702
    bad_cases.append((sd, "seed"))
    for sd, message in bad_cases:
        with pytest.raises((ValueError, TypeError), match=message):
            opt.load_state_dict(sd)
        assert snapshot(opt) == before
    opt.load_state_dict(good)
    assert snapshot(opt) == before


# --- copies, pickling, several optimizers ---------------------------------------------------


def test_deepcopy_and_pickle_give_an_independent_equal_optimizer():
    params = make_params()
    opt = AdaptiveUPGD(params, lr=0.01, sigma=0.1, seed=21)
    set_grads(params, grads_for(0, params))
    opt.step()
    opt.state[params[0]]["note"] = [1, 2]
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        twin_params = twin._partition.buckets[0].params
        assert snapshot(twin) == snapshot(opt)
        assert all(a is not b and (a.data_ptr() != b.data_ptr() or not a.numel()) for a, b in zip(twin_params, params))
        assert twin.state[twin_params[0]]["note"] == [1, 2]
        assert twin._partition.buckets[0].param_flat.ctypes.data % 64 == 0
        reference = copy.deepcopy(opt)
        for o in (twin, reference):
            set_grads(o._partition.buckets[0].params, grads_for(1, params))
            o.step()
        assert snapshot(twin) == snapshot(reference)
        assert snapshot(twin) != snapshot(opt)


def test_deepcopy_of_model_and_optimizer_keeps_them_linked():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = AdaptiveUPGD(model.parameters(), seed=1)
    model2, opt2 = copy.deepcopy((model, opt))
    assert all(a is b for a, b in zip(model2.parameters(), opt2.param_groups[0]["params"]))
    model2(torch.ones(1, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert not all(torch.equal(a, b) for a, b in zip(model2.parameters(), before))


def test_several_optimizers_coexist():
    a, b = make_params(seed=1), make_params(seed=2)
    opt_a = AdaptiveUPGD(a, lr=0.01, seed=1)
    opt_b = AdaptiveUPGD(b, lr=0.02, seed=2)
    core_a, flat_a = core_twin(opt_a)
    core_b, flat_b = core_twin(opt_b)
    for k in range(3):
        for opt, params, core, flat in ((opt_a, a, core_a, flat_a), (opt_b, b, core_b, flat_b)):
            grads = grads_for(k, params)
            set_grads(params, grads)
            opt.step()
            core.step(flat, opt.layout.pack([g.numpy() for g in grads]))
            assert opt._partition.buckets[0].param_flat.tobytes() == flat.tobytes()


def test_a_second_optimizer_over_the_same_parameters_takes_them_over_without_losing_updates():
    params = make_params(torch.float64)
    first = AdaptiveUPGD(params, lr=0.01, seed=1)
    second = AdaptiveUPGD(params, lr=0.02, seed=2)  # re-homes them into its own buffer
    core1, flat = core_twin(first)
    core2, _ = core_twin(second)
    for k in range(3):
        grads = grads_for(k, params)
        flat_grads = first.layout.pack([g.numpy() for g in grads])
        for opt, core in ((first, core1), (second, core2)):
            set_grads(params, grads)
            opt.step()  # each re-adopts the parameters if the other moved them
            core.step(flat, flat_grads.copy())
            assert np.array_equal(np.concatenate([p.detach().numpy().ravel() for p in params]),
                                  np.concatenate([x.ravel() for x in first.layout.unpack(flat)]))


def test_add_param_group_keeps_existing_state():
    params = make_params()
    opt = AdaptiveUPGD(params[:3], lr=0.01, seed=8)
    set_grads(params[:3], grads_for(0, params[:3]))
    opt.step()
    kept = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[params[i]].items()}
            for i in range(3)}
    count = opt.core.step_count
    opt.add_param_group({"params": params[3:], "lr": 0.5})
    assert len(opt.layout.shapes) == 5 and opt.core.step_count == count
    for i, entry in kept.items():
        assert all(torch.equal(v, opt.state[params[i]][k]) if isinstance(v, torch.Tensor) else v == opt.state[params[i]][k]
                   for k, v in entry.items())
    assert params[3] not in opt.state
    set_grads(params, grads_for(1, params))
    opt.step()
    assert opt.state[params[3]]["step"] == 1 and opt.state[params[0]]["step"] == 2
    with pytest.raises(TypeError, match="dtype"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.param_groups) == 2


# --- seeding ------------------------------------------------------------------------------


def test_seed_comes_from_torch_global_generator():
    torch.manual_seed(123)
    s1 = AdaptiveUPGD(make_params()).seed
    torch.manual_seed(123)
    s2 = AdaptiveUPGD(make_params()).seed
    torch.manual_seed(124)
    s3 = AdaptiveUPGD(make_params()).seed
    assert s1 == s2 != s3
    assert AdaptiveUPGD(make_params(), seed=2**64 - 1).seed == 2**64 - 1


def test_runs_are_reproducible_under_manual_seed():
    def run():
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = AdaptiveUPGD(model.parameters(), lr=1e-2, sigma=0.05)
        vgs = VarianceGradientScaler(model.parameters(), warmup_steps=1)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        for _ in range(5):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            vgs.scale_gradients()
            opt.step()
            vgs.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


# --- a production training script, switched to the adapter ----------------------------------


def _script(tmp_path, total, save_at=None, resume=False):
    """A production-style training loop: zero_grad, backward, VGS, clip, step, VGS step,
    LR scheduler, checkpointing model + optimizer + scaler + scheduler with torch.save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = AdaptiveUPGD(model.parameters(), lr=3e-3, adaptive_noise=True, sigma=0.01)
    scaler = VarianceGradientScaler(model.parameters(), warmup_steps=3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    data = torch.randn(total, 32, 6), torch.randn(total, 32, 2)
    start = 0
    if resume:
        ckpt = torch.load(tmp_path / "ckpt.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["vgs"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
    for k in range(start, total):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data[0][k]), data[1][k])
        loss.backward()
        scaler.scale_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scaler.step()
        scheduler.step()
        if save_at is not None and k + 1 == save_at:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "vgs": scaler.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": k + 1}, tmp_path / "ckpt.pt")
    return [p.detach().clone() for p in model.parameters()], optimizer, scaler


def test_training_script_with_mid_run_checkpoint_resumes_bit_identically(tmp_path):
    straight, opt_a, vgs_a = _script(tmp_path, 10, save_at=6)
    resumed, opt_b, vgs_b = _script(tmp_path, 10, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert snapshot(opt_a)[1:] == snapshot(opt_b)[1:]
    assert vgs_a.state_dict()["step_count"] == vgs_b.state_dict()["step_count"] == 10
    assert torch.equal(vgs_a.state_dict()["param_grad_sq_ema"], vgs_b.state_dict()["param_grad_sq_ema"])


def test_model_state_dict_save_and_load_keep_parameters_homed(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = AdaptiveUPGD(model.parameters(), seed=1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = torch.nn.Linear(3, 2)
    other.load_state_dict(torch.load(buffer))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    ptrs = [p.data_ptr() for p in model.parameters()]
    model.load_state_dict(other.state_dict())  # copies in place: still in the flat buffer
    assert [p.data_ptr() for p in model.parameters()] == ptrs == [
        opt._partition.buckets[0].param_ptrs[i] for i in range(2)]


def test_named_parameters_hooks_and_state_device_moves():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = AdaptiveUPGD(model.named_parameters(), lr=1e-2, seed=1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert calls == ["pre", "post", "sd"]
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]
    before = snapshot(opt)
    for entry in opt.state.values():  # the usual "move optimizer state to a device" loop
        for key, value in entry.items():
            if torch.is_tensor(value):
                entry[key] = value.to("cpu")
    assert snapshot(opt) == before
    with pytest.raises(ValueError, match="with/without names"):  # torch's own check is kept
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
