"""The UPGD family in the JAX adapter (specs/adapters-jax.md §"The UPGD family"):
``adaptive_upgd(profile=...)``, ``upgd`` and ``upgdw`` equal the core API classes
(:class:`upgd_ref.AdaptiveUPGD`, :class:`upgd_ref.UPGD`, :class:`upgd_ref.UPGDW`) on the same
inputs, under ``jax.jit``, for 12 steps, within the float64 tolerance contract; the kernel
path too."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import upgd_ref
from upgd_ref.adapters import jax as uj
from upgd_ref.reference import UPGDVariant
from upgd_ref.tolerances import INDEPENDENT_RTOL

SHAPES = [(5, 4), (4,), (0, 3), (3, 2, 2)]
STEPS = 12
RTOL = INDEPENDENT_RTOL  # float64 transcriptions of one expression order (specs/tolerances.md §3)

NOISE_MODES = {
    "fixed": dict(sigma=0.05),
    "adaptive": dict(sigma=0.1, adaptive_noise=True, instant_noise_scale=False, noise_ema_init=0.0),
}

# member -> (adapter factory, core factory, expected variant)
MEMBERS = {
    "adaptive-production": (
        lambda **kw: uj.adaptive_upgd(0.01, weight_decay=0.01, beta_utility=0.9, **kw),
        lambda layout, **kw: upgd_ref.AdaptiveUPGD(layout, lr=0.01, weight_decay=0.01, beta_utility=0.9, **kw),
        UPGDVariant(moments="adam"),
    ),
    "adaptive-paper": (
        lambda **kw: uj.adaptive_upgd(0.01, weight_decay=0.01, beta_utility=0.9, profile="paper", **kw),
        lambda layout, **kw: upgd_ref.AdaptiveUPGD(layout, lr=0.01, weight_decay=0.01, beta_utility=0.9,
                                                   profile="paper", **kw),
        UPGDVariant(moments="adam", protection="max", update_factor=2.0, noise_placement="terms"),
    ),
    "upgd-production": (
        lambda **kw: uj.upgd(0.01, weight_decay=0.01, beta_utility=0.9, **kw),
        lambda layout, **kw: upgd_ref.UPGD(layout, lr=0.01, weight_decay=0.01, beta_utility=0.9, **kw),
        UPGDVariant(moments="none"),
    ),
    "upgd-paper": (
        lambda **kw: uj.upgd(0.01, weight_decay=0.01, beta_utility=0.9, profile="paper", **kw),
        lambda layout, **kw: upgd_ref.UPGD(layout, lr=0.01, weight_decay=0.01, beta_utility=0.9, profile="paper",
                                           **kw),
        UPGDVariant(moments="none", protection="max", update_factor=2.0, noise_placement="sum"),
    ),
    "upgdw": (
        lambda **kw: uj.upgdw(0.01, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.02, **kw),
        lambda layout, **kw: upgd_ref.UPGDW(layout, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, **kw),
        UPGDVariant(moments="adam"),
    ),
}


def _inputs(seed=0):
    """Params and a gradient stream (float64) with positive utilities present (U_hi > 0)."""
    r = np.random.default_rng(seed)
    params = [r.standard_normal(s) for s in SHAPES]
    grads = [[r.standard_normal(s) * 10 ** r.uniform(-1, 0.5) + 0.2 for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _core_run(make_core, params, grads, **kw):
    layout = upgd_ref.FlatLayout(SHAPES, dtype="float64")
    opt = make_core(layout, seed=5, **kw)
    flat = layout.pack(params)
    out = []
    for k, g in enumerate(grads):
        info = opt.step(flat, layout.pack(g))
        assert info.utility_max > 0  # the paper profile's well-defined regime (specs/algorithm.md §7.3)
        out.append(([np.array(v) for v in layout.unpack(flat)], copy.deepcopy(opt.state)))
    return opt, out


def _adapter_run(tx, params, grads, *, jit=True):
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step)
    with jax.enable_x64(True):
        p = [jnp.asarray(a) for a in params]
        state = tx.init(p)
        out = []
        for g in grads:
            p, state = step(p, state, [jnp.asarray(a) for a in g])
            out.append(([np.asarray(v) for v in p], state))
    return out


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _compare(adapter, core, layout_shapes=SHAPES):
    layout = upgd_ref.FlatLayout(layout_shapes, dtype="float64")
    for k, ((p_a, s_a), (p_c, s_c)) in enumerate(zip(adapter, core), start=1):
        values = uj.state_values(s_a)
        assert int(values.count) == s_c.step == k
        np.testing.assert_array_equal(values.segment_step, s_c.segment_step)
        for i in range(len(layout_shapes)):
            _close(p_a[i], p_c[i], f"params leaf {i} at step {k}")
        for name in ("utility", "first_moment", "second_moment"):
            leaves = jax.tree_util.tree_leaves(getattr(s_a, name))
            for i, want in enumerate(layout.unpack(getattr(s_c, name))):
                _close(leaves[i], want, f"{name} leaf {i} at step {k}")
        _close(values.grad_norm_ema, s_c.grad_norm_ema, f"grad_norm_ema at step {k}")


@pytest.mark.parametrize("noise_mode", sorted(NOISE_MODES))
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_native_path_equals_the_core_class_under_jit(member, noise_mode):
    make_tx, make_core, variant = MEMBERS[member]
    kw = NOISE_MODES[noise_mode]
    params, grads = _inputs()
    opt, core = _core_run(make_core, params, grads, **kw)
    assert opt.variant == variant
    adapter = _adapter_run(make_tx(seed=5, **kw), params, grads)
    _compare(adapter, core)
    if variant.moments == "none":  # no moments: they stay zero in both
        assert not np.any(core[-1][1].first_moment) and not np.any(core[-1][1].second_moment)


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_kernel_path_equals_the_core_class(member):
    make_tx, make_core, _ = MEMBERS[member]
    params, grads = _inputs(seed=3)
    grads = grads[:4]
    _, core = _core_run(make_core, params, grads, sigma=0.05)
    adapter = _adapter_run(make_tx(seed=5, sigma=0.05, backend="kernels"), params, grads, jit=False)
    _compare(adapter, core)


def test_members_differ_from_each_other():
    """The variant really reaches the step: each member's trajectory is its own."""
    params, grads = _inputs()
    finals = {m: _adapter_run(MEMBERS[m][0](seed=5, sigma=0.05), params, grads[:3])[-1][0] for m in MEMBERS}
    names = sorted(finals)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not np.array_equal(finals[names[a]][0], finals[names[b]][0]), (names[a], names[b])


def test_upgdw_ties_the_utility_decay_to_b2():
    params, grads = _inputs()
    tied = _adapter_run(uj.upgdw(0.01, b2=0.95, seed=1), params, grads[:3])
    explicit = _adapter_run(uj.adaptive_upgd(0.01, weight_decay=0.01, beta_utility=0.95, beta2=0.95, seed=1),
                            params, grads[:3])
    for (p_a, _), (p_b, _) in zip(tied, explicit):
        for a, b in zip(p_a, p_b):
            np.testing.assert_array_equal(a, b)


def test_defaults_and_paper_eps():
    params, grads = _inputs()
    layout = upgd_ref.FlatLayout(SHAPES, dtype="float64")
    for tx, core in [(uj.upgd(), upgd_ref.UPGD(layout)), (uj.upgdw(), upgd_ref.UPGDW(layout)),
                     (uj.adaptive_upgd(profile="paper"), upgd_ref.AdaptiveUPGD(layout, profile="paper"))]:
        got = _adapter_run(tx, params, grads[:2])
        flat = layout.pack(params)
        for g in grads[:2]:
            core.step(flat, layout.pack(g))
        for a, b in zip(got[-1][0], layout.unpack(flat)):
            _close(a, b, type(core).__name__)


@pytest.mark.parametrize("factory", [uj.upgd, uj.adaptive_upgd])
def test_unknown_profile_is_rejected(factory):
    with pytest.raises(ValueError, match="profile"):
        factory(profile="papers")


def test_upgdw_rejects_invalid_betas():
    """The bad value is blamed by its own name: ``b2`` is ``beta2``, not the ``beta_utility``
    it is tied to (checked before the tie)."""
    with pytest.raises(ValueError, match=r"^beta2 must be in \[0, 1\), got 1.0$"):
        uj.upgdw(b2=1.0)
    with pytest.raises(ValueError, match=r"^beta1 must be in \[0, 1\), got -0.5$"):
        uj.upgdw(b1=-0.5)
