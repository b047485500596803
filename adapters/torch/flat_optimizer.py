"""The ``torch.optim.Optimizer`` every family member's adapter is: parameters re-homed into
one flat buffer per dtype, a state record of its own, each step one call of the functional door
:func:`upgd_ref.step.upgd_step`, production ``state`` views, state dicts and pickling."""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy

import torch

from upgd_ref.backends import check_backend_name
from upgd_ref.checks import check_nonfinite_policy, check_present
from upgd_ref.family import Member
from upgd_ref.layout import FlatLayout
from upgd_ref.optimizer import StepInfo, noise_version_field, saved_noise_version
from upgd_ref.reference import UPGDVariant, check_variant
from upgd_ref.rng import check_noise_version
from upgd_ref.multi import MultiUPGDState
from upgd_ref.state import UPGD_VERSION, UPGD_FORMAT, FlatUPGDState
from upgd_ref.step import StepRequest, check_noise_norm, check_seed, upgd_step

from .buffers import deduplicate, on_stream
from .checkpoint import fill_adaptive_noise_defaults, production_state_dict, read_state_dict
from .partition import Partition
from .distributed import SHARD_KEY, ShardedAccess, check_shard_mode, fused_vgs, refuse_sharded
from .dtensor import check_dtensors, has_dtensors, sharded_record
from .conversions import (DTYPE_NAMES, check_torch_options, describe_shape, hyper_value, maximize_flag, named_errors,
                          pair_value, split_pair, unsupported_options)
from .state_views import StateSource, StateView


def _draw_seed() -> int:
    """A seed from torch's global generator, so ``torch.manual_seed`` fixes it."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class FlatBufferOptimizer(ShardedAccess, torch.optim.Optimizer):
    """What every member's adapter shares: flat buffers, ``state`` views, state dicts, pickling.

    A member names its row of the family table (``_MEMBER``: variant, pairs, ties, refused
    options, validation), the core class that :attr:`core` snapshots (``_CORE``), its
    param-group keys (``_HYPER_KEYS``), its per-parameter state keys (``_STATE_KEYS``,
    ``grad_norm_ema`` last) and its profile when unpickled without one
    (``_DEFAULT_PROFILE``; None: the member has no profiles); its constructor checks the
    arguments and calls :meth:`_setup`.

    The optimizer owns its step's inputs: the flat buffers (a :class:`~.partition.Partition`:
    one :class:`~.buffers.Bucket` per dtype), a :class:`~upgd_ref.state.FlatUPGDState`
    record (a :class:`~upgd_ref.multi.MultiUPGDState` for several dtypes), the layout, seed,
    noise norm and variant.
    A step is ``upgd_step(layout, params, grads, state, StepRequest(...))`` (``specs/step.md``).
    """

    _MEMBER: Member
    _CORE: type
    _HYPER_KEYS: tuple[str, ...]
    _STATE_KEYS: tuple[str, ...]
    _DEFAULT_PROFILE: str | None
    #: torch-style pairs a group may carry instead of two of its keys (AdaptiveUPGD's ``betas``
    #: for ``beta1, beta2``, so momentum-cycling schedulers find them as for Adam).
    _PAIR_ALIASES: dict = {}

    def _group_keys(self, where: str, group) -> tuple:
        """The hyper-parameter keys ``group`` must hold (a pair alias replaces its two keys)."""
        keys = self._HYPER_KEYS
        for pair, names in self._PAIR_ALIASES.items():
            if pair in group:
                if any(name in group for name in names):
                    raise ValueError(f"{where} has both {pair!r} and {list(names)}; give one of them")
                keys = tuple(k for k in keys if k not in names) + (pair,)
        return keys

    def _group_hyper(self, where: str, group, noise_ema_init) -> dict:
        """The checked core hyper-parameters of one param group (``where`` names it in errors):
        values as the core takes them, then the member's row of the family table (refused
        options, pairs such as ``betas``, ties such as ``beta_utility = beta2``, validation)."""
        member = self._MEMBER
        values = {}
        for k in self._group_keys(where, group):
            if k in self._PAIR_ALIASES:
                values.update(zip(self._PAIR_ALIASES[k], split_pair(f"{where}: ", k, group[k], self._PAIR_ALIASES[k])))
            else:
                values[k] = (pair_value(f"{where}['{k}']", group[k]) if k in member.pairs else
                             hyper_value(f"{where}['{k}']", k, group[k]))
        with unsupported_options():
            return member.hyperparams(values | {"noise_ema_init": noise_ema_init}, self._profile or "production",
                                      where=f"{where}: ")

    def _group_hypers(self, param_groups, noise_ema_init) -> list[dict]:
        """The checked hyper-parameters of each group, read from ``param_groups`` now."""
        out = []
        for g, group in enumerate(param_groups):
            missing = [k for k in self._group_keys(f"param_groups[{g}]", group) if k not in group]
            if missing:
                raise ValueError(f"param_groups[{g}] lacks hyper-parameter(s) {missing}")
            out.append(self._group_hyper(f"param_groups[{g}]", group, noise_ema_init))
        return out

    @staticmethod
    def _core_groups(group_hypers, param_groups) -> list[dict]:
        """The groups as the core classes take them: segment indices and checked values."""
        groups, start = [], 0
        for hyper, group in zip(group_hypers, param_groups):
            groups.append({"segments": list(range(start, start + len(group["params"]))), **hyper})
            start += len(group["params"])
        return groups

    def _setup(self, params, defaults, *, seed, backend, noise_ema_init, noise_norm, profile,
               torch_options, nonfinite="raise", process_group=None, shard_mode="zero1", noise_version=1) -> None:
        """The constructor's common tail: torch.optim's options (:func:`~.conversions.torch_options`),
        the core's checks (types, finiteness) on the hyper-parameters, seed, noise norm and
        backend, then param groups and flat buffer."""
        if check_torch_options(type(self).__name__, **torch_options):
            defaults = dict(defaults, maximize=True)  # the key exists only when set: production's keys stay
        self._profile = profile
        self._variant: UPGDVariant = self._MEMBER.variant(profile or "production")
        self._group_hyper("defaults", defaults, noise_ema_init)
        check_backend_name(backend)
        seed = _draw_seed() if seed is None else check_seed(seed)
        check_noise_norm(noise_norm)
        noise_version = check_noise_version(noise_version)
        nonfinite = check_nonfinite_policy(nonfinite)
        self._shard_mode = check_shard_mode(process_group, shard_mode)
        self._built = False
        super().__init__(params, defaults)
        self._nonfinite = nonfinite
        self._backend = backend
        self._noise_norm = noise_norm
        self._noise_ema_init = noise_ema_init
        self._seed, self._noise_version = seed, noise_version
        self._layout = self._state = self._partition = None
        self._process_group, self._sharded = process_group, None
        self._extras: dict[int, tuple] = {}
        self.last_step_info = None
        self._rebuild()
        # Sharded: the state lives in the rank's shard; optimizer.state stays empty (specs/distributed.md §5)
        self.state = StateView(self._state_source) if self._sharded is None else {}
        self._built = True

    def _state_source(self) -> StateSource:
        """What ``self.state``'s views read (current state record, layout, bucket, param groups)."""
        return StateSource(self._state, self._partition, self.param_groups, self._STATE_KEYS,
                           self._extras, self._noise_ema_init, self._raise_counter)

    def _raise_counter(self, step: int) -> None:
        """The global step counter is at least ``step`` (a ``state[p]["step"]`` set by hand: the
        record holds ``t_i <= step``)."""
        self._state.step = max(self._state.step, step)

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

    def _rebuild(self, restore: dict | None = None, *, rehomed=None) -> None:
        """(Re)build the partition (one flat buffer per dtype), state record and layout for the
        current param groups.

        State carries over by parameter identity, converted to the state dtype of the
        parameter's dtype now (``model.to(...)``: ``specs/adapters-torch.md`` §2.4), or comes
        from ``restore``, a core-format state dict for exactly these parameters. Everything that
        can fail runs before the parameters are re-homed. ``rehomed``: which parameters are
        re-homed (else gathered), given when unpickling (their storages are then the pickled
        flat buffers'); None: decided from their storages.
        """
        params, names = self._flat_params()
        group_ids = [g for g, group in enumerate(self.param_groups) for _ in group["params"]]
        dtensors = has_dtensors(params)  # FSDP2: each rank steps its rows (specs/distributed.md §2a)
        if dtensors:
            layout = FlatLayout([tuple(p.shape) for p in params], DTYPE_NAMES[check_dtensors(params, names)],
                                groups=group_ids)
            partition = None  # the sharded record's DTensorBucket, below
        else:
            partition = Partition(params, names, group_ids, what=type(self).__name__, rehomed=rehomed)
            layout = partition.layout
        group_hypers = self._group_hypers(self.param_groups, self._noise_ema_init)
        sharded = getattr(self, "_process_group", None) is not None or dtensors
        if sharded and (self._state is not None or (partition is not None and partition.multi)):
            raise ValueError(f"{type(self).__name__} with a process_group or DTensor parameters: the parameters must "
                             "be of one dtype and cannot change after construction (the partition is fixed); build "
                             "a new optimizer")
        if restore is not None:
            state = self._restored_state(restore, partition)
        elif self._state is not None:
            old = self._partition
            segments = [old.snapshot(self._state, old.segment_by_id[id(p)]) if id(p) in old.segment_by_id else None
                        for p in params]
            state = partition.state_record(step=self._state.step, noise_ema_init=self._noise_ema_init,
                                           segments=segments, skipped_steps=self._state.skipped_steps)
        else:
            emas = [h["noise_ema_init"] for h, group in zip(group_hypers, self.param_groups) for _ in group["params"]]
            if sharded:
                self._sharded = sharded_record(layout, params, names, self._process_group, emas, self._shard_mode)
                state = self._sharded.state
            else:
                state = (MultiUPGDState if partition.multi else FlatUPGDState).zeros(layout, emas)
        if dtensors:
            partition = self._sharded.bucket
        partition.home()
        self._layout, self._state, self._partition, self._used_groups = (
            layout, state, partition, self._core_groups(group_hypers, self.param_groups))
        self._extras = {k: v for k, v in self._extras.items() if k in partition.segment_by_id}

    def _restored_state(self, saved: Mapping, partition: Partition):
        """The state record of a core-format state dict (a pickle's), checked against this
        optimizer's variant."""
        self._check_variant(saved.get("variant", self._variant))  # absent: written before the family
        if partition.multi:
            return MultiUPGDState.from_state(saved["state"], partition.layout)
        return FlatUPGDState.from_state_dict(saved, partition.layout)

    def _check_variant(self, variant) -> None:
        variant = check_variant(variant)
        if variant != self._variant:
            raise ValueError(f"state dict is for UPGD variant {dict(variant._asdict())}, "
                             f"this optimizer computes {dict(self._variant._asdict())}")

    def _single_layout(self, what: str) -> None:
        """Refuse what the core classes' format cannot hold: several flat buffers."""
        if self._partition.multi:
            dtypes = sorted({d.name for d in self._layout.dtypes})
            raise ValueError(f"{what} needs parameters of one dtype (the core classes step one flat buffer); "
                             f"this optimizer's are {dtypes}")

    def core_format(self) -> dict:
        """This optimizer's state in the core's state-dict format (``specs/layout.md`` §4): what
        :meth:`upgd_ref.AdaptiveUPGD.load_state_dict` (of this member's core class) takes. Its
        ``param_groups`` hold the hyper-parameters of the last step (or build, or load)."""
        refuse_sharded(self._sharded, "core_format() and core")
        self._single_layout("core_format() and core")
        return {
            "format": UPGD_FORMAT, "version": UPGD_VERSION, "member": self._MEMBER.name,
            "profile": self._profile or "production", "layout": self._layout.to_dict(), "seed": self._seed,
            "noise_norm": self._noise_norm, "variant": dict(self._variant._asdict()),
            "param_groups": self._used_groups, "state": self._state.to_state(self._layout),
        } | noise_version_field(self._noise_version)

    def _sync_structure(self) -> None:
        """Rebuild if ``param_groups`` now hold other tensors or a parameter changed dtype or
        device (``model.to(...)``); re-home replaced ``.data``, gather the gathered parameters."""
        partition = self._partition
        params = [p for group in self.param_groups for p in group["params"]]
        if (len(params) != len(partition.params) or any(a is not b for a, b in zip(params, partition.params))
                or partition.moved()):
            self._rebuild()
        self._partition.ensure_homed()

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group`` (a parameter listed twice: torch's warning,
        then it is kept once); the flat buffer is rebuilt, state kept."""
        count = len(self.param_groups)
        super().add_param_group(param_group)
        deduplicate(self.param_groups[-1])
        if not getattr(self, "_built", False):
            return
        try:
            self._rebuild()
        except BaseException:
            del self.param_groups[count:]
            raise

    # --- public extras ------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The noise seed (drawn from torch's global generator when not given)."""
        return self._seed

    @property
    def layout(self):
        """The core layout: one segment per parameter, in ``param_groups`` order; a
        :class:`~upgd_ref.multi.MultiLayout` when the parameters have several dtypes."""
        return self._layout

    @property
    def flat_state(self):
        """The optimizer's state record (live: the buffers the steps update; on the
        parameters' device): a :class:`~upgd_ref.multi.MultiUPGDState` for several dtypes."""
        return self._state

    @property
    def core(self):
        """A core optimizer of this member (``upgd_ref.AdaptiveUPGD``, ``upgd_ref.UPGD``, ...)
        equal to this one now: layout, seed, variant, the hyper-parameters of the last step (or
        build, or load: :meth:`core_format`) and a copy of the state (its ``step_count`` is the noise counter). A snapshot, for inspection
        and comparison with the core classes: edits to it do not reach this optimizer."""
        profile = {} if self._profile is None else {"profile": self._profile}
        core = self._CORE(self._layout, seed=self._seed, noise_norm=self._noise_norm,
                          noise_ema_init=self._noise_ema_init, backend=self._backend, noise_version=self._noise_version,
                          param_groups=self._used_groups, **profile)
        core.load_state_dict(self.core_format())
        return core

    def noise(self, step: int | None = None) -> list[torch.Tensor]:
        """Step ``step``'s standard normals (default: the next step's), one tensor per parameter."""
        step = self._state.step + 1 if step is None else step
        return self._partition.noise(self._seed, step, self._backend, self._noise_version)

    # --- the step -----------------------------------------------------------------------

    @torch.compiler.disable  # the step runs outside autograd on NumPy buffers: a graph break
    def step(self, closure=None, *, vgs=None):
        """One step (``p.grad is None``: the parameter is skipped); returns the closure's loss.
        ``vgs``: a ``VarianceGradientScaler`` over these parameters, fused into the step
        (``shard_mode="zero2"`` only: in place of its ``scale_gradients()`` and ``step()``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._sync_structure()
            bucket = self._partition
            with named_errors(f"{type(self).__name__}.step", bucket.names):
                group_hypers = self._group_hypers(self.param_groups, self._noise_ema_init)
            hypers = [h for h, group in zip(group_hypers, self.param_groups) for _ in group["params"]]
            present, copied = bucket.gather_grads()
            request = StepRequest(hyper=hypers, present=present, seed=self._seed, noise_norm=self._noise_norm,
                                  noise_version=self._noise_version, variant=self._variant, nonfinite=self._nonfinite)
            flipped = [i for i, group in enumerate(g for g in self.param_groups for _ in g["params"])
                       if present[i] and maximize_flag(group)]
            vgs_request = fused_vgs(vgs, self._layout, self._sharded, flipped)
            try:  # maximize: the step sees -g; negation is exact, so flipping back restores g bit for bit
                bucket.negate_grads(flipped)
                with named_errors(f"{type(self).__name__}.step", bucket.names), on_stream(bucket.device):
                    if self._sharded is None:
                        stats = upgd_step(self._layout, bucket.param_flat, bucket.grad_flat, self._state, request,
                                          backend=self._backend)
                    else:
                        stats = self._sharded.run_step(bucket.param_flat, bucket.grad_flat, request, self._backend,
                                                       flipped=flipped, vgs=vgs_request)
            finally:
                bucket.negate_grads(flipped)
            if not stats.skipped:
                bucket.scatter(present)
            bucket.adopt_grads(copied)
        self._used_groups = self._core_groups(group_hypers, self.param_groups)
        self.last_step_info = StepInfo.from_stats(stats, self._state.step,
                                                  check_present(present, self._layout.num_segments),
                                                  skipped_steps=self._state.skipped_steps)
        return loss

    @torch.compiler.disable  # as torch.optim.Optimizer.zero_grad
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
        Only reads (as torch's): parameters are numbered as torch numbers them, whatever the
        param groups hold now (e.g. after ``param_groups.extend(...)``).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if self._sharded is None:
            state_dict = self._production_state_dict(self.state.read, self.state.unmanaged)
        else:  # this rank's part (specs/distributed.md §5)
            state_dict = self._production_state_dict(lambda p: {}, {}) | {SHARD_KEY: self._sharded.shard_entry()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _production_state_dict(self, read, unmanaged) -> dict:
        return production_state_dict(
            self.param_groups, read, unmanaged, self._STATE_KEYS,
            seed=self._seed, step=self._state.step, noise_norm=self._noise_norm, noise_ema_init=self._noise_ema_init,
            variant=dict(self._variant._asdict()), noise_version=self._noise_version)

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
        layout, bucket = self._layout, self._partition
        current = {"seed": self._seed, "noise_norm": self._noise_norm, "noise_ema_init": self._noise_ema_init,
                   "variant": dict(self._variant._asdict()), "noise_version": self._noise_version}
        loaded = read_state_dict(state_dict, self.param_groups, bucket, self._STATE_KEYS, current=current)
        with named_errors(f"{type(self).__name__}.load_state_dict", bucket.names):
            seed = check_seed(loaded.seed, "state dict ")
            noise_norm = check_noise_norm(loaded.noise_norm, "state dict ")
            noise_version = check_noise_version(loaded.noise_version, "state dict ")
            groups = self._core_groups(self._group_hypers(loaded.param_groups, loaded.noise_ema_init),
                                       loaded.param_groups)
            self._check_variant(loaded.variant)
            state = bucket.state_record(step=loaded.step, noise_ema_init=loaded.noise_ema_init, segments=loaded.segments)
            if self._sharded is not None:  # this rank's part of the whole state, or its own per-rank part
                state = self._sharded.adopt(state_dict.get(SHARD_KEY), state.to_state(layout))
        self._noise_ema_init, self.param_groups = loaded.noise_ema_init, loaded.param_groups
        self._seed, self._noise_norm, self._state, self._used_groups = seed, noise_norm, state, groups
        self._noise_version = noise_version
        self._extras = loaded.extras
        if self._sharded is None:
            self.state.unmanaged = loaded.unmanaged
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- pickling / deepcopy ------------------------------------------------------------

    def __getstate__(self) -> dict:
        refuse_sharded(self._sharded, "pickling and deepcopy (a process group does not pickle)")
        extras = {self._partition.segment_by_id[k]: deepcopy(v[1]) for k, v in self._extras.items()}
        core_state = {"format": UPGD_FORMAT, "version": UPGD_VERSION, "member": self._MEMBER.name,
                      "profile": self._profile or "production", "seed": self._seed, "noise_norm": self._noise_norm,
                      "variant": dict(self._variant._asdict()), "state": self._state.to_state(self._layout),
                      **noise_version_field(self._noise_version)}
        if not self._partition.multi:
            core_state["layout"] = self._layout.to_dict()
        return {
            "defaults": self.defaults,
            "param_groups": self.param_groups,
            "_upgd_ref": {
                "backend": self._backend, "noise_ema_init": self._noise_ema_init, "profile": self._profile,
                "nonfinite": self._nonfinite, "core_state": core_state, "extras": extras, "other": self.state.unmanaged,
                "rehomed": self._partition.rehomed,
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
        core_state = upgd.get("core_state")  # the core format (pickles of every version)
        self._backend = upgd.get("backend", "auto")
        self._noise_ema_init = upgd.get("noise_ema_init", 1.0)
        self._nonfinite = check_nonfinite_policy(upgd.get("nonfinite", "raise"))  # absent from older pickles
        self._profile = upgd.get("profile", type(self)._DEFAULT_PROFILE)
        self._variant = self._MEMBER.variant(self._profile or "production")
        self._seed = check_seed(core_state["seed"]) if core_state else _draw_seed()
        self._noise_norm = check_noise_norm(core_state["noise_norm"]) if core_state else "segment"
        self._noise_version = saved_noise_version(core_state or {})
        self._layout = self._state = self._partition = None
        self._process_group = self._sharded = None  # a sharded optimizer does not pickle
        self._extras = {}
        self.last_step_info = None
        self._built = False
        params = [p for group in self.param_groups for p in group["params"]]
        self._rebuild(restore=core_state, rehomed=upgd.get("rehomed", [True] * len(params)))  # older: all re-homed
        params = self._partition.params
        self._extras = {id(params[i]): (params[i], v) for i, v in upgd.get("extras", {}).items()}
        self.state = StateView(self._state_source)
        self.state.unmanaged = upgd.get("other", {})
        self._built = True
