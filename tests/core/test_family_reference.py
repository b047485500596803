"""The UPGD family (specs/algorithm.md §7) in the reference step, against the members'
formulas written out independently (float64, 1e-12 relative)."""

from __future__ import annotations

import numpy as np
import pytest

from upgd_ref import reference as ref
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.tolerances import INDEPENDENT_RTOL

PAPER_ADAM = ref.UPGDVariant(moments="adam", protection="max", update_factor=2.0, noise_placement="terms")
PAPER_PLAIN = ref.UPGDVariant(moments="none", protection="max", update_factor=2.0, noise_placement="sum")
PLAIN = ref.UPGDVariant(moments="none")


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def member_step(variant, params, grads, normals, h, state, t):
    """One step of ``variant`` written from §7's table, per segment, state as plain lists."""
    u, m, v = state
    u = [h["beta_utility"] * a + (1 - h["beta_utility"]) * (-g * p) for a, g, p in zip(u, grads, params)]
    if variant.moments == "adam":
        m = [h["beta1"] * a + (1 - h["beta1"]) * g for a, g in zip(m, grads)]
        v = [h["beta2"] * a + (1 - h["beta2"]) * g**2 for a, g in zip(v, grads)]
    lo = min(a.min() for a in u)
    hi = max(a.max() for a in u)
    cu = 1 - h["beta_utility"] ** t
    out = []
    for p, g, a, mi, vi, xi in zip(params, grads, u, m, v, normals):
        noise = h["sigma"] * xi
        if variant.protection == "min_max":
            su = sigmoid(2 * (np.clip((a / cu - lo) / (hi - lo + 1e-8), 0, 1) - 0.5))
        else:
            su = sigmoid((a / cu) / hi)
        m_hat, v_hat = mi / (1 - h["beta1"] ** t), vi / (1 - h["beta2"] ** t)
        decay = p * (1 - h["lr"] * h["weight_decay"])
        if variant == PAPER_ADAM:
            out.append(decay - 2 * h["lr"] * (m_hat * (1 - su) / (np.sqrt(v_hat) + h["eps"]) + noise * (1 - su)))
        elif variant.moments == "none":
            out.append(decay - variant.update_factor * h["lr"] * (g + noise) * (1 - su))
        else:
            out.append(decay - h["lr"] * (m_hat / (np.sqrt(v_hat) + h["eps"]) + noise) * (1 - su))
    return out, (u, m, v)


@pytest.mark.parametrize("variant", [ref.PRODUCTION, PLAIN, PAPER_ADAM, PAPER_PLAIN], ids=str)
def test_family_members_match_their_formulas(variant):
    rng = np.random.default_rng(7)
    shapes = [(4, 3), (5,), (2, 2)]
    h = validate_upgd(dict(lr=0.05, weight_decay=0.01, sigma=0.02, beta_utility=0.9, eps=1e-5))
    params = [rng.standard_normal(s) for s in shapes]
    mine, theirs = list(params), list(params)
    state = ref.upgd_init(params, [1.0] * len(shapes))
    plain_state = tuple([np.zeros(s) for s in shapes] for _ in range(3))  # u, m, v
    for t in range(1, 31):
        # positive-utility regime for the paper's max protection (U_hi > 0): g and p of opposite sign
        grads = [-np.sign(p) * np.abs(rng.standard_normal(p.shape)) * 0.1 + 1e-3 for p in mine]
        normals = [rng.standard_normal(s) for s in shapes]
        mine, state, _ = ref.adaptive_upgd_step(mine, grads, state, normals, [h] * len(shapes), variant=variant)
        theirs, plain_state = member_step(variant, theirs, grads, normals, h, plain_state, t)
        for a, b in zip(mine, theirs):
            np.testing.assert_allclose(a, b, rtol=INDEPENDENT_RTOL, atol=0)
    if variant.moments == "none":
        assert all(not np.any(m) for m in state.first_moment + state.second_moment)


def test_max_protection_divides_by_a_non_positive_maximum_as_the_paper_does():
    """U_hi < 0 inverts the protection; U_hi = 0 gives 0 (u < 0) and NaN (u = 0)."""
    cu = 0.5
    u = np.array([-4.0, -1.0])
    su = ref.max_protection(u, cu, u.max())  # U_hi = -1
    assert su[0] > su[1]  # the least useful element is the most protected
    with np.errstate(all="ignore"):
        su0 = ref.max_protection(np.array([-1.0, 0.0]), cu, 0.0)
    assert su0[0] == 0.0 and np.isnan(su0[1])


@pytest.mark.parametrize("bad", [dict(moments="sgd"), dict(protection="min"), dict(update_factor=3.0),
                                 dict(noise_placement="inside"), dict(colour="red")])
def test_invalid_variants_are_rejected(bad):
    with pytest.raises((ValueError, TypeError)):
        ref.check_variant(bad)
