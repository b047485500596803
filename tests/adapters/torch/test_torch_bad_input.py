"""Bad input to the PyTorch adapter: clear errors, and parameters, gradients and state left
bit-identical."""

from __future__ import annotations

import pytest
import torch

from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler


def make_params(dtype=torch.float32, seed=0, shapes=((4, 3), (5,), (2, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def fill_grads(params, step=0):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def everything(opt=None, vgs=None, params=()):
    """Bit-exact picture of what a failed call must not change."""
    out = [(p.data_ptr(), p.detach().numpy().tobytes(),
            None if p.grad is None else (id(p.grad), p.grad.to_dense().numpy().tobytes())) for p in params]
    if opt is not None:
        s = opt.core.state
        out.append((s.step, s.segment_step.tobytes(), s.grad_norm_ema.tobytes(), s.utility.tobytes(),
                    s.first_moment.tobytes(), s.second_moment.tobytes()))
    if vgs is not None:
        out.append((vgs._step_count, vgs.core.state.grad_mean_avg.tobytes(), vgs.core.state.grad_sq_avg.tobytes()))
    return out


@pytest.fixture
def trained():
    params = make_params()
    opt = AdaptiveUPGD(params, lr=1e-2, seed=3)
    vgs = VarianceGradientScaler(params, warmup_steps=0)
    for k in range(2):
        fill_grads(params, k)
        vgs.scale_gradients()
        opt.step()
        vgs.step()
    fill_grads(params, 5)
    return params, opt, vgs


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients(trained, value):
    params, opt, vgs = trained
    params[1].grad[2] = value
    before = everything(opt, vgs, params)
    with pytest.raises(ValueError, match=r"segment 1 \(param_groups\[0\]\['params'\]\[1\] of shape \(5,\)\)"):
        opt.step()
    assert everything(opt, vgs, params) == before
    strict = VarianceGradientScaler(params, warmup_steps=0, nonfinite="raise")  # the default is production's
    strict.load_state_dict(vgs.state_dict())                                    # (tests/adapters/torch)
    before = everything(opt, strict, params)
    with pytest.raises(ValueError, match=r"segment 1 \(parameters\[1\] of shape \(5,\)\) holds a non-finite"):
        strict.scale_gradients()
    with pytest.raises(ValueError, match="non-finite"):
        strict.step()
    assert everything(opt, strict, params) == before


def test_non_finite_parameters(trained):
    params, opt, vgs = trained
    with torch.no_grad():
        params[2][0, 0] = float("nan")
    before = everything(opt, vgs, params)
    with pytest.raises(ValueError, match="params: segment 2"):
        opt.step()
    assert everything(opt, vgs, params) == before


def test_sparse_gradients(trained):
    params, opt, vgs = trained
    params[0].grad = torch.zeros(4, 3).to_sparse()
    before = everything(opt, vgs, params)
    with pytest.raises(TypeError, match=r"sparse gradients"):
        opt.step()
    with pytest.raises(TypeError, match=r"sparse gradients"):
        vgs.scale_gradients()
    with pytest.raises(TypeError, match=r"sparse gradients"):
        vgs.step()
    assert everything(opt, vgs, params) == before


@pytest.mark.parametrize("make, error, message", [
    (lambda: [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))], TypeError, "complex32"),
    (lambda: [torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn))], TypeError, "float8_e4m3fn"),
    (lambda: [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))],
     ValueError, "several devices"),
    (lambda: [torch.nn.Parameter(torch.zeros(3, device="meta"))], ValueError, "CPU"),
    (lambda: [torch.nn.Parameter(torch.zeros(3, 3).to_sparse())], TypeError, "dense"),
    (lambda: [torch.nn.parameter.UninitializedParameter()], ValueError, "lazy"),
])
def test_unsupported_parameters(make, error, message):
    with pytest.raises(error, match=message):
        AdaptiveUPGD(make())
    with pytest.raises(error, match=message):
        VarianceGradientScaler(make())


def test_several_devices_across_groups_leave_parameters_in_place():
    cpu = make_params()
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    before = everything(params=cpu)
    with pytest.raises(ValueError, match="several devices"):
        AdaptiveUPGD([{"params": cpu}, {"params": [meta]}])
    assert everything(params=cpu) == before


def test_model_reshaped_after_construction(trained):
    params, opt, vgs = trained
    params[0].data = params[0].data.reshape(-1)[:1].clone()
    params[0].grad = None
    before = everything(opt, params=params[1:])
    with pytest.raises(ValueError, match="changed to shape"):
        opt.step()
    assert everything(opt, params=params[1:]) == before


def test_invalid_hyperparameter_edits_raise_at_the_step(trained):
    params, opt, vgs = trained
    before = everything(opt, vgs, params)
    for key, value, error, message in (("lr", -1.0, ValueError, "lr must be >= 0"),
                                       ("beta1", 1.0, ValueError, "beta1 must be in"),
                                       ("sigma", "x", TypeError, "sigma must be a real number"),
                                       ("lr", torch.ones(2), ValueError, "must be a scalar")):
        saved = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(error, match=message):
            opt.step()
        opt.param_groups[0][key] = saved
        assert everything(opt, vgs, params) == before
    del opt.param_groups[0]["eps"]
    with pytest.raises(ValueError, match="lacks"):
        opt.step()
    assert everything(opt, vgs, params) == before
