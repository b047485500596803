"""float16 and bfloat16 torch parameters (``specs/precision.md``): the adapter's step is the
core door's step bit for bit, the state is float32, a save/load resumes bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.torch_tensors import make_params, seeded_grads, set_grads
from upgd_ref.adapters.torch import AdaptiveUPGD

SHAPES = [(4, 3), (5,), (2, 2, 2)]


def _bits(tensors):
    return [t.detach().view(torch.int16).numpy().tobytes() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_parameters_step_as_the_core_does(dtype):
    params = make_params(SHAPES, dtype=dtype)
    opt = AdaptiveUPGD(params, lr=0.05, seed=3, adaptive_noise=True, sigma=0.1)
    set_grads(params, seeded_grads(params, 0))
    opt.step()  # some state
    core = opt.core
    layout = core.layout
    flat = layout.pack([p.detach().float().numpy() for p in params])  # exact: 16-bit values
    assert flat.dtype == layout.dtype and layout.dtype.name == str(dtype).split(".")[1]
    for k in range(1, 4):
        grads = seeded_grads(params, k)
        set_grads(params, grads)
        opt.step()
        core.step(flat, layout.pack([g.float().numpy() for g in grads]))
        expected = [torch.from_numpy(a.astype(np.float32)).to(dtype) for a in layout.unpack(flat)]
        assert _bits(params) == _bits(expected)
        assert all(p.dtype == dtype for p in params)
    state = opt.state[params[0]]
    assert state["avg_utility"].dtype == torch.float32 and state["first_moment"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_save_and_load_resume_bit_exactly(dtype):
    params = make_params(SHAPES, dtype=dtype)
    opt = AdaptiveUPGD(params, lr=0.05, seed=3)
    for k in range(2):
        set_grads(params, seeded_grads(params, k))
        opt.step()
    saved = opt.state_dict()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = AdaptiveUPGD(twin, lr=0.05, seed=3)
    again.load_state_dict(saved)
    grads = seeded_grads(params, 7)
    set_grads(params, grads)
    set_grads(twin, grads)
    opt.step()
    again.step()
    assert _bits(params) == _bits(twin)


def test_a_bfloat16_model_trains():
    """A small regression in bfloat16 with the production defaults but lr: the loss falls as
    with float32 parameters (the step is float32 arithmetic rounded once)."""
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        model = torch.nn.Linear(8, 1).to(dtype)
        opt = AdaptiveUPGD(model.parameters(), lr=0.02, seed=1)
        losses = []
        for _ in range(150):
            opt.zero_grad()
            loss = ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.1 * losses[0], (dtype, losses[0], losses[-1])
        assert all(p.dtype == dtype for p in model.parameters())
