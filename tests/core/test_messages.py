"""Errors name the value the user gave (issue 14's list): UPGDW's ``betas`` blame ``beta1`` /
``beta2``, never the ``beta_utility`` that ``beta2`` is copied into, on every path a value
can come in by; nothing is constructed or changed."""

from __future__ import annotations

import numpy as np
import pytest

from upgd_ref import UPGDW, FlatLayout
from upgd_ref.config import ConfigError, load_config

from tests.helpers.snapshots import assert_unchanged, random_buffers, snapshot

LAYOUT = FlatLayout([(3,), (2, 2)], dtype="float64")


@pytest.mark.parametrize("betas, name, value", [((0.9, 1.0), "beta2", 1.0), ((1.0, 0.9), "beta1", 1.0),
                                                ((0.9, -0.1), "beta2", -0.1), ((0.9, float("nan")), "beta2", "nan")])
def test_upgdw_betas_blame_the_right_key(betas, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be (in \[0, 1\)|finite), got {value}$"):
        UPGDW(LAYOUT, betas=betas)
    with pytest.raises(ValueError, match=rf"^param_groups\[0\]: {name} must be (in \[0, 1\)|finite), got {value}$"):
        UPGDW(LAYOUT, param_groups=[{"segments": [0], "beta1": betas[0], "beta2": betas[1]}])
    with pytest.raises(ConfigError, match=rf"betas\[{int(name[-1]) - 1}\] must be"):
        load_config({"optimizer": "UPGDW", "optimizer_kwargs": {"betas": list(betas)}})


def test_upgdw_beta2_edited_in_a_group_is_blamed_at_the_step(backend):
    opt = UPGDW(LAYOUT, backend=backend)
    params, grads = random_buffers(LAYOUT, 1)
    opt.param_groups[0]["beta2"] = 1.0
    before = snapshot(opt, params, grads)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: beta2 must be in \[0, 1\), got 1.0$"):
        opt.step(params, grads)
    assert_unchanged(before, snapshot(opt, params, grads))
    assert np.isfinite(params).all()
