"""The core classes against the member table (``tests/helpers/members.py``): every member's
constructor inputs build and step to finite values with the family table's defaults, and
every error input raises the documented exception naming the key, for the constructor and
for a parameter group, on every NumPy backend."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.helpers.members import MEMBER_DB, error_inputs
from tests.helpers.snapshots import random_buffers
from upgd_ref import FlatLayout

SHAPES = [(3, 4), (5,), (0,), (2, 2)]

CASES = [(info, case) for info in MEMBER_DB for case in error_inputs(info)]


@pytest.mark.parametrize("info", MEMBER_DB, ids=lambda i: i.id)
def test_defaults_are_the_family_tables(info):
    opt = info.core(FlatLayout(SHAPES))
    expected = info.member.profile_defaults(info.profile)
    assert {k: opt.defaults[k] for k in info.member.keys} == {k: expected[k] for k in info.member.keys}
    assert opt.variant == info.member.variant(info.profile)


@pytest.mark.parametrize("info, inputs", [(i, x) for i in MEMBER_DB for x in i.inputs],
                         ids=lambda v: getattr(v, "id", None) or ",".join(v) or "defaults")
def test_inputs_build_and_step(backend, info, inputs):
    if backend not in info.backends:
        pytest.skip(f"{info.id} does not run on {backend}")
    layout = FlatLayout(SHAPES)
    opt = info.core(layout, backend=backend, seed=3, **inputs)
    params, grads = random_buffers(layout, 2)
    for _ in range(3):
        opt.step(params, grads)
    assert np.isfinite(params).all() and opt.state.step == 3


@pytest.mark.parametrize("info, case", CASES, ids=[f"{i.id}-{c.id}" for i, c in CASES])
def test_constructor_refuses_error_inputs(info, case):
    with pytest.raises(case.error, match=re.escape(case.key)):
        info.core(FlatLayout(SHAPES), **case.kwargs)


# Core parameter groups take the reference's keys (UPGDW's beta1/beta2, not the betas pair).
GROUP_CASES = [(info, case) for info, case in CASES if set(case.kwargs) <= set(info.member.keys)]


@pytest.mark.parametrize("info, case", GROUP_CASES, ids=[f"{i.id}-{c.id}" for i, c in GROUP_CASES])
def test_param_group_refuses_error_inputs(info, case):
    group = dict(case.kwargs, segments=[1])
    with pytest.raises(case.error, match=rf"param_groups\[0\].*{re.escape(case.key)}"):
        info.core(FlatLayout(SHAPES), param_groups=[group])
