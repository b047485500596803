"""torch.optim's conventions on the drop-in optimizers (issue 16 §2): read-only state_dict,
tensor hyper-parameters, maximize, the implementation flags, momentum-cycling schedulers,
duplicate parameters, step hooks and torch.compile of the surrounding training step."""

from __future__ import annotations

import copy

import pytest
import torch

from upgd_ref.adapters.torch import UPGD, UPGDW, AdaptiveUPGD

from tests.helpers import torch_tensors as helpers
from tests.helpers.torch_tensors import seeded_grads, set_grads

MEMBERS = {"AdaptiveUPGD": AdaptiveUPGD, "UPGD": UPGD, "UPGDW": UPGDW}
SHAPES = ((4, 3), (3,), (2, 2))


def make_params(seed=0, dtype=torch.float32):
    return helpers.make_params(SHAPES, dtype, seed)


def grads_for(step, params):
    return seeded_grads(params, 300 + step)


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("name", MEMBERS)
def test_state_dict_only_reads_and_numbers_parameters_as_torch(name):
    params = make_params()
    opt = MEMBERS[name]([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, seed=0)
    set_grads(params, grads_for(0, params))
    opt.step()
    opt.param_groups.extend([dict(opt.param_groups[0])])  # the same parameters listed again
    before = (opt.layout, opt.flat_state.utility.tobytes(), [p.data_ptr() for p in params])
    sd = opt.state_dict()
    assert (opt.layout, opt.flat_state.utility.tobytes(), [p.data_ptr() for p in params]) == before
    twin = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=1.0)
    twin.param_groups.extend([dict(twin.param_groups[0])])
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in twin.state_dict()["param_groups"]]
    assert sorted(sd["state"]) == [0, 1, 2] and sd["state"][0]["step"] == 1


def test_tensor_betas_step_as_float_betas():
    params = make_params()
    as_tensors = UPGDW(params, lr=1e-2, betas=(torch.tensor(0.8), torch.tensor(0.95)), seed=3)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    as_floats = UPGDW(copies, lr=1e-2, betas=(0.8, 0.95), seed=3)
    for k in range(3):
        set_grads(params, grads_for(k, params))
        set_grads(copies, grads_for(k, params))
        as_tensors.step()
        as_floats.step()
    assert torch.equal(flat(params), flat(copies))
    with pytest.raises(ValueError, match="index 1"):
        UPGDW(params, betas=(torch.tensor(0.9), torch.tensor(1.0)))


@pytest.mark.parametrize("name", MEMBERS)
def test_maximize_is_one_sign_flip_of_the_gradient(name):
    """``maximize=True`` with gradients ``g`` steps exactly as ``maximize=False`` with ``-g``
    (torch's definition), and leaves ``g`` itself bit-identical."""
    params = make_params(dtype=torch.float64)
    maximizing = MEMBERS[name](params, lr=1e-2, weight_decay=0.1, maximize=True, seed=5)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    written = MEMBERS[name](copies, lr=1e-2, weight_decay=0.1, seed=5)
    assert maximizing.param_groups[0]["maximize"] is True and "maximize" not in written.param_groups[0]
    for k in range(4):
        grads = grads_for(k, params)
        set_grads(params, grads)
        set_grads(copies, [-g for g in grads])
        maximizing.step()
        written.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # g restored bit for bit
        assert torch.equal(flat(params), flat(copies)), k
    # a failing step restores the gradients too
    maximizing.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        maximizing.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    maximizing.param_groups[0]["lr"] = 1e-2
    maximizing.param_groups[0]["maximize"] = False  # per group, read at each step, like every key
    set_grads(params, grads)
    set_grads(copies, grads)
    maximizing.step()
    written.step()
    assert torch.equal(flat(params), flat(copies))


@pytest.mark.parametrize("name", MEMBERS)
def test_implementation_flags(name):
    cls = MEMBERS[name]
    for flag in ("foreach", "fused"):
        for value in (None, False, True):
            opt = cls(make_params(), **{flag: value})
            assert flag not in opt.defaults  # meaningless here: one implementation
    for flag in ("capturable", "differentiable"):
        cls(make_params(), **{flag: False})
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            cls(make_params(), **{flag: True})
    with pytest.raises(TypeError, match="maximize must be a bool"):
        cls(make_params(), maximize="yes")
    with pytest.raises(TypeError, match="foreach must be a bool or None"):
        cls(make_params(), foreach=1)


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3),
], ids=["OneCycleLR", "CyclicLR"])
def test_momentum_cycling_schedulers_move_beta1_through_betas(make_scheduler):
    params = make_params()
    opt = UPGDW(params, lr=1e-2, seed=0)
    scheduler = make_scheduler(opt)
    seen = set()
    for k in range(5):
        set_grads(params, grads_for(k, params))
        opt.step()
        hyper = opt.core.step_hyperparams()[0]  # what the step used
        assert (hyper["beta1"], hyper["beta2"]) == tuple(opt.param_groups[0]["betas"])
        assert hyper["lr"] == opt.param_groups[0]["lr"]
        seen.add(hyper["beta1"])
        scheduler.step()
    assert len(seen) > 1  # the scheduler cycled the momentum


def test_a_parameter_listed_twice_warns_as_torch_and_is_kept_once():
    params = make_params()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = AdaptiveUPGD([params[0], params[1], params[0]], lr=1e-2, seed=0)
    assert opt.param_groups[0]["params"] == [params[0], params[1]] and opt.layout.num_segments == 2
    named = [("a", params[0]), ("b", params[1]), ("a", params[0])]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = AdaptiveUPGD(named, seed=0)
    assert opt.param_groups[0]["param_names"] == ["a", "b"]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt.add_param_group({"params": [("c", params[2]), ("c", params[2])]})
    assert opt.layout.num_segments == 3
    with pytest.raises(ValueError, match="more than one parameter group"):
        AdaptiveUPGD([{"params": [params[0]]}, {"params": [params[0]]}])


@pytest.mark.parametrize("name", MEMBERS)
def test_step_hooks(name):
    params = make_params()
    opt = MEMBERS[name](params, lr=1e-2, seed=0)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.flat_state.step)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.flat_state.step)))
    set_grads(params, grads_for(0, params))
    opt.step()
    assert calls == [("pre", 0), ("post", 1)]
    pre.remove()
    post.remove()
    opt.step()
    assert len(calls) == 2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", MEMBERS)
def test_torch_compile_of_the_training_step(name, backend):
    """The compiled training step graph-breaks at ``optimizer.step()``. With the ``aot_eager``
    backend (the same kernels as eager) it gives the eager numbers bit for bit; inductor
    fuses the model's forward and backward, which moves the gradients by roundings only."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        opt = MEMBERS[name](model.parameters(), lr=1e-2, seed=2)

        def train_step(x, model=model, opt=opt):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            return loss.detach()

        step = torch.compile(train_step, backend=backend) if compiled else train_step
        gen = torch.Generator().manual_seed(1)
        losses = [step(torch.randn(8, 4, generator=gen)) for _ in range(3)]
        results.append((losses, copy.deepcopy([p.detach() for p in model.parameters()])))
    (eager_losses, eager_params), (losses, params) = results
    if backend == "aot_eager":
        assert all(torch.equal(a, b) for a, b in zip(eager_params, params))
        assert all(torch.equal(a, b) for a, b in zip(eager_losses, losses))
    else:
        for a, b in zip(eager_params, params):
            torch.testing.assert_close(a, b)  # torch's float32 defaults: roundings, not a different step


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3),
], ids=["OneCycleLR", "CyclicLR"])
def test_adaptive_upgd_with_betas_works_with_momentum_cycling(make_scheduler):
    """``AdaptiveUPGD(betas=...)``: groups carry torch's pair instead of ``beta1, beta2`` (as
    Adam), and the step reads it; ``beta_utility`` stays its own key."""
    params = make_params()
    with pytest.raises(ValueError, match="momentum"):  # production's keys: nothing to cycle
        make_scheduler(AdaptiveUPGD(make_params(), lr=1e-2))
    opt = AdaptiveUPGD(params, lr=1e-2, betas=(0.9, 0.99), seed=0)
    assert "betas" in opt.defaults and "beta1" not in opt.param_groups[0]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = AdaptiveUPGD(copies, lr=1e-2, seed=0)
    scheduler = make_scheduler(opt)
    seen = set()
    for k in range(5):
        set_grads(params, grads_for(k, params))
        set_grads(copies, grads_for(k, params))
        group, other = opt.param_groups[0], plain.param_groups[0]
        other["lr"], (other["beta1"], other["beta2"]) = group["lr"], group["betas"]
        opt.step()
        plain.step()
        assert torch.equal(flat(params), flat(copies))  # betas is beta1, beta2
        hyper = opt.core.step_hyperparams()[0]
        assert (hyper["beta1"], hyper["beta2"], hyper["beta_utility"]) == (*group["betas"], 0.999)
        seen.add(hyper["beta1"])
        scheduler.step()
    assert len(seen) > 1
    sd = opt.state_dict()
    again = AdaptiveUPGD([torch.nn.Parameter(p.detach().clone()) for p in params], betas=(0.9, 0.99), seed=1)
    again.load_state_dict(sd)
    with pytest.raises(ValueError, match="not both"):
        AdaptiveUPGD(make_params(), beta1=0.8, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="pair"):
        AdaptiveUPGD(make_params(), betas=0.9)
    opt.param_groups[0]["beta1"] = 0.5
    with pytest.raises(ValueError, match="both 'betas' and"):
        opt.step()
