"""PyTorch's generic optimizer tests, run against the drop-in ``AdaptiveUPGD``, ``UPGD`` and ``UPGDW``.

``torch/testing/_internal/common_optimizers.py`` ships in the torch wheel (``OptimizerInfo``,
``OptimizerInput``, ``ErrorOptimizerInput``, the error inputs every optimizer must pass);
``test/test_optim.py``, which drives them, does not. So this module writes one
``OptimizerInfo`` per member, with honest support flags, and drives the generic checks of
``test_optim.py`` that apply (each below names the torch test it follows). The ones that do
not apply, and why, are listed in ``specs/adapters-torch.md`` §7.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo,
                                                       OptimizerInput, get_error_inputs_for_all_optims)

from upgd_ref.adapters.torch import UPGD, UPGDW, AdaptiveUPGD
from upgd_ref.checks import NonFiniteStepError

DEVICE, DTYPE = "cpu", torch.float32


def _inputs(*configs):
    return lambda device, dtype=None: [OptimizerInput(params=None, kwargs=kwargs, desc=desc) for desc, kwargs in configs]


_NOISE = (
    ("adaptive noise", {"lr": 0.01, "adaptive_noise": True, "sigma": 0.05}),
    ("adaptive noise, averaged norm, unbiased start", {"lr": 0.01, "adaptive_noise": True,
                                                       "instant_noise_scale": False, "noise_ema_init": 0.0}),
    ("global noise norm", {"lr": 0.01, "adaptive_noise": True, "noise_norm": "global"}),
)
_COMMON = (
    ("default", {}),
    ("non-default lr", {"lr": 0.01}),
    ("Tensor lr", {"lr": torch.tensor(0.01)}),
    ("weight_decay", {"lr": 0.01, "weight_decay": 0.1}),
    ("maximize, weight_decay", {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    *_NOISE,
)


def _errors(*extra):
    """torch's error inputs for every optimizer, then the member's (production messages)."""
    def inputs(device, dtype):
        grad_sparse = Parameter(torch.randn(3, device=device, dtype=dtype))
        grad_sparse.grad = torch.zeros(3, device=device, dtype=dtype).to_sparse()
        grad_nan = Parameter(torch.randn(3, device=device, dtype=dtype))
        grad_nan.grad = torch.tensor([0.0, float("nan"), 1.0], device=device, dtype=dtype)
        own = [
            (None, {"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
            (None, {"sigma": -1.0}, ValueError, "Invalid sigma value: -1.0"),
            (None, {"capturable": True}, ValueError, "does not support capturable=True"),
            (None, {"differentiable": True}, ValueError, "does not support differentiable=True"),
            ([Parameter(torch.zeros(2, dtype=torch.complex32))], {}, TypeError, "complex32"),
            *extra,
        ]
        out = get_error_inputs_for_all_optims(device, dtype)
        out += [ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs, desc=regex), error_type=error,
                                    error_regex=re.escape(regex)) for params, kwargs, error, regex in own]
        out += [ErrorOptimizerInput(OptimizerInput(params=[p], kwargs={}, desc=regex), error_type=error,
                                    error_regex=regex, error_on=OptimizerErrorEnum.STEP_ERROR)
                for p, error, regex in ((grad_sparse, TypeError, "sparse gradients"),
                                        (grad_nan, ValueError, "non-finite"))]
        return out
    return inputs


_FLAGS = dict(
    supported_impls=(),  # foreach/fused are accepted and mean nothing: one flat-buffer implementation
    not_og_supported_flags=("maximize", "foreach", "fused", "capturable", "differentiable"),
    supports_sparse=False, has_capturable_arg=False, supports_complex=True, supports_multiple_devices=False,
    step_requires_closure=False, supports_param_groups=True,
    scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],),
)

OPTIM_DB = [
    OptimizerInfo(
        AdaptiveUPGD,
        optim_inputs_func=_inputs(*_COMMON, ("paper profile", {"lr": 0.01, "profile": "paper"}),
                                  ("betas and eps", {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6})),
        optim_error_inputs_func=_errors((None, {"beta1": 1.0}, ValueError, "Invalid beta1 parameter: 1.0"),
                                        (None, {"profile": "Paper"}, ValueError, "profile")),
        **_FLAGS,
    ),
    OptimizerInfo(
        UPGD,
        optim_inputs_func=_inputs(*_COMMON, ("paper profile", {"lr": 0.01, "profile": "paper"})),
        optim_error_inputs_func=_errors((None, {"beta_utility": 1.0}, ValueError, "Invalid beta_utility parameter")),
        **_FLAGS,
    ),
    OptimizerInfo(
        UPGDW,
        optim_inputs_func=_inputs(*_COMMON, ("Tensor betas", {"lr": 0.01, "betas": (torch.tensor(0.8),
                                                                                   torch.tensor(0.99))})),
        optim_error_inputs_func=_errors((None, {"betas": (1.0, 0.999)}, ValueError,
                                         "Invalid beta parameter at index 0: 1.0"),
                                        (None, {"amsgrad": True}, NotImplementedError, "AMSGrad")),
        scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
                          [lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=25)]),
        **{k: v for k, v in _FLAGS.items() if k != "scheduler_inputs"},
    ),
]
CASES = [pytest.param(info, optim_input, id=f"{info.optim_cls.__name__}-{optim_input.desc}")
         for info in OPTIM_DB for optim_input in info.optim_inputs_func(DEVICE)]
INFOS = [pytest.param(info, id=info.optim_cls.__name__) for info in OPTIM_DB]

#: Constructor-only keywords (not param-group keys): they cannot go into a group dict.
CONSTRUCTOR_ONLY = ("profile", "noise_norm", "noise_ema_init", "seed", "backend", "capturable", "differentiable",
                    "foreach", "fused")


def build(info, params, kwargs, seed=0):
    return info.optim_cls(params, **kwargs, seed=seed)


def problem(seed=0, contiguous=True):
    """test_optim's problem: ``loss = |W x + b|^2`` (``contiguous=False``: ``W`` and ``b`` are
    every other element of a larger tensor, as test_optim's non-contiguous variant)."""
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn((10, 5), generator=gen, dtype=DTYPE))
        bias = Parameter(torch.randn((10,), generator=gen, dtype=DTYPE))
    else:
        weight = Parameter(torch.randn((10, 5, 2), generator=gen, dtype=DTYPE)[..., 0])
        bias = Parameter(torch.randn((10, 2), generator=gen, dtype=DTYPE)[..., 0])
    x = torch.randn(5, generator=gen, dtype=DTYPE)
    return weight, bias, x


def goes_right_direction(kwargs, final, initial):
    return final > initial if kwargs.get("maximize", False) else final < initial


# --- test_errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("info", INFOS)
def test_errors(info):
    for error_input in info.optim_error_inputs_func(DEVICE, DTYPE):
        optim_input = error_input.optimizer_error_input
        params = optim_input.params
        if params is None:
            params = [Parameter(torch.randn(1, dtype=DTYPE))]
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    info.optim_cls(params, **optim_input.kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    info.optim_cls(params, **optim_input.kwargs)
        else:
            optimizer = info.optim_cls(params, **optim_input.kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optimizer.step()


# --- test_forloop_goes_right_direction (with and without schedulers) ---------------------------

@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_schedulers", [False, True])
@pytest.mark.parametrize("info, optim_input", CASES)
def test_forloop_goes_right_direction(info, optim_input, with_schedulers, contiguous):
    """Also torch's non-contiguous variant: ``Parameter(randn(10, 5, 2)[..., 0])`` (gathered)."""
    weight, bias, x = problem(contiguous=contiguous)
    optimizer = build(info, [weight, bias], optim_input.kwargs)
    for constructors in info.scheduler_inputs if with_schedulers else ([],):
        schedulers = [make(optimizer) for make in constructors]

        def closure():
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = closure()
            optimizer.step()
            for scheduler in schedulers:
                scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
        assert goes_right_direction(optim_input.kwargs, closure().item(), initial)


# --- test_complex, test_complex_2d ---------------------------------------------------------------

@pytest.mark.parametrize("info, optim_input", CASES)
def test_complex(info, optim_input):
    """Complex parameters (and a real one) step as their ``view_as_real`` twins, every step."""
    gen = torch.Generator().manual_seed(0)
    complex_params = [torch.randn(10, 5, dtype=torch.complex64, generator=gen).requires_grad_(),
                      torch.randn(10, dtype=torch.complex64, generator=gen).requires_grad_(),
                      torch.randn(10, 5, dtype=torch.float32, generator=gen).requires_grad_()]
    real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                   for p in complex_params]
    complex_optimizer = build(info, complex_params, optim_input.kwargs)
    real_optimizer = build(info, real_params, optim_input.kwargs)
    real_steps, complex_steps = [], []
    for _ in range(3):
        for real, param in zip(real_params, complex_params):
            grad = torch.randn(real.shape, generator=gen)
            real.grad = grad
            param.grad = torch.view_as_complex(grad.clone()) if param.is_complex() else grad.clone()
            real_steps.append(real.detach().clone())
            complex_steps.append(torch.view_as_real_copy(param.detach()) if param.is_complex() else param.detach().clone())
        real_optimizer.step()
        complex_optimizer.step()
    as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
    assert all(torch.equal(a, b) for a, b in zip(real_params, as_real))
    assert all(torch.equal(a, b) for a, b in zip(complex_steps, real_steps))


_SEGMENT_FREE = [pytest.param(info, optim_input, id=f"{info.optim_cls.__name__}-{optim_input.desc}")
                 for info in OPTIM_DB for optim_input in info.optim_inputs_func(DEVICE)
                 if not optim_input.kwargs.get("adaptive_noise", False)]


def _rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("info, optim_input", _SEGMENT_FREE)
def test_complex_2d(info, optim_input):
    """A complex parameter against its real and imaginary parts as two parameters, with the
    noise off (``sigma=0``): the noise's indices and adaptive scale belong to segments, and
    one ``(2,)`` complex segment and two ``(2,)`` real ones draw different noise by
    definition (``specs/adapters-torch.md`` §7); the rest is element-wise."""
    kwargs = {**optim_input.kwargs, "sigma": 0.0}
    torch.manual_seed(2024)
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    optim1 = build(info, [a1], kwargs)
    optim2 = build(info, [a1_real, a1_imag], kwargs)
    for _ in range(10):
        optim1.zero_grad()
        optim2.zero_grad()
        a2 = torch.complex(a1_real, a1_imag)
        _rosenbrock(a1).abs().backward()
        _rosenbrock(a2).abs().backward()
        assert _equal_nan(a1.grad.real, a1_real.grad) and _equal_nan(a1.grad.imag, a1_imag.grad)
        if not torch.isfinite(a1.grad).all():  # diverged (e.g. UPGD at lr 0.01): both refuse the step
            for optimizer in (optim1, optim2):
                with pytest.raises(NonFiniteStepError):
                    optimizer.step()
            return
        optim1.step()
        optim2.step()
        assert torch.equal(a1.real, a1_real) and torch.equal(a1.imag, a1_imag)


def _equal_nan(a, b) -> bool:
    """test_optim's ``assertEqual`` (NaN equals NaN), exactly."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# --- test_step_is_noop_for_zero_grads ------------------------------------------------------------

@pytest.mark.parametrize("info, optim_input", [case for case in _SEGMENT_FREE
                                               if case.values[1].kwargs.get("profile") != "paper"])
def test_step_is_noop_for_zero_grads(info, optim_input):
    """As torch, which skips inputs with weight decay: here weight decay and the noise are set
    to 0 (the production defaults, ``weight_decay=0.001`` and ``sigma=0.001``, move parameters
    whose gradient is zero: the algorithm's, not a bug). The paper profile refuses an
    all-zero utility (``U_hi = 0``, ``specs/algorithm.md`` §7.3), so it is left out."""
    param = torch.randn((5, 1), dtype=DTYPE, requires_grad=True)
    old_param = param.detach().clone()
    optimizer = build(info, [param], {**optim_input.kwargs, "weight_decay": 0.0, "sigma": 0.0})
    param.grad = torch.zeros_like(param)
    optimizer.step(lambda: torch.tensor([1], dtype=DTYPE))
    assert torch.equal(old_param, param)


# --- test_param_groups_weight_decay / test_param_groups_lr -------------------------------------

@pytest.mark.parametrize("info, optim_input", CASES)
def test_param_groups_weight_decay_and_lr(info, optim_input):
    constructor = {k: v for k, v in optim_input.kwargs.items() if k in CONSTRUCTOR_ONLY}
    group = {k: v for k, v in optim_input.kwargs.items() if k not in CONSTRUCTOR_ONLY}
    for split in ({"weight_decay": 0.0}, {"lr": 0.0}):
        weight, bias, x = problem()
        optimizer = build(info, [dict(params=[weight], **group), dict(params=[bias], **{**group, **split})],
                          constructor)
        frozen = bias.detach().clone()
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            (weight.mv(x) + bias).pow(2).sum().backward()
            optimizer.step()
        assert goes_right_direction(optim_input.kwargs, (weight.mv(x) + bias).pow(2).sum().item(), initial)
        if split == {"lr": 0.0}:  # lr 0 and the group's weight decay: p (1 - 0) - 0 = p
            assert torch.equal(bias.detach(), frozen)


# --- test_step_is_noop_when_params_have_no_grad ------------------------------------------------

@pytest.mark.parametrize("info, optim_input", CASES)
def test_step_is_noop_when_params_have_no_grad(info, optim_input):
    params = [Parameter(torch.randn(2, 3, dtype=DTYPE)) for _ in range(2)]
    old = [p.detach().clone() for p in params]
    optimizer = build(info, params, optim_input.kwargs)
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, old)) and len(optimizer.state) == 0


# --- test_state_dict_deterministic / load with different param ids / weights_only -------------

def _steps(optimizer, params, start, count):
    for k in range(start, start + count):
        gen = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        optimizer.step()


@pytest.mark.parametrize("info, optim_input", CASES)
def test_state_dict_deterministic_with_different_param_ids(info, optim_input):
    weight, bias, _ = problem()
    optimizer = build(info, [weight, bias], optim_input.kwargs, seed=1)
    _steps(optimizer, [weight, bias], 0, 3)
    saved = torch.load(io.BytesIO(_save(optimizer.state_dict())), weights_only=True)
    clones = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]  # other tensors, other ids
    other = build(info, clones, optim_input.kwargs, seed=99)
    other.load_state_dict(saved)
    _steps(optimizer, [weight, bias], 3, 3)
    _steps(other, clones, 3, 3)
    assert torch.equal(weight, clones[0]) and torch.equal(bias, clones[1])
    assert _plain(optimizer.state_dict()) == _plain(other.state_dict())


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _plain(value):
    """A state dict as comparable plain values (tensors as lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- test_can_load_older_state_dict / test_load_nontensor_step ----------------------------------

@pytest.mark.parametrize("info, optim_input", CASES)
def test_can_load_older_state_dict_and_tensor_steps(info, optim_input):
    weight, bias, _ = problem()
    optimizer = build(info, [weight, bias], optim_input.kwargs)
    _steps(optimizer, [weight, bias], 0, 2)
    older = copy.deepcopy(optimizer.state_dict())
    for group in older["param_groups"]:
        for flag in info.not_og_supported_flags:
            group.pop(flag, None)
    for state in older["state"].values():
        state["step"] = torch.tensor(float(state["step"]))  # torch.optim's tensor step
    other = build(info, [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())], optim_input.kwargs)
    other.load_state_dict(older)
    assert other.state_dict()["state"][0]["step"] == 2
    _steps(other, other.param_groups[0]["params"], 2, 1)


# --- test_deepcopy_copies_all_public_attrs, pickling, printing ----------------------------------

@pytest.mark.parametrize("info, optim_input", CASES)
def test_deepcopy_copies_all_public_attrs(info, optim_input):
    weight, bias, _ = problem()
    optimizer = build(info, [weight, bias], optim_input.kwargs)
    _steps(optimizer, [weight, bias], 0, 3)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    twin = copy.deepcopy(optimizer)
    assert public(optimizer) == public(twin)
    assert _plain(twin.state_dict()) == _plain(optimizer.state_dict())
    unpickled = pickle.loads(pickle.dumps(optimizer))
    assert _plain(unpickled.state_dict()) == _plain(optimizer.state_dict())
    assert repr(optimizer).startswith(info.optim_cls.__name__ + " (")  # test_optimizer_can_be_printed


# --- hooks: test_step_pre_hook, test_step_post_hook, test_step_all_hooks, state-dict hooks -----

@pytest.mark.parametrize("info", INFOS)
def test_step_hooks_local_and_global(info):
    weight, bias, _ = problem()
    optimizer = build(info, [weight, bias], {"lr": 0.01})
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
        optimizer.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        optimizer.register_step_post_hook(lambda o, a, k: calls.append("post")),
    ]
    try:
        _steps(optimizer, [weight, bias], 0, 1)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", "pre", "post", "global post"]
    _steps(optimizer, [weight, bias], 1, 1)
    assert len(calls) == 4


@pytest.mark.parametrize("info", INFOS)
def test_state_dict_and_load_state_dict_hooks(info):
    weight, bias, _ = problem()
    optimizer = build(info, [weight, bias], {"lr": 0.01})
    _steps(optimizer, [weight, bias], 0, 1)
    order = []

    def pre(opt):
        order.append("pre")

    def post(opt, sd):
        order.append("post")
        sd["extra"] = 1
        return sd

    optimizer.register_state_dict_pre_hook(pre)
    optimizer.register_state_dict_post_hook(post)
    sd = optimizer.state_dict()
    assert order == ["pre", "post"] and sd["extra"] == 1

    def load_pre(opt, sd):
        order.append("load pre")
        sd = dict(sd)
        sd.pop("extra")
        return sd

    optimizer.register_load_state_dict_pre_hook(load_pre)
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: order.append("prepended"), prepend=True)
    optimizer.register_load_state_dict_post_hook(lambda opt: order.append("load post"))
    optimizer.load_state_dict(sd)
    assert order[2:] == ["prepended", "load pre", "load post"]


# --- zero_grad, closures, torch.compile of the step --------------------------------------------

@pytest.mark.parametrize("info", INFOS)
def test_zero_grad_and_step_with_closure(info):
    weight, bias, x = problem()
    optimizer = build(info, [weight, bias], {"lr": 0.01})

    def closure():
        optimizer.zero_grad()
        assert torch.is_grad_enabled()  # torch.optim calls the closure with grad enabled
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and weight.grad is not None
    optimizer.zero_grad(set_to_none=False)
    assert weight.grad is not None and not weight.grad.any()
    optimizer.zero_grad()
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("info", INFOS)
def test_compiled_step_runs_eagerly(info):
    """``torch.compile(optimizer.step)``: the step is excluded from dynamo (a graph break), so
    it gives the eager numbers bit for bit."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        weight, bias, _ = problem()
        optimizer = build(info, [weight, bias], {"lr": 0.01})
        step = torch.compile(optimizer.step) if compiled else optimizer.step
        for k in range(2):
            gen = torch.Generator().manual_seed(k)
            for p in (weight, bias):
                p.grad = torch.randn(p.shape, generator=gen)
            step()
        results.append(torch.cat([weight.detach().reshape(-1), bias.detach()]))
    assert torch.equal(*results)


# --- test_tensor_lr ------------------------------------------------------------------------------

@pytest.mark.parametrize("info", INFOS)
def test_tensor_lr_matches_float_lr(info):
    results = []
    for lr in (0.01, torch.tensor(0.01)):
        weight, bias, _ = problem()
        optimizer = build(info, [weight, bias], {"lr": lr})
        _steps(optimizer, [weight, bias], 0, 3)
        results.append(torch.cat([weight.detach().reshape(-1), bias.detach()]))
    assert torch.equal(*results)
