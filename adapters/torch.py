"""PyTorch front end: drop-in ``AdaptiveUPGD``, ``UPGD``, ``UPGDW`` and ``VarianceGradientScaler``.

Normative description: ``specs/adapters-torch.md``. Change one import::

    from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler

    optimizer = AdaptiveUPGD(model.parameters(), lr=3e-4, adaptive_noise=True)
    vgs = VarianceGradientScaler(model.parameters())
    loss.backward()
    vgs.scale_gradients()
    optimizer.step()
    vgs.step()

This module contains no optimizer math. Every formula runs in :class:`upgd_ref.AdaptiveUPGD`
(or its family members :class:`upgd_ref.UPGD`, :class:`upgd_ref.UPGDW`) and
:class:`upgd_ref.VarianceGradientScaler` on flat, 64-byte aligned buffers: NumPy arrays for
CPU tensors, CuPy arrays sharing the memory of flat CUDA tensors (DLPack, no copy) for CUDA
tensors, whose steps run the CUDA kernels on the tensors' current stream; the adapter only

* re-homes the parameters of an optimizer into one flat buffer (``p.data`` becomes a view
  of a segment of it, the approach of DDP's ``gradient_as_bucket_view``), and points
  ``p.grad`` at views of a flat gradient buffer where it can; a gradient that is not such a
  view (``zero_grad(set_to_none=True)``, a user replacing it) is copied in before a step;
* maps the production classes' API (constructor, ``param_groups``, ``state``, state dicts,
  pickling, logging) onto the core's.

Tensors of one device (CPU, or one CUDA GPU with CuPy installed) and one dtype (float32 or
float64) per optimizer are supported: a global utility minimum/maximum across several flat
buffers needs a core hook that does not exist yet (see the spec, section "Limits").
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
import weakref
from collections.abc import Mapping, MutableMapping
from copy import deepcopy
from itertools import chain

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

import upgd_ref
from upgd_ref import reference as _ref
from upgd_ref.arrays import to_numpy
from upgd_ref.backends import BACKENDS, check_backend_name
from upgd_ref.hyperparams import validate_upgd, validate_vgs
from upgd_ref.layout import FlatLayout
from upgd_ref.optimizer import PAPER_EPS, PROFILES
from upgd_ref.state import STATE_VERSION, UPGD_FORMAT, VGS_FORMAT

__all__ = [
    "AdaptiveUPGD",
    "UPGD",
    "UPGDW",
    "VarianceGradientScaler",
    "HYPERPARAMETER_KEYS",
    "STATE_KEYS",
    "VGS_VERSION",
    "CHECKPOINT_KEY",
    "UPGD_HYPERPARAMETER_KEYS",
    "UPGDW_HYPERPARAMETER_KEYS",
]

#: The production optimizer's param-group keys (besides ``params``), in its order.
HYPERPARAMETER_KEYS = (
    "lr", "weight_decay", "beta_utility", "sigma", "beta1", "beta2", "eps",
    "adaptive_noise", "noise_beta", "min_noise_std", "instant_noise_scale",
)
#: The production optimizer's per-parameter state keys (``grad_norm_ema`` only with adaptive noise).
STATE_KEYS = ("step", "avg_utility", "first_moment", "sec_moment", "grad_norm_ema")
_TENSOR_KEYS = {"avg_utility": "utility", "first_moment": "first_moment", "sec_moment": "second_moment"}
#: Keys the production ``__setstate__`` fills in for state dicts written before adaptive noise.
_ADAPTIVE_NOISE_DEFAULTS = {"adaptive_noise": False, "noise_beta": 0.999, "min_noise_std": 1e-6,
                            "instant_noise_scale": True}
#: Top-level key of an optimizer state dict holding what the production format has no place
#: for (noise seed and counter). A production consumer ignores it.
CHECKPOINT_KEY = "upgd_ref"
_CHECKPOINT_VERSION = 1
#: Version marker written by :meth:`VarianceGradientScaler.state_dict` (the production one).
VGS_VERSION = "3.2"
_VGS_STAT_VERSIONS = ("3.1", "3.2")
_VGS_LEGACY_KEYS = ("grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema")

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

# Which flat buffer a parameter currently lives in: param -> (weakref to _Bucket, segment).
_HOME = WeakIdKeyDictionary()


# --- parameters and flat buffers --------------------------------------------------------


def _describe_shape(p) -> str:
    if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
        return "(uninitialized)"
    return f"of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else f"({type(p).__name__})"


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill a block of memory exactly once."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _homed_in(p: torch.Tensor):
    """``(bucket, segment)`` when ``p.data`` is currently a view of a live bucket, else None."""
    entry = _HOME.get(p)
    if entry is None:
        return None
    bucket = entry[0]()
    if bucket is None or not bucket.is_homed(entry[1]):
        return None
    return bucket, entry[1]


def _check_tensors(tensors, names, *, what: str, rehome: bool) -> torch.dtype:
    """The common dtype of ``tensors`` after checking they can go to the core.

    ``rehome``: the tensors' storage will be replaced by flat-buffer views, so it must hold
    nothing but the tensor (or already be a flat-buffer view of ours). Raises before
    anything is modified.
    """
    if not tensors:
        raise ValueError(f"{what}: no parameters")
    seen: dict[int, int] = {}
    devices, dtypes = {}, {}
    for k, (p, name) in enumerate(zip(tensors, names)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}: {name} is a {torch.typename(p)}, not a Tensor")
        if id(p) in seen:
            raise ValueError(f"{what}: {name} is the same tensor as {names[seen[id(p)]]}; "
                             "a parameter can occupy one segment only")
        seen[id(p)] = k
        if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"{what}: {name} is an uninitialized (lazy) parameter; run a forward pass first")
        if p.layout != torch.strided:
            raise TypeError(f"{what}: {name} has layout {p.layout}; only dense (strided) tensors are supported")
        if p.is_complex():
            raise TypeError(f"{what}: {name} is complex ({p.dtype}); only real float32/float64 are supported")
        if p.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{what}: {name} has dtype {p.dtype}; only torch.float32 and torch.float64 are supported")
        devices.setdefault(str(p.device), name)
        dtypes.setdefault(p.dtype, name)
    if len(devices) > 1:
        listing = ", ".join(f"{d} ({n})" for d, n in devices.items())
        raise ValueError(f"{what}: parameters on several devices: {listing}; one optimizer or scaler "
                         "takes the parameters of one device")
    device = next(iter(devices))
    if not device.startswith("cpu") and not (device.startswith("cuda") and "cupy" in BACKENDS):
        raise ValueError(f"{what}: parameters on {device}: upgd_ref takes CPU tensors, and CUDA tensors "
                         "when CuPy is installed (pip install cupy-cuda12x)")
    if len(dtypes) > 1:
        listing = ", ".join(f"{d} ({n})" for d, n in dtypes.items())
        raise TypeError(f"{what}: parameters of several dtypes: {listing}; the global utility range spans "
                        "one flat buffer, so create one optimizer per dtype")
    if rehome:
        storages: dict[int, str] = {}
        for p, name in zip(tensors, names):
            if p.numel() == 0 or _homed_in(p) is not None:
                continue
            nbytes = p.untyped_storage().nbytes()
            if p.storage_offset() != 0 or nbytes != p.numel() * p.element_size() or not _is_dense(p):
                raise ValueError(
                    f"{what}: {name} cannot be re-homed into a flat buffer: it is a view into a larger storage "
                    f"(offset {p.storage_offset()}, {nbytes} storage bytes for {p.numel()} elements, strides "
                    f"{tuple(p.stride())}) that other tensors may share; give it its own storage (p.data = p.data.clone())"
                )
            ptr = p.untyped_storage().data_ptr()
            if ptr in storages:
                raise ValueError(f"{what}: {name} shares its storage with {storages[ptr]}; "
                                 "parameters that alias each other cannot be re-homed")
            storages[ptr] = name
    return next(iter(dtypes))


def _flat_buffer(layout: FlatLayout, device: torch.device):
    """``(core buffer, torch tensor)`` sharing one zeroed flat buffer of the layout: a 64-byte
    aligned NumPy array on the CPU, a CuPy view of a CUDA tensor (DLPack, no copy) on a GPU
    (CUDA allocations are at least 256-byte aligned)."""
    if device.type == "cpu":
        array = layout.zeros()
        return array, torch.from_numpy(array)
    import cupy

    tensor = torch.zeros(layout.size, dtype=_TORCH_DTYPES[layout.dtype.name], device=device)
    return cupy.from_dlpack(tensor), tensor


def _as_tensor(array) -> torch.Tensor:
    """A core buffer (NumPy or CuPy) as a tensor sharing its memory."""
    return torch.from_numpy(array) if isinstance(array, np.ndarray) else torch.from_dlpack(array)


@contextlib.contextmanager
def _on_stream(device: torch.device):
    """On a GPU, make CuPy launch on torch's current stream (kernels stay ordered with torch's)."""
    if device.type != "cuda":
        yield
        return
    import cupy

    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        yield


class _Bucket:
    """One flat parameter buffer and one flat gradient buffer (64-byte aligned) on the
    parameters' device: NumPy arrays for CPU tensors, CuPy views of CUDA tensors otherwise.

    ``param_views[i]`` / ``grad_views[i]`` are torch tensors sharing memory with segment
    ``i`` (no copy). :meth:`home` makes them the parameters' storage.
    """

    def __init__(self, params, layout: FlatLayout, names):
        self.params = list(params)
        self.names = list(names)
        self.layout = layout
        self.device = params[0].device if params else torch.device("cpu")
        self.param_flat, param_flat = _flat_buffer(layout, self.device)
        self.grad_flat, grad_flat = _flat_buffer(layout, self.device)
        self.param_views = [param_flat[layout.segment_slice(i)].view(s) for i, s in enumerate(layout.shapes)]
        self.grad_views = [grad_flat[layout.segment_slice(i)].view(s) for i, s in enumerate(layout.shapes)]
        self.param_ptrs = [v.data_ptr() for v in self.param_views]
        self.grad_ptrs = [v.data_ptr() for v in self.grad_views]
        self.shapes = [torch.Size(s) for s in layout.shapes]
        self.dtype = next(d for d, n in _DTYPE_NAMES.items() if n == layout.dtype.name)

    def is_homed(self, i: int) -> bool:
        p = self.params[i]
        return p.data_ptr() == self.param_ptrs[i] and p.shape == self.shapes[i] and p.is_contiguous()

    def home(self) -> None:
        """Copy every parameter (and existing gradient) in and re-point it at its segment."""
        ref = weakref.ref(self)
        done = []
        try:
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    old_data, grad = p.data, p.grad
                    self.param_views[i].copy_(old_data)
                    p.data = self.param_views[i]
                    done.append((p, old_data))
                    if grad is not None and grad.layout == torch.strided:
                        self.grad_views[i].copy_(grad)
                        p.grad = self.grad_views[i]
        except Exception:
            for p, old_data in done:  # leave the parameters where they were
                p.data = old_data
            raise
        for i, p in enumerate(self.params):
            _HOME[p] = (ref, i)

    def ensure_homed(self) -> None:
        """Re-home parameters whose ``.data`` was replaced since (``p.data = ...``, another optimizer)."""
        stale = [i for i in range(len(self.params)) if not self.is_homed(i)]
        if not stale:
            return
        for i in stale:
            p = self.params[i]
            if p.dtype != self.dtype or p.device != self.device or p.shape != self.shapes[i] or p.layout != torch.strided:
                raise ValueError(
                    f"{self.names[i]} changed to {p.dtype}, {p.device}, shape {tuple(p.shape)} since the optimizer "
                    f"was built ({self.dtype}, {self.device}, {tuple(self.shapes[i])}); create the optimizer after "
                    "moving or converting the model"
                )
        ref = weakref.ref(self)
        with torch.no_grad():
            for i in stale:
                p = self.params[i]
                self.param_views[i].copy_(p.data)
                p.data = self.param_views[i]
                _HOME[p] = (ref, i)

    def gather_grads(self, start: int = 0, stop: int | None = None):
        """``(present, copied)`` for segments ``start:stop``; gradients that are not views of
        this bucket are copied into it (``copied`` lists them, for :meth:`adopt_grads`).

        Only segments no ``.grad`` points at are written, so a failure later leaves every
        user-visible tensor unchanged.
        """
        stop = len(self.params) if stop is None else stop
        present, copied = [], []
        for i in range(start, stop):
            g = self.params[i].grad
            if g is None:
                present.append(False)
                continue
            if g.layout != torch.strided:
                raise TypeError(f"{self.names[i]}: sparse gradients ({g.layout}) are not supported")
            if g.is_complex():
                raise TypeError(f"{self.names[i]}: complex gradients are not supported")
            present.append(True)
            if g.data_ptr() != self.grad_ptrs[i] or not g.is_contiguous():
                copied.append(i)
        if copied:
            with torch.no_grad():
                for i in copied:
                    self.grad_views[i].copy_(self.params[i].grad)
        return present, copied

    def adopt_grads(self, copied) -> None:
        """Point ``.grad`` of the copied segments at their views (next backward accumulates there)."""
        for i in copied:
            self.params[i].grad = self.grad_views[i]


def _bucket_run(params):
    """``(bucket, start)`` when ``params`` are consecutive segments of one live bucket."""
    if not params:
        return None
    entry = _HOME.get(params[0])
    if entry is None:
        return None
    bucket, start = entry[0](), entry[1]
    if bucket is None or start + len(params) > len(bucket.params):
        return None
    for k, p in enumerate(params):
        if bucket.params[start + k] is not p:
            return None
    return bucket, start


_CORE_FIELD_NAMES = {"'state.utility'": "avg_utility", "'state.first_moment'": "first_moment",
                     "'state.second_moment'": "sec_moment", "'state.segment_step'": "step",
                     "'state.grad_norm_ema'": "grad_norm_ema"}


def _segment_note(exc: Exception, names) -> str:
    """The core's message with each ``segment N`` followed by the parameter it is, and core
    state fields followed by their production key."""
    def name(match):
        i = int(match.group(1))
        return f"{match.group(0)} ({names[i]})" if 0 <= i < len(names) else match.group(0)

    message = re.sub(r"segment (\d+)", name, str(exc))
    for field, key in _CORE_FIELD_NAMES.items():
        message = message.replace(field, f"{field} (per-parameter {key!r})")
    return message


def _as_float(where: str, value):
    """A hyper-parameter as the core wants it: tensors become Python numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    return value


def _as_hyper(where: str, key: str, value):
    """One production hyper-parameter value for the core (truthy ints are flags, as in production)."""
    value = _as_float(where, value)
    if key in ("adaptive_noise", "instant_noise_scale") and isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    return value


def _as_step(where: str, value) -> int:
    """A per-parameter step count from an int, a 0-d tensor (torch.optim style) or NumPy scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}: 'step' must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: 'step' must be an int or a scalar tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"{where}: 'step' must be a non-negative integer, got {value}")
    return int(value)


def _as_array(where: str, value, shape, dtype: np.dtype) -> np.ndarray:
    """A state tensor as a flat NumPy array of the parameter's dtype (cast as torch.optim does)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{where} must be a real floating dense tensor, got {value.dtype} ({value.layout})")
        value = value.detach().cpu()
        if value.dtype not in _DTYPE_NAMES:
            value = value.double()
        value = value.numpy()
    elif isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"{where} must be a real floating array, got {value.dtype}")
    else:
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter has {tuple(shape)}")
    return np.asarray(value, dtype=dtype).reshape(-1)


def _as_scalar(where: str, value) -> float:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != 1):
            raise ValueError(f"{where} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a float, got {type(value).__name__}")
    return float(value)


# --- AdaptiveUPGD -----------------------------------------------------------------------


class _ParamState(MutableMapping):
    """``optimizer.state[p]``: the production keys as live views of the core's flat state.

    ``step`` is a Python int and ``grad_norm_ema`` a Python float (as the production class
    keeps them); ``avg_utility``, ``first_moment`` and ``sec_moment`` are tensors sharing
    memory with the core state, so in-place edits reach the optimizer. Other keys are kept
    as given. Empty until the parameter's first step, as in the production class.
    """

    __slots__ = ("_opt", "_param")

    def __init__(self, opt, param):
        self._opt = opt
        self._param = param

    def _segment(self) -> int:
        return self._opt._segment_of(self._param)

    def _extras(self, create=False) -> dict:
        entry = self._opt._extras.get(id(self._param))
        if entry is None:
            if not create:
                return {}
            entry = self._opt._extras[id(self._param)] = (self._param, {})
        return entry[1]

    def _live_keys(self):
        opt, i = self._opt, self._segment()
        if int(opt._core.state.segment_step[i]) == 0:
            return ()
        if opt._group_of(i).get("adaptive_noise", False):
            return opt._STATE_KEYS
        return opt._STATE_KEYS[:-1]

    def __getitem__(self, key):
        if key in self._live_keys():
            opt, i = self._opt, self._segment()
            state = opt._core.state
            if key == "step":
                return int(state.segment_step[i])
            if key == "grad_norm_ema":
                return float(state.grad_norm_ema[i])
            flat = _as_tensor(getattr(state, opt._TENSOR_KEYS[key]))
            return flat[opt._core.layout.segment_slice(i)].view(opt._bucket.shapes[i])
        return self._extras()[key]

    def __setitem__(self, key, value):
        if key not in self._opt._STATE_KEYS:
            self._extras(create=True)[key] = value
            return
        opt, i = self._opt, self._segment()
        state = opt._core.state
        where = f"state[{opt._bucket.names[i]}][{key!r}]"
        if key == "step":
            step = _as_step(where, value)
            state.segment_step[i] = step
            state.step = max(state.step, step)
        elif key == "grad_norm_ema":
            ema = _as_scalar(where, value)
            if not (math.isfinite(ema) and ema >= 0):
                raise ValueError(f"{where} must be finite and >= 0, got {ema}")
            state.grad_norm_ema[i] = ema
        else:
            values = _as_array(where, value, opt._bucket.shapes[i], opt._core.layout.dtype)
            getattr(state, opt._TENSOR_KEYS[key])[opt._core.layout.segment_slice(i)] = values

    def __delitem__(self, key):
        if key in self._opt._STATE_KEYS:
            raise KeyError(f"{key!r} is part of the optimizer's state and cannot be deleted "
                           "(delete optimizer.state[p] to reset the parameter's state)")
        del self._extras()[key]

    def __iter__(self):
        return chain(self._live_keys(), iter(list(self._extras())))

    def __len__(self):
        return len(self._live_keys()) + len(self._extras())

    def __repr__(self):
        return repr(dict(self.items()))


class _StateView(MutableMapping):
    """``optimizer.state``: a ``defaultdict(dict)`` whose managed entries are :class:`_ParamState`."""

    def __init__(self, opt):
        self._opt = opt
        self._other: dict = {}

    def _managed(self, key) -> bool:
        return isinstance(key, torch.Tensor) and id(key) in self._opt._index

    def __getitem__(self, key):
        if self._managed(key):
            return _ParamState(self._opt, key)
        if key not in self._other:
            self._other[key] = {}
        return self._other[key]

    def __setitem__(self, key, value):
        if not self._managed(key):
            self._other[key] = value
            return
        if not isinstance(value, Mapping):
            raise TypeError(f"optimizer.state[p] must be a mapping, got {type(value).__name__}")
        if key in self:
            del self[key]
        entry = _ParamState(self._opt, key)
        for k, v in dict(value).items():
            entry[k] = v

    def __delitem__(self, key):
        if not self._managed(key):
            del self._other[key]
            return
        self._opt._reset_segment(self._opt._segment_of(key))
        self._opt._extras.pop(id(key), None)

    def __contains__(self, key):
        if self._managed(key):
            return len(_ParamState(self._opt, key)) > 0
        return key in self._other

    def __iter__(self):
        managed = [p for p in self._opt._bucket.params if len(_ParamState(self._opt, p))]
        return chain(managed, iter(list(self._other)))

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return repr({k: v for k, v in self.items()})


def _draw_seed() -> int:
    """A seed from torch's global generator, so ``torch.manual_seed`` fixes it."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def _check_profile(profile):
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return profile


class _UPGDAdapter(torch.optim.Optimizer):
    """What every member's adapter shares: flat buffers, ``state`` views, state dicts, pickling.

    A member says which core class does the math (``_CORE``), its param-group keys
    (``_HYPER_KEYS``), its per-parameter state keys (``_STATE_KEYS``, ``grad_norm_ema`` last)
    and how a param group maps to the core's hyper-parameters (:meth:`_core_hyper`).
    """

    _CORE = upgd_ref.AdaptiveUPGD
    _HYPER_KEYS = HYPERPARAMETER_KEYS
    _STATE_KEYS = STATE_KEYS
    _TENSOR_KEYS = _TENSOR_KEYS
    _DEFAULT_PROFILE = "production"  # None: the core class takes no ``profile``

    @classmethod
    def _core_hyper(cls, where: str, group) -> dict:
        """The core hyper-parameters of one param group (``where`` names it in errors)."""
        return {k: _as_hyper(f"{where}['{k}']", k, group[k]) for k in cls._HYPER_KEYS}

    @classmethod
    def _validate_defaults(cls, defaults: dict, noise_ema_init) -> None:
        """The core's checks (types, finiteness) on the constructor's hyper-parameters."""
        validate_upgd(cls._core_hyper("defaults", defaults) | {"noise_ema_init": noise_ema_init})

    def _setup(self, params, defaults, *, seed, backend, noise_ema_init, noise_norm, profile) -> None:
        """The constructor's common tail: param groups, core optimizer, flat buffer."""
        self._validate_defaults(defaults, noise_ema_init)
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
        self._index: dict[int, int] = {}
        self._extras: dict[int, tuple] = {}
        self.last_step_info = None
        self._rebuild()
        self.state = _StateView(self)
        self._built = True

    def _new_core(self, layout, core_groups, *, seed, noise_norm, noise_ema_init):
        """A fresh core optimizer of this member (``profile`` only where the core has one)."""
        extra = {} if self._profile is None else {"profile": self._profile}
        return self._CORE(layout, seed=seed, noise_norm=noise_norm, noise_ema_init=noise_ema_init,
                          backend=self._backend, param_groups=core_groups, **extra)

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
                names.append(f"{label} {_describe_shape(p)}")
        return params, names

    def _core_groups(self) -> list[dict]:
        """The core's parameter groups, hyper-parameters read from ``self.param_groups`` now."""
        groups, start = [], 0
        for g, group in enumerate(self.param_groups):
            count = len(group["params"])
            missing = [k for k in self._HYPER_KEYS if k not in group]
            if missing:
                raise ValueError(f"param_groups[{g}] lacks hyper-parameter(s) {missing}")
            hyper = self._core_hyper(f"param_groups[{g}]", group)
            groups.append({"segments": list(range(start, start + count)), **hyper,
                           "noise_ema_init": self._noise_ema_init})
            start += count
        return groups

    def _group_of(self, segment: int) -> dict:
        start = 0
        for group in self.param_groups:
            start += len(group["params"])
            if segment < start:
                return group
        raise IndexError(segment)

    def _segment_of(self, param) -> int:
        try:
            return self._index[id(param)]
        except KeyError:
            raise KeyError("this tensor is not a parameter of the optimizer") from None

    def _core_state_dict(self, layout, core_groups, step, seed, noise_norm, segments, variant) -> dict:
        """A core-format state dict; ``segments[i]`` is None (fresh) or ``(t, arrays, n)`` with
        ``arrays`` a dict of core state buffers (``"utility"``, ...; a missing one is zero)."""
        dtype = layout.dtype
        t = np.zeros(layout.num_segments, dtype=np.int64)
        n = np.array([self._noise_ema_init] * layout.num_segments, dtype=np.float64)
        buffers = {name: [] for name in ("utility", "first_moment", "second_moment")}
        for i, entry in enumerate(segments):
            arrays = {}
            if entry is not None:
                t[i], arrays, n[i] = entry
            for name, parts in buffers.items():
                values = arrays.get(name)
                parts.append(np.zeros(layout.sizes[i], dtype=dtype) if values is None
                             else np.asarray(values, dtype=dtype).reshape(-1))
        state = {"step": int(step), "segment_step": t, "grad_norm_ema": n}
        for name, parts in buffers.items():
            state[name] = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        return {
            "format": UPGD_FORMAT, "version": STATE_VERSION, "layout": layout.to_dict(), "seed": seed,
            "noise_norm": noise_norm, "variant": variant, "param_groups": core_groups, "state": state,
        }

    def _segment_snapshot(self, i: int):
        """``(t, arrays, n)`` copies of segment ``i`` of the current core state."""
        state, sl = self._core.state, self._core.layout.segment_slice(i)
        arrays = {name: to_numpy(getattr(state, name)[sl]).copy()
                  for name in ("utility", "first_moment", "second_moment")}
        return int(state.segment_step[i]), arrays, float(state.grad_norm_ema[i])

    def _rebuild(self, restore: dict | None = None, *, unpickled: bool = False) -> None:
        """(Re)build the flat layout, core optimizer and bucket for the current param groups.

        State carries over by parameter identity (or comes from ``restore``, a core state
        dict for exactly these parameters). Everything that can fail runs before the
        parameters are re-homed. ``unpickled``: the parameters come from unpickling this
        class, so they are views of the one storage their pickled flat buffer became.
        """
        params, names = self._flat_params()
        dtype = _check_tensors(params, names, what=type(self).__name__, rehome=not unpickled)
        group_ids = [g for g, group in enumerate(self.param_groups) for _ in group["params"]]
        layout = FlatLayout([tuple(p.shape) for p in params], _DTYPE_NAMES[dtype], groups=group_ids)
        core_groups = self._core_groups()
        core = self._new_core(layout, core_groups, seed=self._seed, noise_norm=self._noise_norm,
                              noise_ema_init=self._noise_ema_init)
        if restore is not None:
            core.load_state_dict(restore)
        elif self._core is not None:
            old = {id(p): i for i, p in enumerate(self._bucket.params)}
            segments = [self._segment_snapshot(old[id(p)]) if id(p) in old else None for p in params]
            core.load_state_dict(self._core_state_dict(layout, core_groups, self._core.step_count, self._seed,
                                                       self._noise_norm, segments, dict(core.variant._asdict())))
        bucket = _Bucket(params, layout, names)
        bucket.home()
        self._core, self._bucket = core, bucket
        self._index = {id(p): i for i, p in enumerate(params)}
        self._extras = {k: v for k, v in self._extras.items() if k in self._index}

    def _sync_structure(self) -> None:
        """Rebuild if ``param_groups`` now hold other tensors; re-home replaced ``.data``."""
        bucket = self._bucket
        params = [p for group in self.param_groups for p in group["params"]]
        if len(params) != len(bucket.params) or any(a is not b for a, b in zip(params, bucket.params)):
            self._rebuild()
        else:
            bucket.ensure_homed()

    def _reset_segment(self, i: int) -> None:
        state, sl = self._core.state, self._core.layout.segment_slice(i)
        state.segment_step[i] = 0
        state.grad_norm_ema[i] = self._noise_ema_init
        for name in ("utility", "first_moment", "second_moment"):
            getattr(state, name)[sl] = 0

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
        flat = torch.from_numpy(self._core.noise(step)).to(self._bucket.device)
        return [flat[self.layout.segment_slice(i)].view(s) for i, s in enumerate(self._bucket.shapes)]

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
            core_groups = self._core_groups()
            present, copied = bucket.gather_grads()
            self._core.param_groups = core_groups
            try:
                with _on_stream(bucket.device):
                    info = self._core.step(bucket.param_flat, bucket.grad_flat, present)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{type(self).__name__}.step: {_segment_note(exc, bucket.names)}") from exc
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
        param_groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            param_groups.append(packed)
        packed_state = {}
        for i, p in enumerate(self._bucket.params):
            entry = {}
            for key, value in _ParamState(self, p).items():
                entry[key] = value.clone() if isinstance(value, torch.Tensor) and key in self._TENSOR_KEYS else value
            if entry:
                packed_state[i] = entry
        for key, value in self.state._other.items():
            if not isinstance(key, torch.Tensor):
                packed_state[key] = value
        state_dict = {
            "state": packed_state,
            "param_groups": param_groups,
            CHECKPOINT_KEY: {
                "version": _CHECKPOINT_VERSION, "seed": self._core.seed, "step": self._core.step_count,
                "noise_norm": self._core.noise_norm, "noise_ema_init": self._noise_ema_init,
                "variant": dict(self._core.variant._asdict()),
            },
        }
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
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if not isinstance(saved_groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in saved_groups):
            raise ValueError("optimizer state dict 'param_groups' must be a list of dicts with 'params'")
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            new = dict(saved)
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new["param_names"] = group["param_names"]
            for key, default in _ADAPTIVE_NOISE_DEFAULTS.items():
                new.setdefault(key, default)
            new_groups.append(new)

        meta = state_dict.get(CHECKPOINT_KEY)
        if meta is not None and not isinstance(meta, Mapping):
            raise ValueError(f"optimizer state dict entry {CHECKPOINT_KEY!r} must be a dict")
        meta = dict(meta or {})
        seed = meta.get("seed", self._core.seed)
        noise_norm = meta.get("noise_norm", self._core.noise_norm)
        noise_ema_init = meta.get("noise_ema_init", self._noise_ema_init)
        variant = meta.get("variant", dict(self._core.variant._asdict()))  # absent: written before the family

        layout, names = self._core.layout, self._bucket.names
        segments: list = [None] * layout.num_segments
        extras, other = {}, {}
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError("optimizer state dict 'state' must be a dict")
        for key, entry in saved_state.items():
            if key not in id_map:
                other[key] = deepcopy(entry)
                continue
            p = id_map[key]
            i = self._index[id(p)]
            where = f"state dict state[{key!r}] ({names[i]})"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
            entry = dict(entry)
            extra = {k: deepcopy(v) for k, v in entry.items() if k not in self._STATE_KEYS}
            if extra:
                extras[id(p)] = (p, extra)
            if not any(k in entry for k in self._STATE_KEYS):
                continue
            missing = [k for k in self._STATE_KEYS[:-1] if k not in entry]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
            t = _as_step(where, entry["step"])
            arrays = {core_name: _as_array(f"{where}[{k!r}]", entry[k], p.shape, layout.dtype)
                      for k, core_name in self._TENSOR_KEYS.items()}
            ema = _as_scalar(f"{where}['grad_norm_ema']", entry["grad_norm_ema"]) if "grad_norm_ema" in entry else float(noise_ema_init)
            segments[i] = (t, arrays, ema)
        steps = [s[0] for s in segments if s is not None]
        step = meta.get("step", max(steps, default=0))

        previous = (self._noise_ema_init, self.param_groups)
        self._noise_ema_init, self.param_groups = noise_ema_init, new_groups
        try:
            core_groups = self._core_groups()
            core = self._new_core(layout, core_groups, seed=seed, noise_norm=noise_norm, noise_ema_init=noise_ema_init)
            core.load_state_dict(self._core_state_dict(layout, core_groups, step, seed, noise_norm, segments, variant))
        except (ValueError, TypeError) as exc:
            self._noise_ema_init, self.param_groups = previous
            raise type(exc)(f"{type(self).__name__}.load_state_dict: {_segment_note(exc, names)}") from exc
        except BaseException:
            self._noise_ema_init, self.param_groups = previous
            raise
        self._seed, self._noise_norm, self._core = core.seed, core.noise_norm, core
        self._extras = extras
        self.state._other = other
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- pickling / deepcopy ------------------------------------------------------------

    def __getstate__(self) -> dict:
        extras = {self._index[k]: deepcopy(v[1]) for k, v in self._extras.items()}
        return {
            "defaults": self.defaults,
            "param_groups": self.param_groups,
            "_upgd_ref": {
                "backend": self._backend, "noise_ema_init": self._noise_ema_init, "profile": self._profile,
                "core_state": self._core.state_dict(), "extras": extras,
                "other": self.state._other,
            },
        }

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        upgd = state.pop("_upgd_ref", None)
        state.pop("state", None)
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in _ADAPTIVE_NOISE_DEFAULTS.items():
                group.setdefault(key, default)
        upgd = upgd or {}
        core_state = upgd.get("core_state")
        self._backend = upgd.get("backend", "auto")
        self._noise_ema_init = upgd.get("noise_ema_init", 1.0)
        self._profile = upgd.get("profile", type(self)._DEFAULT_PROFILE)
        self._seed = core_state["seed"] if core_state else _draw_seed()
        self._noise_norm = core_state["noise_norm"] if core_state else "segment"
        self._core = None
        self._bucket = None
        self._index = {}
        self._extras = {}
        self.last_step_info = None
        self._built = False
        if core_state is not None:
            core_state = dict(core_state, param_groups=self._core_groups())
        self._rebuild(restore=core_state, unpickled=True)
        params = self._bucket.params
        self._extras = {id(params[i]): (params[i], v) for i, v in upgd.get("extras", {}).items()}
        self.state = _StateView(self)
        self.state._other = upgd.get("other", {})
        self._built = True



def _check_noise_options(noise_beta, min_noise_std) -> None:
    """The production class's messages for the adaptive-noise options."""
    if not 0.0 <= noise_beta < 1.0:
        raise ValueError(f"Invalid noise_beta parameter: {noise_beta}")
    if not 0.0 <= min_noise_std:
        raise ValueError(f"Invalid min_noise_std value: {min_noise_std}")


class AdaptiveUPGD(_UPGDAdapter):
    """Drop-in replacement for the production ``AdaptiveUPGD`` (a ``torch.optim.Optimizer``).

    Same constructor, defaults, validation errors, param-group keys, ``state[p]`` keys and
    state-dict format as the production class; the step runs in :class:`upgd_ref.AdaptiveUPGD`
    on a flat buffer that the parameters are re-homed into. Keyword-only extras:

    * ``seed``: noise seed (int in ``[0, 2**64)``); ``None`` draws one from torch's global
      generator. Step ``k``'s normals are ``upgd_ref.noise(optimizer.layout, seed, k)``.
    * ``backend``: core backend name (``"auto"``: the fastest for NumPy buffers).
    * ``noise_ema_init``: start value of the gradient-norm average (1.0 as production; 0.0
      is the unbiased form); ``noise_norm``: ``"segment"`` (production) or ``"global"``.
    * ``profile``: ``"production"`` or ``"paper"`` (the paper's Adam-style UPGD,
      ``specs/algorithm.md`` §7; ``eps`` then defaults to ``1e-5``).
    """

    def __init__(self, params, lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001,
                 beta1=0.9, beta2=0.999, eps=None, adaptive_noise=False, noise_beta=0.999,
                 min_noise_std=1e-6, instant_noise_scale=True, *, seed=None, backend="auto",
                 noise_ema_init=1.0, noise_norm="segment", profile="production"):
        _check_profile(profile)
        if eps is None:  # 1e-8 (production), 1e-5 (the paper's code)
            eps = PAPER_EPS if profile == "paper" else 1e-8
        # The production class's checks and messages, then the core's (types, finiteness).
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= beta_utility < 1.0:
            raise ValueError(f"Invalid beta_utility parameter: {beta_utility}")
        if not 0.0 <= sigma:
            raise ValueError(f"Invalid sigma value: {sigma}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1 parameter: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2 parameter: {beta2}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps value: {eps}")
        _check_noise_options(noise_beta, min_noise_std)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
            beta2=beta2, eps=eps, adaptive_noise=adaptive_noise, noise_beta=noise_beta,
            min_noise_std=min_noise_std, instant_noise_scale=instant_noise_scale,
        )
        self._setup(params, defaults, seed=seed, backend=backend, noise_ema_init=noise_ema_init,
                    noise_norm=noise_norm, profile=profile)


#: Param-group keys of :class:`UPGD` (the production plain UPGD's, then the adaptive-noise options).
UPGD_HYPERPARAMETER_KEYS = ("lr", "weight_decay", "beta_utility", "sigma", *HYPERPARAMETER_KEYS[7:])
#: Param-group keys of :class:`UPGDW` (the production UPGDW's, then the adaptive-noise options).
UPGDW_HYPERPARAMETER_KEYS = ("lr", "betas", "eps", "weight_decay", "sigma", "amsgrad", *HYPERPARAMETER_KEYS[7:])


class UPGD(_UPGDAdapter):
    """Drop-in replacement for the production plain ``UPGD``: no moments (§7 of the algorithm).

    ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)``; ``state[p]`` holds ``step`` and
    ``avg_utility`` (and ``grad_norm_ema`` with adaptive noise). The step runs in
    :class:`upgd_ref.UPGD`. Keyword-only: the adaptive-noise options of :class:`AdaptiveUPGD`
    (also param-group keys), ``seed``, ``backend``, ``noise_ema_init``, ``noise_norm`` and
    ``profile`` (``"paper"``: the paper's plain UPGD).
    """

    _CORE = upgd_ref.UPGD
    _HYPER_KEYS = UPGD_HYPERPARAMETER_KEYS
    _STATE_KEYS = ("step", "avg_utility", "grad_norm_ema")
    _TENSOR_KEYS = {"avg_utility": "utility"}

    def __init__(self, params, lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001, *,
                 adaptive_noise=False, noise_beta=0.999, min_noise_std=1e-6, instant_noise_scale=True,
                 seed=None, backend="auto", noise_ema_init=1.0, noise_norm="segment", profile="production"):
        _check_profile(profile)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= beta_utility < 1.0:
            raise ValueError(f"Invalid beta_utility parameter: {beta_utility}")
        if not 0.0 <= sigma:
            raise ValueError(f"Invalid sigma value: {sigma}")
        _check_noise_options(noise_beta, min_noise_std)
        defaults = dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                        adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                        instant_noise_scale=instant_noise_scale)
        self._setup(params, defaults, seed=seed, backend=backend, noise_ema_init=noise_ema_init,
                    noise_norm=noise_norm, profile=profile)


class UPGDW(_UPGDAdapter):
    """Drop-in replacement for the production ``UPGDW``: AdaptiveUPGD with ``beta_utility = beta2``.

    Param groups carry ``betas`` (torch convention), mapped to the core's ``beta1``/``beta2``
    and ``beta_utility = betas[1]`` at every step. ``amsgrad=True`` (constructor or param
    group) raises ``ValueError``: the algorithm keeps no AMSGrad state. ``state[p]`` holds the
    :class:`AdaptiveUPGD` keys. The step runs in :class:`upgd_ref.UPGDW`. Keyword-only: the
    adaptive-noise options (also param-group keys), ``seed``, ``backend``,
    ``noise_ema_init``, ``noise_norm``.
    """

    _CORE = upgd_ref.UPGDW
    _HYPER_KEYS = UPGDW_HYPERPARAMETER_KEYS
    _DEFAULT_PROFILE = None

    @classmethod
    def _core_hyper(cls, where: str, group) -> dict:
        if _as_float(f"{where}['amsgrad']", group["amsgrad"]):
            raise ValueError(f"{where}: amsgrad=True is not supported: UPGDW keeps no AMSGrad state "
                             "(specs/algorithm.md §7.2)")
        betas = group["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"{where}['betas'] must be a pair (beta1, beta2), got {betas!r}") from None
        hyper = {k: _as_hyper(f"{where}['{k}']", k, group[k]) for k in cls._HYPER_KEYS if k not in ("betas", "amsgrad")}
        betas = {"beta1": _as_hyper(f"{where}['betas'][0]", "beta1", beta1),
                 "beta2": _as_hyper(f"{where}['betas'][1]", "beta2", beta2)}
        validate_upgd(betas, where=f"{where}['betas']: ")  # name the key the user set, not beta_utility
        return hyper | betas | {"beta_utility": betas["beta2"]}

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, sigma=0.001,
                 amsgrad=False, *, adaptive_noise=False, noise_beta=0.999, min_noise_std=1e-6,
                 instant_noise_scale=True, seed=None, backend="auto", noise_ema_init=1.0, noise_norm="segment"):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported: UPGDW keeps no AMSGrad state (specs/algorithm.md §7.2)")
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= sigma:
            raise ValueError(f"Invalid sigma value: {sigma}")
        _check_noise_options(noise_beta, min_noise_std)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sigma=sigma, amsgrad=amsgrad,
                        adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                        instant_noise_scale=instant_noise_scale)
        self._setup(params, defaults, seed=seed, backend=backend, noise_ema_init=noise_ema_init,
                    noise_norm=noise_norm, profile=None)

# --- VarianceGradientScaler -------------------------------------------------------------


class VarianceGradientScaler:
    """Drop-in replacement for the production ``VarianceGradientScaler``.

    Same constructor, methods, attributes (``enabled``, ``beta``, ``alpha``, ``eps``,
    ``warmup_steps``, ``min_scaling_factor``, ``variance_cap``, ``track_per_param``),
    logged metric names and state-dict format (``vgs_version`` ``"3.2"``); the factor and
    the statistics are computed by :class:`upgd_ref.VarianceGradientScaler`. ``backend``
    (keyword-only) selects the core backend.

    When the scaler's parameters are consecutive parameters of an :class:`AdaptiveUPGD`
    (e.g. both built from ``model.parameters()``), it works on that optimizer's flat
    gradient buffer directly; otherwise it copies the gradients to a buffer of its own.
    """

    _HYPER = ("enabled", "beta", "alpha", "eps", "warmup_steps", "min_scaling_factor", "variance_cap")

    def __init__(self, parameters=None, enabled=True, beta=0.99, alpha=0.1, eps=1e-8, warmup_steps=100,
                 track_per_param=False, logger=None, min_scaling_factor=0.1, variance_cap=50.0, *,
                 backend="auto"):
        if beta <= 0.0 or beta >= 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        if alpha < 0.0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
        if min_scaling_factor <= 0.0 or min_scaling_factor > 1.0:
            raise ValueError(f"min_scaling_factor must be in (0, 1], got {min_scaling_factor}")
        if variance_cap is not None and variance_cap <= 0.0:
            raise ValueError(f"variance_cap must be positive when set, got {variance_cap}")
        hyper = dict(enabled=bool(enabled), beta=float(beta), alpha=float(alpha), eps=float(eps),
                     warmup_steps=int(warmup_steps), min_scaling_factor=float(min_scaling_factor),
                     variance_cap=float(variance_cap) if variance_cap is not None else None)
        self._hyper = validate_vgs(hyper)
        self._backend = check_backend_name(backend)
        self.track_per_param = True  # as production: always per parameter
        self._logger = logger
        self._parameters = None
        self._core = None  # upgd_ref.VarianceGradientScaler, once there are statistics
        self._k = 0  # the step count while there is no core
        self._scratch = None
        if parameters is not None:
            self._attach(list(parameters), self._k)

    # production attributes, backed by one dict that is handed to the core at each use
    def _hyper_property(name):  # noqa: N805
        def get(self):
            return self._hyper[name]

        def set_(self, value):
            self._hyper[name] = value

        return property(get, set_, doc=f"The ``{name}`` hyper-parameter (validated when used).")

    enabled = _hyper_property("enabled")
    beta = _hyper_property("beta")
    alpha = _hyper_property("alpha")
    eps = _hyper_property("eps")
    warmup_steps = _hyper_property("warmup_steps")
    min_scaling_factor = _hyper_property("min_scaling_factor")
    variance_cap = _hyper_property("variance_cap")
    del _hyper_property

    @property
    def _step_count(self) -> int:
        return self._core.state.step if self._core is not None else self._k

    @_step_count.setter
    def _step_count(self, value) -> None:
        value = _as_step("VarianceGradientScaler._step_count", value)
        if self._core is not None:
            self._core.state.step = value
        else:
            self._k = value

    @property
    def core(self):
        """The core scaler (None while the scaler has neither parameters nor statistics)."""
        return self._core

    def _new_core(self, layout: FlatLayout, step: int):
        core = upgd_ref.VarianceGradientScaler(layout, backend=self._backend, **validate_vgs(self._hyper))
        core.state.step = step
        return core

    def _attach(self, params, step: int) -> None:
        names = [f"parameters[{k}] {_describe_shape(p)}" for k, p in enumerate(params)]
        if params:
            dtype = _check_tensors(params, names, what="VarianceGradientScaler", rehome=False)
            layout = FlatLayout([tuple(p.shape) for p in params], _DTYPE_NAMES[dtype])
            core = self._new_core(layout, step)
        else:
            core = None
        self._parameters, self._names, self._core, self._k, self._scratch = params, names, core, step, None

    def _push(self) -> None:
        self._core.hyperparams = validate_vgs(dict(self._hyper))

    def _log(self, key: str, value: float) -> None:
        if self._logger is None:
            return
        record = getattr(self._logger, "record", None)
        if callable(record):
            try:
                record(key, float(value))
            except Exception:  # noqa: BLE001 - as production: logging never breaks training
                pass

    def _grads(self):
        """``(flat NumPy gradient buffer, present, finish)`` for the current ``.grad``\\ s.

        ``finish(factor)`` publishes a successful operation: gradients copied into an
        optimizer's flat buffer are re-pointed there; with a private buffer, scaled values
        are copied back into ``.grad`` when the factor is not 1.
        """
        params, layout = self._parameters, self._core.layout
        run = _bucket_run(params)
        if run is not None:
            bucket, start = run
            offset = bucket.layout.offsets[start]
            if all(bucket.layout.offsets[start + k] - offset == layout.offsets[k] for k in range(len(params))):
                present, copied = bucket.gather_grads(start, start + len(params))
                return bucket.grad_flat[offset: offset + layout.size], present, lambda factor: bucket.adopt_grads(copied)
        if self._scratch is None:
            flat_buffer, flat = _flat_buffer(layout, params[0].device)
            self._scratch = (flat_buffer, [flat[layout.segment_slice(i)].view(s) for i, s in enumerate(layout.shapes)])
        flat_buffer, views = self._scratch
        present = []
        with torch.no_grad():
            for name, p, view in zip(self._names, params, views):
                g = p.grad
                if g is None:
                    present.append(False)
                    continue
                if g.layout != torch.strided:
                    raise TypeError(f"VarianceGradientScaler: {name}: sparse gradients ({g.layout}) are not supported")
                if g.is_complex():
                    raise TypeError(f"VarianceGradientScaler: {name}: complex gradients are not supported")
                present.append(True)
                view.copy_(g)

        def finish(factor):
            if factor != 1.0:
                with torch.no_grad():
                    for p, view, is_present in zip(params, views, present):
                        if is_present:
                            p.grad.copy_(view)

        return flat_buffer, present, finish

    # --- production API ---------------------------------------------------------------

    def update_parameters(self, parameters) -> None:
        """Track ``parameters`` from now on; statistics restart at zero, the step count stays."""
        self._attach(list(parameters), self._step_count)

    def scale_gradients(self) -> float:
        """Multiply every present gradient by the factor in place; return the factor."""
        if self._parameters is None:
            return 1.0
        if self._core is None or self._core.layout.num_segments == 0:
            return self.get_scaling_factor()
        self._push()
        buffer, present, finish = self._grads()
        try:
            with _on_stream(self._parameters[0].device):
                factor = self._core.scale(buffer, present)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"VarianceGradientScaler.scale_gradients: {_segment_note(exc, self._names)}") from exc
        finish(factor)
        return float(factor)

    def step(self) -> None:
        """Advance the step count and update the statistics from the (scaled) gradients."""
        if self._parameters and self._core is not None:
            self._push()
            buffer, present, finish = self._grads()
            try:
                with _on_stream(self._parameters[0].device):
                    self._core.update(buffer, present)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"VarianceGradientScaler.step: {_segment_note(exc, self._names)}") from exc
            finish(1.0)
        elif self._core is not None:
            self._core.state.step += 1
        else:
            self._k += 1
        self._log("vgs/normalized_variance", self.get_normalized_variance())
        self._log("vgs/scaling_factor", self.get_scaling_factor())
        self._log("vgs/step_count", float(self._step_count))
        self._log("vgs/warmup_active", float(self._step_count < self._hyper["warmup_steps"]))

    def get_scaling_factor(self) -> float:
        """The factor ``f`` the next :meth:`scale_gradients` applies."""
        if self._core is None:
            validate_vgs(dict(self._hyper))
            return 1.0  # no statistics: the normalised variance is 0
        self._push()
        return float(self._core.scaling_factor())

    def get_normalized_variance(self) -> float:
        """The 0.9 quantile of the per-parameter normalised variances, clipped to ``[0, 1e6]``
        (before ``variance_cap``, as the production method returns it)."""
        if self._core is None:
            return 0.0
        self._push()
        nv = self._core.segment_normalized_variances()
        return float(_ref.vgs_global_variance(nv, variance_cap=None))

    def reset_statistics(self) -> None:
        """Step count and statistics back to zero."""
        if self._core is not None:
            self._core.reset_statistics()
        self._k = 0

    def state_dict(self) -> dict:
        """The production format (``vgs_version`` ``"3.2"``); statistics as float64 tensors."""
        core = self._core
        has_stats = core is not None and core.layout.num_segments > 0
        numel = [float(s) for s in core.layout.sizes] if has_stats else None
        state = {
            "enabled": self._hyper["enabled"], "beta": self._hyper["beta"], "alpha": self._hyper["alpha"],
            "eps": self._hyper["eps"], "warmup_steps": self._hyper["warmup_steps"], "step_count": self._step_count,
            "min_scaling_factor": self._hyper["min_scaling_factor"], "variance_cap": self._hyper["variance_cap"],
            "param_grad_mean_ema": torch.from_numpy(core.state.grad_mean_avg.copy()) if has_stats else None,
            "param_grad_sq_ema": torch.from_numpy(core.state.grad_sq_avg.copy()) if has_stats else None,
            "param_numel": torch.tensor(numel, dtype=torch.float32) if has_stats else None,
        }
        state.update({key: None for key in _VGS_LEGACY_KEYS})
        state["vgs_version"] = VGS_VERSION
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the production format (versions 3.1 and 3.2 keep statistics; older ones reset
        them with a warning, as production) or a core ``upgd_ref`` VGS state dict.

        Statistics may be float32 or float64 tensors, arrays, lists or None (no statistics
        yet). Invalid input raises and changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if state_dict.get("format") == VGS_FORMAT:
            self._load_core_format(state_dict)
            return
        hyper = {name: state_dict.get(name, self._hyper[name]) for name in self._HYPER}
        hyper["min_scaling_factor"] = state_dict.get("min_scaling_factor", 0.1)
        hyper["variance_cap"] = state_dict.get("variance_cap", 50.0)
        hyper = validate_vgs({k: _as_float(k, v) if isinstance(v, torch.Tensor) else v for k, v in hyper.items()},
                             where="VGS state dict: ")
        step = _as_step("VGS state dict 'step_count'", state_dict.get("step_count", 0))
        version = str(state_dict.get("vgs_version", "1.0"))
        stats = None
        if version in _VGS_STAT_VERSIONS:
            mean = state_dict.get("param_grad_mean_ema")
            square = state_dict.get("param_grad_sq_ema")
            if (mean is None) != (square is None):
                raise ValueError("VGS state dict: 'param_grad_mean_ema' and 'param_grad_sq_ema' must both be set or both be None")
            if mean is not None:
                stats = [self._stat_vector(name, value) for name, value in
                         (("param_grad_mean_ema", mean), ("param_grad_sq_ema", square))]
                if stats[0].shape != stats[1].shape:
                    raise ValueError("VGS state dict: 'param_grad_mean_ema' and 'param_grad_sq_ema' differ in length")
                if (stats[1] < 0).any():
                    raise ValueError("VGS state dict: 'param_grad_sq_ema' must be >= 0")
                expected = len(self._parameters) if self._parameters is not None else None
                if expected is not None and stats[0].shape[0] != expected:
                    raise ValueError(f"VGS state dict has statistics for {stats[0].shape[0]} parameters, "
                                     f"this scaler tracks {expected}")
        else:
            warnings.warn(
                f"Loading VGS checkpoint from version {version}: its per-parameter statistics use the "
                "pre-3.1 definition and are reset (as the production scaler does); training continues.",
                UserWarning, stacklevel=2,
            )
        # Everything is checked: apply.
        self._hyper = hyper
        if self._parameters:
            core = self._new_core(self._core.layout, step)
        elif stats is not None:
            core = self._new_core(FlatLayout([(0,)] * stats[0].shape[0], "float64"), step)
        else:
            core = None
        if core is not None and stats is not None:
            core.state.grad_mean_avg[...] = stats[0]
            core.state.grad_sq_avg[...] = stats[1]
        self._core, self._k = core, step

    @staticmethod
    def _stat_vector(name: str, value) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            if value.is_complex() or not value.is_floating_point():
                raise TypeError(f"VGS state dict: {name!r} must be a real floating tensor, got {value.dtype}")
            value = value.detach().cpu().double().numpy()
        try:
            array = np.array(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"VGS state dict: {name!r} must be a vector of floats ({exc})") from None
        if array.ndim != 1:
            raise ValueError(f"VGS state dict: {name!r} must be 1-D, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"VGS state dict: {name!r} holds non-finite values")
        return array

    def _load_core_format(self, state_dict) -> None:
        if self._core is None or not self._parameters:
            raise ValueError("a core-format VGS state dict needs the scaler's parameters (update_parameters first)")
        core = self._new_core(self._core.layout, 0)
        core.load_state_dict(state_dict)
        self._core, self._hyper = core, dict(core.hyperparams)

    # --- pickling (without parameters and logger, as production) -----------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_logger", "_parameters", "_scratch", "_names"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._logger = None
        self._parameters = None
        self._names = []
        self._scratch = None

    def __repr__(self) -> str:
        h = self._hyper
        return (
            f"VarianceGradientScaler(enabled={h['enabled']}, beta={h['beta']}, alpha={h['alpha']}, "
            f"eps={h['eps']}, warmup_steps={h['warmup_steps']}, min_scaling_factor={h['min_scaling_factor']}, "
            f"variance_cap={h['variance_cap']}, step_count={self._step_count}, version={VGS_VERSION})"
        )
