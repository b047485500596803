"""The optax transformations against the member table (``tests/helpers/members.py``): every
member's constructor inputs build and update under ``jit``, and every error input raises
the core's exception naming the key, in optax's spelling (``learning_rate``; UPGDW's
``b1``/``b2``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgd_ref.adapters import jax as uj

from tests.helpers.members import MEMBER_DB, Spelling, error_inputs, with_profile

FACTORIES = {"AdaptiveUPGD": uj.adaptive_upgd, "UPGD": uj.upgd, "UPGDW": uj.upgdw}
#: Options a factory does not take at all (optax has no ``amsgrad``): an unknown keyword.
NOT_TAKEN = {"UPGDW": {"amsgrad"}}

OPTAX = Spelling(
    build=lambda info, kwargs: FACTORIES[info.name](**with_profile(info, kwargs)),
    names={"*": {"lr": "learning_rate"}, "UPGDW": {"beta1": "b1", "beta2": "b2"}},
)

CASES = [(info, case) for info in MEMBER_DB for case in error_inputs(info)]


@pytest.mark.parametrize("info, inputs", [(i, x) for i in MEMBER_DB for x in i.inputs],
                         ids=lambda v: getattr(v, "id", None) or ",".join(v) or "defaults")
def test_inputs_build_and_update_under_jit(info, inputs):
    tx = OPTAX.construct(info, seed=3, **inputs)
    params = {"w": jnp.asarray(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)),
              "b": jnp.zeros(5, jnp.float32)}
    grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.01, params)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize("info, case", CASES, ids=[f"{i.id}-{c.id}" for i, c in CASES])
def test_factory_refuses_error_inputs(info, case):
    if set(case.kwargs) & NOT_TAKEN.get(info.name, set()):
        with pytest.raises(TypeError, match=re.escape(case.key)):
            OPTAX.construct(info, **case.kwargs)
        return
    with pytest.raises(case.error, match=OPTAX.names_key(info, case.key)):
        OPTAX.construct(info, **case.kwargs)
