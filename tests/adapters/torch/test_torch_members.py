"""The torch drop-in classes against the member table (``tests/helpers/members.py``): every
member's constructor inputs build and step, and every error input raises the documented
exception naming the key (the production classes' names: UPGDW's ``betas`` pair)."""

from __future__ import annotations

import pytest
import torch

from upgd_ref.adapters import torch as upgd_torch

from tests.helpers.members import MEMBER_DB, Spelling, error_inputs, paired, with_profile

CLASSES = {"AdaptiveUPGD": upgd_torch.AdaptiveUPGD, "UPGD": upgd_torch.UPGD, "UPGDW": upgd_torch.UPGDW}


def _parameters():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.zeros(5))]


TORCH = Spelling(
    build=lambda info, kwargs: CLASSES[info.name](_parameters(), **with_profile(info, paired(info, kwargs))),
    # the production classes' message texts (specs/adapters-torch.md)
    message_names={"*": {"lr": "learning rate"},
                   "UPGDW": {"beta1": "beta parameter at index 0", "beta2": "beta parameter at index 1"}},
)

#: A deliberate difference (specs/adapters-torch.md): the production classes read the noise
#: flags by truth value, so the ints 0 and 1 are flags here (the core refuses them).
def _production_flag(case) -> bool:
    (key, value), = case.kwargs.items()
    return key in ("adaptive_noise", "instant_noise_scale") and type(value) is int and value in (0, 1)


CASES = [(info, case) for info in MEMBER_DB for case in error_inputs(info)]


@pytest.mark.parametrize("info, inputs", [(i, x) for i in MEMBER_DB for x in i.inputs],
                         ids=lambda v: getattr(v, "id", None) or ",".join(v) or "defaults")
def test_inputs_build_and_step(info, inputs):
    opt = TORCH.construct(info, seed=3, **inputs)
    data = torch.Generator().manual_seed(1)
    for _ in range(2):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=data)
        opt.step()
    assert all(torch.isfinite(p).all() for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("info, case", CASES, ids=[f"{i.id}-{c.id}" for i, c in CASES])
def test_constructor_refuses_error_inputs(info, case):
    if _production_flag(case):
        (key, value), = case.kwargs.items()
        assert TORCH.construct(info, **case.kwargs).defaults[key] == value
        return
    with pytest.raises(case.error, match=TORCH.names_key(info, case.key)):
        TORCH.construct(info, **case.kwargs)


@pytest.mark.parametrize("info", MEMBER_DB, ids=lambda i: i.id)
def test_core_format_names_its_member_and_loads_only_into_it(info):
    opt = TORCH.construct(info, seed=3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.core_format()
    assert (saved["member"], saved["profile"]) == (info.name, info.profile)
    info.core(opt.layout).load_state_dict(saved)  # its own member and profile: loads
    for other in MEMBER_DB:
        if (other.name, other.profile) != (info.name, info.profile):
            with pytest.raises(ValueError, match="checkpoint of"):
                other.core(opt.layout).load_state_dict(saved)
