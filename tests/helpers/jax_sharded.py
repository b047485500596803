"""The JAX native path on 8 host devices, run as ``python -m tests.helpers.jax_sharded OUT``
in a fresh process (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set
before JAX starts, and the pytest process has started it): every family member (VGS on for
some, off for the others), adaptive noise on, 10 steps under ``jax.jit`` on one tree placed
with several ``NamedSharding``s, and the same steps written per device with ``shard_map``
(:class:`upgd_ref.adapters.jax.PerDevice`). Saves every run's final parameters and state
leaves to the ``.npz`` ``OUT`` (keys ``<config>/<placement>/<leaf path>``) for the test.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from upgd_ref.adapters import jax as uj

STEPS = 10
NOISY = dict(sigma=0.05, adaptive_noise=True, noise_ema_init=0.0)
MEMBERS = {
    "adaptive_upgd": lambda **kw: uj.adaptive_upgd(1e-2, **NOISY, seed=7, **kw),
    "adaptive_upgd_paper": lambda **kw: uj.adaptive_upgd(1e-2, **NOISY, seed=7, profile="paper", **kw),
    "upgd": lambda **kw: uj.upgd(1e-2, **NOISY, seed=7, **kw),
    "upgd_paper": lambda **kw: uj.upgd(1e-2, **NOISY, seed=7, profile="paper", **kw),
    "upgdw": lambda **kw: uj.upgdw(1e-2, **NOISY, seed=7, noise_norm="global", **kw),
}
SHAPES = {"w": (64, 48), "b": (48,), "k": (8, 16, 24)}


def specs(mesh_axes: tuple[str, ...]) -> dict[str, dict[str, P]]:
    """Placements of the tree: name -> per-leaf PartitionSpec over the 8 devices."""
    one = mesh_axes[0] if len(mesh_axes) == 1 else None
    if one is not None:
        return {
            "replicated": {"w": P(), "b": P(), "k": P()},
            "dim0": {"w": P(one), "b": P(one), "k": P(one)},
            "dim1": {"w": P(None, one), "b": P(), "k": P(None, one)},
        }
    a, b = mesh_axes
    return {"mesh2d": {"w": P(a, b), "b": P(b), "k": P(b, None, a)}}


def _tree(seed: int):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for k, s in SHAPES.items()}


def _grads(step: int):
    return _tree(1000 + step)


def _tx(member: str, vgs: bool, per_device=None):
    tx = MEMBERS[member](per_device=per_device)
    return optax.chain(uj.variance_gradient_scaler(warmup_steps=2, per_device=per_device), tx) if vgs else tx


def run_jit(member: str, vgs: bool, shardings=None):
    """``STEPS`` jitted steps from the same start; ``shardings``: leaf name -> NamedSharding
    of params and grads (None: unsharded, one device)."""
    tx = _tx(member, vgs)
    place = (lambda t: t) if shardings is None else (lambda t: {k: jax.device_put(v, shardings[k])
                                                                  for k, v in t.items()})
    params = place(_tree(0))
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(STEPS):
        params, state = step(params, state, place(_grads(t)))
    return params, state


def run_shard_map(member: str, vgs: bool, mesh, leaf_specs):
    """The same steps written per device: ``shard_map`` over ``mesh`` with ``leaf_specs``,
    the transformations told them (:class:`upgd_ref.adapters.jax.PerDevice`)."""
    per_device = uj.PerDevice(mesh, leaf_specs)
    tx = _tx(member, vgs, per_device)
    params = _tree(0)
    state = tx.init(params)
    state_specs = uj.state_specs(state, per_device)

    def local_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(leaf_specs, state_specs, leaf_specs),
                                 out_specs=(leaf_specs, state_specs)))
    for t in range(STEPS):
        params, state = step(params, state, _grads(t))
    return params, state


#: (member, VGS on, placements): every member, VGS on and off, each placement under jit and
#: per device (shard_map) taken by two members (a bound on the compilations: ~15 in all).
CONFIGS = (("adaptive_upgd", True, ("jit-dim0", "shard_map-mesh2d")),
           ("adaptive_upgd_paper", False, ("jit-dim1", "shard_map-dim0")),
           ("upgd", True, ("jit-mesh2d", "jit-replicated")),
           ("upgd_paper", False, ("shard_map-mesh2d", "jit-dim1")),
           ("upgdw", True, ("jit-replicated", "shard_map-dim0", "jit-dim0")))


def _save(out: dict, key: str, params, state) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path({"params": params, "state": state})[0]:
        out[f"{key}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)


def main(path: str) -> None:
    devices = np.array(jax.devices())
    if devices.size != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got {devices.size}")
    meshes = [Mesh(devices, ("x",)), Mesh(devices.reshape(2, 4), ("a", "b"))]
    out = {}
    for member, vgs, placements in CONFIGS:
        config = f"{member}-vgs{int(vgs)}"
        _save(out, f"{config}/unsharded", *run_jit(member, vgs))
        for mesh in meshes:
            for name, leaf_specs in specs(mesh.axis_names).items():
                if f"jit-{name}" in placements:
                    shardings = {k: NamedSharding(mesh, s) for k, s in leaf_specs.items()}
                    _save(out, f"{config}/jit-{name}", *run_jit(member, vgs, shardings))
                if f"shard_map-{name}" in placements:
                    _save(out, f"{config}/shard_map-{name}", *run_shard_map(member, vgs, mesh, leaf_specs))
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
