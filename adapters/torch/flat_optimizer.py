"""The ``torch.optim.Optimizer`` every family member's adapter is: parameters re-homed into
one flat buffer, the step run by the member's core class, production ``state`` views,
state dicts and pickling."""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy

import torch

import upgd_ref
from upgd_ref.backends import check_backend_name
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.layout import FlatLayout

from .buffers import Bucket, check_tensors, on_stream, segment_views
from .checkpoint import (core_state_dict, fill_adaptive_noise_defaults, production_state_dict, read_state_dict,
                         segment_snapshot)
from .conversions import DTYPE_NAMES, describe_shape, hyper_value, named_errors
from .state_views import StateSource, StateView


def _draw_seed() -> int:
    """A seed from torch's global generator, so ``torch.manual_seed`` fixes it."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class FlatBufferOptimizer(torch.optim.Optimizer):
    """What every member's adapter shares: flat buffers, ``state`` views, state dicts, pickling.

    A member says which core class does the math (``_CORE``), its param-group keys
    (``_HYPER_KEYS``), its per-parameter state keys (``_STATE_KEYS``, ``grad_norm_ema`` last),
    its profile when unpickled without one (``_DEFAULT_PROFILE``; None: the core class takes
    no ``profile``) and how a param group maps to the core's hyper-parameters
    (:meth:`_core_hyper`); its constructor checks the arguments and calls :meth:`_setup`.
    """

    _CORE: type
    _HYPER_KEYS: tuple[str, ...]
    _STATE_KEYS: tuple[str, ...]
    _DEFAULT_PROFILE: str | None

    @classmethod
    def _core_hyper(cls, where: str, group) -> dict:
        """The core hyper-parameters of one param group (``where`` names it in errors)."""
        return {k: hyper_value(f"{where}['{k}']", k, group[k]) for k in cls._HYPER_KEYS}

    def _setup(self, params, defaults, *, seed, backend, noise_ema_init, noise_norm, profile) -> None:
        """The constructor's common tail: the core's checks (types, finiteness) on the
        hyper-parameters, param groups, core optimizer, flat buffer."""
        validate_upgd(self._core_hyper("defaults", defaults) | {"noise_ema_init": noise_ema_init})
        check_backend_name(backend)
        self._built = False
        self._profile = profile
        super().__init__(params, defaults)
        self._backend = backend
        self._noise_norm = noise_norm
        self._noise_ema_init = noise_ema_init
        self._seed = _draw_seed() if seed is None else seed
        self._core = None
        self._bucket = None
        self._extras: dict[int, tuple] = {}
        self.last_step_info = None
        self._rebuild()
        self.state = StateView(self._state_source)
        self._built = True

    def _new_core(self, layout, core_groups, *, seed, noise_norm, noise_ema_init):
        """A fresh core optimizer of this member (``profile`` only where the core has one)."""
        extra = {} if self._profile is None else {"profile": self._profile}
        return self._CORE(layout, seed=seed, noise_norm=noise_norm, noise_ema_init=noise_ema_init,
                          backend=self._backend, param_groups=core_groups, **extra)

    def _state_source(self) -> StateSource:
        """What ``self.state``'s views read (current core, bucket and param groups)."""
        return StateSource(self._core.state, self._core.layout, self._bucket, self.param_groups, self._STATE_KEYS,
                           self._extras, self._noise_ema_init)

    @property
    def profile(self):
        """``"production"`` or ``"paper"`` (None for a member without profiles)."""
        return self._profile

    # --- structure ----------------------------------------------------------------------

    def _flat_params(self):
        params, names = [], []
        for g, group in enumerate(self.param_groups):
            group_names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                params.append(p)
                label = f"param_groups[{g}]['params'][{j}]"
                if group_names is not None and j < len(group_names):
                    label += f" ({group_names[j]!r})"
                names.append(f"{label} {describe_shape(p)}")
        return params, names

    def _core_groups(self, param_groups, noise_ema_init) -> list[dict]:
        """The core's parameter groups, hyper-parameters read from ``param_groups`` now."""
        groups, start = [], 0
        for g, group in enumerate(param_groups):
            count = len(group["params"])
            missing = [k for k in self._HYPER_KEYS if k not in group]
            if missing:
                raise ValueError(f"param_groups[{g}] lacks hyper-parameter(s) {missing}")
            hyper = self._core_hyper(f"param_groups[{g}]", group)
            groups.append({"segments": list(range(start, start + count)), **hyper, "noise_ema_init": noise_ema_init})
            start += count
        return groups

    def _rebuild(self, restore: dict | None = None, *, unpickled: bool = False) -> None:
        """(Re)build the flat layout, core optimizer and bucket for the current param groups.

        State carries over by parameter identity (or comes from ``restore``, a core state
        dict for exactly these parameters). Everything that can fail runs before the
        parameters are re-homed. ``unpickled``: the parameters come from unpickling this
        class, so they are views of the one storage their pickled flat buffer became.
        """
        params, names = self._flat_params()
        dtype = check_tensors(params, names, what=type(self).__name__, rehome=not unpickled)
        group_ids = [g for g, group in enumerate(self.param_groups) for _ in group["params"]]
        layout = FlatLayout([tuple(p.shape) for p in params], DTYPE_NAMES[dtype], groups=group_ids)
        core_groups = self._core_groups(self.param_groups, self._noise_ema_init)
        core = self._new_core(layout, core_groups, seed=self._seed, noise_norm=self._noise_norm,
                              noise_ema_init=self._noise_ema_init)
        if restore is not None:
            core.load_state_dict(restore)
        elif self._core is not None:
            old = self._bucket.segment_by_id
            segments = [segment_snapshot(self._core.state, self._core.layout, old[id(p)]) if id(p) in old else None
                        for p in params]
            core.load_state_dict(core_state_dict(
                layout, core_groups, step=self._core.step_count, seed=self._seed, noise_norm=self._noise_norm,
                noise_ema_init=self._noise_ema_init, segments=segments, variant=dict(core.variant._asdict())))
        bucket = Bucket(params, layout, names)
        bucket.home()
        self._core, self._bucket = core, bucket
        self._extras = {k: v for k, v in self._extras.items() if k in bucket.segment_by_id}

    def _sync_structure(self) -> None:
        """Rebuild if ``param_groups`` now hold other tensors; re-home replaced ``.data``."""
        bucket = self._bucket
        params = [p for group in self.param_groups for p in group["params"]]
        if len(params) != len(bucket.params) or any(a is not b for a, b in zip(params, bucket.params)):
            self._rebuild()
        else:
            bucket.ensure_homed()

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the flat buffer is rebuilt, state kept."""
        if not getattr(self, "_built", False):
            super().add_param_group(param_group)
            return
        count = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            self._rebuild()
        except BaseException:
            del self.param_groups[count:]
            raise

    # --- public extras ------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The noise seed (drawn from torch's global generator when not given)."""
        return self._core.seed

    @property
    def layout(self) -> FlatLayout:
        """The core layout: one segment per parameter, in ``param_groups`` order."""
        return self._core.layout

    @property
    def core(self) -> upgd_ref.AdaptiveUPGD:
        """The core optimizer doing the math (its ``step_count`` is the noise counter);
        an instance of the member's core class (``upgd_ref.UPGD``, ...)."""
        return self._core

    def noise(self, step: int | None = None) -> list[torch.Tensor]:
        """Step ``step``'s standard normals (default: the next step's), one tensor per parameter."""
        return segment_views(torch.from_numpy(self._core.noise(step)).to(self._bucket.device), self.layout)

    # --- the step -----------------------------------------------------------------------

    def step(self, closure=None):
        """One step (``p.grad is None``: the parameter is skipped); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._sync_structure()
            bucket = self._bucket
            core_groups = self._core_groups(self.param_groups, self._noise_ema_init)
            present, copied = bucket.gather_grads()
            self._core.param_groups = core_groups
            with named_errors(f"{type(self).__name__}.step", bucket.names), on_stream(bucket.device):
                info = self._core.step(bucket.param_flat, bucket.grad_flat, present)
            bucket.adopt_grads(copied)
        self.last_step_info = info
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients; ``set_to_none=False`` zeroes them in place (they stay flat-buffer views)."""
        super().zero_grad(set_to_none=set_to_none)

    # --- state dicts --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The production format: ``{"state": {index: {...}}, "param_groups": [...]}``.

        Per-parameter entries hold ``step`` (int), ``avg_utility``, ``first_moment``,
        ``sec_moment`` (tensors: copies, in the parameter's dtype) and, with adaptive noise,
        ``grad_norm_ema`` (float), for parameters that have taken a step. The extra top-level
        key ``"upgd_ref"`` holds the noise seed and counter (ignored by other consumers).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync_structure()
        core = self._core
        state_dict = production_state_dict(
            self.param_groups, [self.state[p] for p in self._bucket.params], self.state.unmanaged, self._STATE_KEYS,
            seed=core.seed, step=core.step_count, noise_norm=core.noise_norm, noise_ema_init=self._noise_ema_init,
            variant=dict(core.variant._asdict()))
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict written by this class or by the production class.

        Groups missing the adaptive-noise keys get the production defaults (as its
        ``__setstate__``); ``step`` may be an int or a tensor; state tensors are cast to
        the parameter's dtype. A dict without the ``"upgd_ref"`` entry keeps this
        optimizer's seed and continues the noise counter at the largest ``step``. Invalid
        input raises and changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"optimizer state dict has no {key!r} entry")
        self._sync_structure()
        layout, bucket = self._core.layout, self._bucket
        current = {"seed": self._core.seed, "noise_norm": self._core.noise_norm,
                   "noise_ema_init": self._noise_ema_init, "variant": dict(self._core.variant._asdict())}
        loaded = read_state_dict(state_dict, self.param_groups, bucket, layout, self._STATE_KEYS, current=current)
        with named_errors(f"{type(self).__name__}.load_state_dict", bucket.names):
            core_groups = self._core_groups(loaded.param_groups, loaded.noise_ema_init)
            core = self._new_core(layout, core_groups, seed=loaded.seed, noise_norm=loaded.noise_norm,
                                  noise_ema_init=loaded.noise_ema_init)
            core.load_state_dict(core_state_dict(
                layout, core_groups, step=loaded.step, seed=loaded.seed, noise_norm=loaded.noise_norm,
                noise_ema_init=loaded.noise_ema_init, segments=loaded.segments, variant=loaded.variant))
        self._noise_ema_init, self.param_groups = loaded.noise_ema_init, loaded.param_groups
        self._seed, self._noise_norm, self._core = core.seed, core.noise_norm, core
        self._extras = loaded.extras
        self.state.unmanaged = loaded.unmanaged
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- pickling / deepcopy ------------------------------------------------------------

    def __getstate__(self) -> dict:
        extras = {self._bucket.segment_by_id[k]: deepcopy(v[1]) for k, v in self._extras.items()}
        return {
            "defaults": self.defaults,
            "param_groups": self.param_groups,
            "_upgd_ref": {
                "backend": self._backend, "noise_ema_init": self._noise_ema_init, "profile": self._profile,
                "core_state": self._core.state_dict(), "extras": extras,
                "other": self.state.unmanaged,
            },
        }

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        upgd = state.pop("_upgd_ref", None)
        state.pop("state", None)
        super().__setstate__(state)
        for group in self.param_groups:
            fill_adaptive_noise_defaults(group)
        upgd = upgd or {}
        core_state = upgd.get("core_state")
        self._backend = upgd.get("backend", "auto")
        self._noise_ema_init = upgd.get("noise_ema_init", 1.0)
        self._profile = upgd.get("profile", type(self)._DEFAULT_PROFILE)
        self._seed = core_state["seed"] if core_state else _draw_seed()
        self._noise_norm = core_state["noise_norm"] if core_state else "segment"
        self._core = None
        self._bucket = None
        self._extras = {}
        self.last_step_info = None
        self._built = False
        if core_state is not None:
            core_state = dict(core_state, param_groups=self._core_groups(self.param_groups, self._noise_ema_init))
        self._rebuild(restore=core_state, unpickled=True)
        params = self._bucket.params
        self._extras = {id(params[i]): (params[i], v) for i, v in upgd.get("extras", {}).items()}
        self.state = StateView(self._state_source)
        self.state.unmanaged = upgd.get("other", {})
        self._built = True
