"""Any parameter layout in one torch optimizer (``specs/adapters-torch.md`` §2.1-2.4): mixed
dtypes (one flat buffer per dtype, one door step over all), views and other parameters whose
storage cannot be re-homed (gathered and scattered), complex parameters (their real pairs)
and ``model.to(...)`` after construction (re-homed, state converted)."""

from __future__ import annotations

import copy as copy_module
import io
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch
from torch.nn import Parameter

from tests.helpers.snapshots import snapshot
from tests.helpers.torch_tensors import make_params, seeded_grads, set_grads
from upgd_ref.adapters.torch import UPGD, AdaptiveUPGD, VarianceGradientScaler
from upgd_ref.checks import NonFiniteStepError
from upgd_ref.multi import MultiLayout, MultiUPGDState
from upgd_ref.reference import PRODUCTION
from upgd_ref.step import StepRequest, upgd_step

KWARGS = dict(lr=0.05, seed=3, adaptive_noise=True, sigma=0.1, weight_decay=0.01)


def _bits(tensors):
    return [torch.view_as_real(t.detach()) if t.is_complex() else t.detach() for t in tensors]


def _same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.contiguous().view(torch.uint8).equal(
        y.contiguous().view(torch.uint8)) for x, y in zip(_bits(a), _bits(b)))


def _record(opt):
    """The optimizer's state record, bit-exactly (its state-dict form: the per-part copies of
    a MultiUPGDState's per-segment records are not part of it)."""
    return snapshot(opt.flat_state.to_state(opt.layout))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as NumPy (bfloat16 through its bits, as the adapter's buffers)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _mixed_params():
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16, torch.float64]
    shapes = [(4, 3), (5,), (3, 2), (2,), (4,), (2, 2)]
    return [make_params([s], dtype=d, seed=k)[0] for k, (s, d) in enumerate(zip(shapes, dtypes))]


def _hyper(kwargs) -> dict:
    """The checked core hyper-parameters of ``kwargs`` (those a one-dtype twin's core takes)."""
    twin = AdaptiveUPGD([Parameter(torch.zeros(1))], **kwargs)
    return {k: v for k, v in twin.core_format()["param_groups"][0].items() if k != "segments"}


# --- mixed dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("noise_norm", ["segment", "global"])
def test_mixed_dtypes_step_as_the_door_over_any_grouping(noise_norm):
    """One optimizer over float32, float64, bfloat16 and float16 parameters (three flat
    buffers) equals the door stepping the same segments grouped one buffer per segment."""
    params = _mixed_params()
    opt = AdaptiveUPGD(params, noise_norm=noise_norm, **KWARGS)
    assert isinstance(opt.layout, MultiLayout) and len(opt.layout.parts) == 4
    names = [str(p.dtype).split(".")[1] for p in params]
    layout = MultiLayout([tuple(p.shape) for p in params], range(len(params)), names)  # another grouping
    flat = layout.pack([_numpy(p) for p in params])
    state = MultiUPGDState.zeros(layout, [1.0] * len(params))
    request = StepRequest(hyper=[_hyper(KWARGS)] * len(params), seed=3, noise_norm=noise_norm, variant=PRODUCTION)
    for k in range(4):
        grads = seeded_grads(params, k, absent=(3,) if k == 1 else (), spread=0.5)
        set_grads(params, grads)
        opt.step()
        present = [g is not None for g in grads]
        upgd_step(layout, flat, layout.pack([_numpy(g) if g is not None else np.zeros(p.shape, _numpy(p).dtype)
                                             for g, p in zip(grads, params)]),
                  state, StepRequest(**{**request.__dict__, "present": present}))
        assert _same_bits(params, [_tensor(a) for a in layout.unpack(flat)])
    assert all(p.dtype == d for p, d in zip(params, [torch.float32, torch.float64, torch.bfloat16, torch.float32,
                                                      torch.float16, torch.float64]))
    states = [opt.state[p]["first_moment"].dtype for p in params]
    assert states == [torch.float32, torch.float64, torch.float32, torch.float32, torch.float32, torch.float64]


def test_mixed_dtypes_resume_after_save_and_load_bit_exactly():
    params, twins = _mixed_params(), _mixed_params()
    opt = AdaptiveUPGD(params, **KWARGS)
    for k in range(2):
        set_grads(params, seeded_grads(params, k))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    with torch.no_grad():
        for t, p in zip(twins, params):
            t.copy_(p)
    resumed = AdaptiveUPGD(twins, **{**KWARGS, "seed": 99})
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for k in range(2, 5):
        for ps in (params, twins):
            set_grads(ps, seeded_grads(ps, k))
        opt.step()
        resumed.step()
        assert _same_bits(params, twins)
    assert _record(opt) == _record(resumed)


def test_add_param_group_with_another_dtype_continues_the_one_step():
    """A float64 group added after a step equals an optimizer that had it from the start
    without gradients until then."""
    first, second = make_params([(3, 2), (4,)], seed=1), make_params([(5,)], dtype=torch.float64, seed=2)
    twin_first, twin_second = make_params([(3, 2), (4,)], seed=1), make_params([(5,)], dtype=torch.float64, seed=2)
    opt = UPGD(first, lr=0.05, seed=4)
    twin = UPGD([{"params": twin_first}, {"params": twin_second, "lr": 0.2}], lr=0.05, seed=4)
    for ps, o in ((first, opt), (twin_first, twin)):
        set_grads(ps, seeded_grads(ps, 0))
        o.step()
    opt.add_param_group({"params": second, "lr": 0.2})
    for k in range(1, 3):
        for ps, o in ((first + second, opt), (twin_first + twin_second, twin)):
            set_grads(ps, seeded_grads(ps, k))
            o.step()
        assert _same_bits(first + second, twin_first + twin_second)
    with pytest.raises(ValueError, match="one dtype"):
        opt.core_format()


# --- views, non-contiguous, expanded and aliasing parameters ---------------------------------


VIEWS = {
    "row (storage offset)": lambda base: [Parameter(base[1])],
    "column (t[..., 0])": lambda base: [Parameter(base[..., 0])],
    "narrow": lambda base: [Parameter(base.narrow(1, 2, 3))],
    "split": lambda base: [Parameter(t) for t in base.split([1, 3], dim=0)],
    "transposed column block": lambda base: [Parameter(base.t()[1:4])],
    "views and a dense parameter": lambda base: [Parameter(base[::2, 1:]), Parameter(torch.randn(3, 2))],
}


def _dense_twins(params):
    return [Parameter(p.detach().clone()) for p in params]


@pytest.mark.parametrize("make", VIEWS.values(), ids=VIEWS.keys())
def test_views_are_gathered_and_written_back(make):
    """Each view parameter steps as a dense copy of itself would, and its new values reach
    the tensor it views (it is not re-homed: the aliasing is kept)."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    params = make(base)
    twins = _dense_twins(params)
    opt, twin = AdaptiveUPGD(params, **KWARGS), AdaptiveUPGD(twins, **KWARGS)
    for k in range(3):
        for ps, o in ((params, opt), (twins, twin)):
            set_grads(ps, seeded_grads(ps, k))
            o.step()
        assert _same_bits(params, twins)
    aliased = [p.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for p in params]
    assert aliased[0]
    views = make(base)  # fresh views of the same memory: the base holds the new values
    assert _same_bits([v for v, a in zip(views, aliased) if a], [t for t, a in zip(twins, aliased) if a])


def test_expanded_parameter_memory_takes_the_last_elements_values():
    base = torch.randn(6, generator=torch.Generator().manual_seed(6))
    param = Parameter(base.expand(3, 6))
    twin = Parameter(param.detach().clone())
    opt, reference = UPGD([param], **KWARGS), UPGD([twin], **KWARGS)
    for k in range(2):
        for p, o in ((param, opt), (twin, reference)):
            set_grads([p], seeded_grads([p], k))
            o.step()
        assert _same_bits([base], [twin.detach()[2]])  # row-major: the last row's update wins


def test_aliasing_parameters_later_segment_wins_on_the_overlap():
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    whole, rows = Parameter(base), Parameter(base[1:3])
    twins = _dense_twins([whole, rows])
    opt, reference = AdaptiveUPGD([whole, rows], **KWARGS), AdaptiveUPGD(twins, **KWARGS)
    for ps, o in (([whole, rows], opt), (twins, reference)):
        set_grads(ps, seeded_grads(ps, 0))
        o.step()
    expected = twins[0].detach().clone()
    expected[1:3] = twins[1].detach()
    assert _same_bits([base], [expected])


def test_a_refused_step_leaves_view_parameters_and_state_unchanged():
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    params = [Parameter(base[..., 0]), Parameter(base[1:3, 2:])]
    opt = AdaptiveUPGD(params, **KWARGS)
    set_grads(params, seeded_grads(params, 0))
    opt.step()
    grads = seeded_grads(params, 1)
    grads[1][0, 0] = float("nan")
    set_grads(params, grads)
    before = (_record(opt), snapshot(base.numpy().copy()))
    with pytest.raises(NonFiniteStepError):
        opt.step()
    assert (_record(opt), snapshot(base.numpy().copy())) == before


# --- complex parameters -----------------------------------------------------------------------


def _complex_params():
    gen = torch.Generator().manual_seed(9)
    return [Parameter(torch.randn(3, 2, dtype=torch.complex64, generator=gen)),
            Parameter(torch.randn(4, generator=gen)),
            Parameter(torch.randn(5, dtype=torch.complex128, generator=gen))]


def _real_twins(params):
    return [Parameter(torch.view_as_real(p.detach()).clone() if p.is_complex() else p.detach().clone())
            for p in params]


@pytest.mark.parametrize("member", [AdaptiveUPGD, UPGD])
def test_complex_parameters_step_as_their_real_pairs(member):
    """A complex model and its ``view_as_real`` twin (the written-out real-pair
    computation) give identical bits: parameters, state, noise, state dicts."""
    params = _complex_params()
    twins = _real_twins(params)
    opt, twin = member(params, **KWARGS), member(twins, **KWARGS)
    for k in range(3):
        grads = seeded_grads(params, k)
        set_grads(params, grads)
        set_grads(twins, [torch.view_as_real(g) if g.is_complex() else g for g in grads])
        opt.step()
        twin.step()
        assert _same_bits(params, twins)
    assert params[0].dtype == torch.complex64 and params[0].shape == (3, 2)
    for p, t in zip(params, twins):
        for key, value in opt.state[p].items():
            expected = twin.state[t][key]
            assert _same_bits([value], [expected]) if isinstance(value, torch.Tensor) else value == expected
        assert opt.state[p]["avg_utility"].dtype == p.dtype
    assert _same_bits(opt.noise(), twin.noise())
    resumed = member(_complex_params(), **{**KWARGS, "seed": 0})
    resumed.load_state_dict(opt.state_dict())
    assert _record(resumed) == _record(opt)


def test_complex_gradients_from_autograd_are_taken_as_real_pairs():
    param = Parameter(torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(10)))
    twin = Parameter(torch.view_as_real(param.detach()).clone())
    opt, reference = AdaptiveUPGD([param], **KWARGS), AdaptiveUPGD([twin], **KWARGS)
    for _ in range(2):
        opt.zero_grad()
        reference.zero_grad()
        (param.abs() ** 2).sum().backward()
        twin.grad = torch.view_as_real(param.grad).clone()
        opt.step()
        reference.step()
        assert _same_bits([param], [twin])


# --- model.to(...) after construction ---------------------------------------------------------


@pytest.mark.parametrize("before, after", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                           (torch.float32, torch.bfloat16)])
def test_model_converted_after_construction_resumes_from_the_converted_state(before, after):
    """Build, step, ``model.to(dtype)``, step: equal to an optimizer built over the converted
    model and loaded with the state dict of the first step (state converted as
    ``load_state_dict`` converts it: float32 -> float64 exact, float64 -> float32 rounded once)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(before)
    opt = AdaptiveUPGD(model.parameters(), **KWARGS)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    model(x.to(before)).square().mean().backward()
    opt.step()
    saved = opt.state_dict()
    model.to(after)
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(after)
    twin.load_state_dict(model.state_dict())
    reference = AdaptiveUPGD(twin.parameters(), **{**KWARGS, "seed": 0})
    reference.load_state_dict(saved)
    for m, o in ((model, opt), (twin, reference)):
        o.zero_grad()
        m(x.to(after)).square().mean().backward()
        o.step()
    assert _same_bits(list(model.parameters()), list(twin.parameters()))
    assert all(p.dtype == after for p in model.parameters())
    assert _record(opt) == _record(reference)


def test_scaler_statistics_of_complex_gradients_are_those_of_their_real_pairs():
    """The production loop (scale, step, statistics) with a complex model equals its real twin
    bit for bit: scaled gradients, parameters and the VGS statistics."""
    params = _complex_params()[:2]
    twins = _real_twins(params)
    runs = [(ps, AdaptiveUPGD(ps, **KWARGS), VarianceGradientScaler(ps, warmup_steps=1)) for ps in (params, twins)]
    for k in range(4):
        grads = seeded_grads(params, k, spread=1.0)
        for ps, opt, vgs in runs:
            set_grads(ps, grads if ps is params else [torch.view_as_real(g) if g.is_complex() else g for g in grads])
            vgs.scale_gradients()
            opt.step()
            vgs.step()
        assert _same_bits([p.grad for p in params], [t.grad for t in twins])
        assert _same_bits(params, twins)
    (_, _, vgs), (_, _, twin_vgs) = runs
    assert vgs.get_scaling_factor() != 1.0
    for key in ("param_grad_mean_ema", "param_grad_sq_ema"):
        assert _same_bits([vgs.state_dict()[key]], [twin_vgs.state_dict()[key]])


@pytest.mark.parametrize("duplicate", [copy_module.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))],
                         ids=["deepcopy", "pickle"])
def test_copies_keep_dtypes_complex_and_gathered_views(duplicate):
    """A copy of ``(params, optimizer)`` continues bit-identically, the view parameter still
    gathered (torch's copies of a view parameter do not keep its aliasing: whatever storage
    the copy has, the step writes back into it)."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(11))
    params = [Parameter(base[..., 1]), *_mixed_params()[:3], _complex_params()[0]]
    opt = AdaptiveUPGD(params, **KWARGS)
    set_grads(params, seeded_grads(params, 0))
    opt.step()
    params2, opt2 = duplicate((params, opt))
    assert opt2._partition.rehomed == opt._partition.rehomed == [False, True, True, True, True]
    for k in range(1, 3):
        for ps, o in ((params, opt), (params2, opt2)):
            set_grads(ps, seeded_grads(ps, k))
            o.step()
        assert _same_bits(params, params2)
    assert _same_bits([base[..., 1]], [params[0]]) and _record(opt) == _record(opt2)


def _scaled(g: torch.Tensor, factor: float) -> torch.Tensor:
    """The core's ``f g`` of one gradient: in its dtype, or for 16-bit in float32 rounded once
    (``specs/precision.md``)."""
    wide = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    return (g.to(wide) * torch.tensor(factor, dtype=wide)).to(g.dtype)


def _statistics(vgs):
    return snapshot(vgs.stats.grad_mean_avg.copy(), vgs.stats.grad_sq_avg.copy(), vgs.stats.step)


@pytest.mark.parametrize("nonfinite", ["zero", "raise", "skip"])
def test_scaler_over_several_dtypes_equals_one_scaler_per_parameter(nonfinite):
    """Statistics and scaling are per parameter: a scaler over float32, float64 and bfloat16
    parameters gives, parameter for parameter, the bits of one scaler per parameter (fed the
    same factor); a NaN gradient changes nothing under "raise" and "skip" and counts as 0
    under "zero"."""
    params = _mixed_params()[:3]
    vgs = VarianceGradientScaler(params, warmup_steps=1, nonfinite=nonfinite)
    singles = [VarianceGradientScaler([p], warmup_steps=1, nonfinite=nonfinite) for p in params]
    for k in range(4):
        grads = seeded_grads(params, k, spread=1.0)
        set_grads(params, grads)
        factor = vgs.scale_gradients()
        scaled = [p.grad.clone() for p in params]
        vgs.step()
        for p, g, single in zip(params, grads, singles):
            p.grad = _scaled(g, factor)
            single.step()
        assert _same_bits(scaled, [p.grad for p in params])
        assert list(vgs.stats.grad_mean_avg) == [s.stats.grad_mean_avg[0] for s in singles]
        assert list(vgs.stats.grad_sq_avg) == [s.stats.grad_sq_avg[0] for s in singles]
    assert factor != 1.0 and vgs.stats.step == 4
    grads = seeded_grads(params, 9)
    grads[2][0] = float("nan")
    set_grads(params, grads)
    before = _statistics(vgs)
    if nonfinite == "raise":
        with pytest.raises(NonFiniteStepError):
            vgs.step()
        assert _statistics(vgs) == before
    elif nonfinite == "skip":
        vgs.step()
        assert vgs.skipped_steps == 1 and _statistics(vgs) == before
    else:
        vgs.step()
        assert vgs.stats.step == 5 and np.isfinite(vgs.stats.grad_mean_avg).all()
