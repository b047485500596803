"""``noise_version`` through the torch adapter (``specs/noise-v2.md`` §2): every member draws
the chosen noise format, its state dict and pickles keep it, and the core optimizer it
describes is the same run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from upgd_ref import rng
from upgd_ref.adapters import torch as ut


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


@pytest.mark.parametrize("member", [ut.AdaptiveUPGD, ut.UPGD, ut.UPGDW])
def test_every_member_draws_the_chosen_format(member):
    params = _params()
    opt = member(params, seed=11, noise_version=2, backend="numba")
    expected = opt.layout.unpack(rng.noise(opt.layout, 11, 1, version=2))
    for got, want in zip(opt.noise(), expected):
        assert got.numpy().tobytes() == want.tobytes()
    default = member(_params(), seed=11, backend="numba")
    assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(default.noise(), opt.noise()))


def test_steps_state_dict_and_pickles_keep_format_2():
    params = _params()
    opt = ut.AdaptiveUPGD(params, lr=0.01, sigma=0.1, seed=3, noise_version=2, backend="numba")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    core = opt.core
    assert core.noise_version == 2 and opt.core_format()["noise_version"] == 2
    saved = opt.state_dict()
    assert saved["upgd_ref"]["noise_version"] == 2
    fresh = ut.AdaptiveUPGD(_params(), lr=0.01, sigma=0.1, seed=3, backend="numba")
    fresh.load_state_dict(saved)
    for a, b in zip(fresh.noise(), opt.noise()):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    clone = pickle.loads(pickle.dumps(opt))
    for a, b in zip(clone.noise(), opt.noise()):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    format_1 = ut.AdaptiveUPGD(_params(), seed=3, backend="numba").state_dict()
    assert "noise_version" not in format_1["upgd_ref"]  # format-1 state dicts are unchanged
    fresh.load_state_dict(format_1)
    assert fresh.core.noise_version == 1


def test_a_bad_version_is_refused():
    with pytest.raises(ValueError, match="noise_version"):
        ut.AdaptiveUPGD(_params(), noise_version=3)
    opt = ut.AdaptiveUPGD(_params(), seed=1, noise_version=2)
    saved = opt.state_dict()
    saved["upgd_ref"] = dict(saved["upgd_ref"], noise_version="2")
    with pytest.raises(TypeError, match="noise_version"):
        opt.load_state_dict(saved)
    assert opt.core.noise_version == 2
