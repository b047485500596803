"""Parameters and gradients re-homed into the core's flat, 64-byte aligned buffers.

A :class:`Bucket` holds one flat parameter buffer and one flat gradient buffer of a
layout; ``p.data`` becomes a view of its segment (the approach of DDP's
``gradient_as_bucket_view``) and ``p.grad`` points at a view of the gradient buffer where
it can. CPU tensors share memory with NumPy arrays, CUDA tensors with CuPy arrays (DLPack,
no copy), whose kernels run on torch's current stream (:func:`on_stream`).
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from upgd_ref.backends import BACKENDS
from upgd_ref.layout import FlatLayout

from .conversions import DTYPE_NAMES, TORCH_DTYPES
from .gather import as_param, real_dtype, write_back

# Which flat buffer a parameter currently lives in: param -> (weakref to Bucket, segment).
_HOME = WeakIdKeyDictionary()


def homed_in(p: torch.Tensor):
    """``(bucket, segment)`` when ``p.data`` is currently a view of a live bucket, else None."""
    entry = _HOME.get(p)
    if entry is None:
        return None
    bucket = entry[0]()
    if bucket is None or not bucket.is_homed(entry[1]):
        return None
    return bucket, entry[1]


def check_tensors(tensors, names, *, what: str) -> list[torch.dtype]:
    """Each tensor's real dtype (:func:`~.gather.real_dtype`) after checking it can go to
    the core (real or complex floating, dense, on one device). Raises before anything is
    modified."""
    if not tensors:
        raise ValueError(f"{what}: no parameters")
    seen: dict[int, int] = {}
    devices = {}
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
        if real_dtype(p) not in DTYPE_NAMES:
            raise TypeError(f"{what}: {name} has dtype {p.dtype}; only torch.float32, float64, float16, bfloat16, "
                            "complex64 and complex128 are supported")
        if p.dtype == torch.bfloat16 and p.device.type == "cuda":
            raise TypeError(f"{what}: {name} is a bfloat16 CUDA tensor; CuPy has no bfloat16 (specs/precision.md "
                            "§6): keep bfloat16 parameters on the CPU, or use float16 on the GPU")
        devices.setdefault(str(p.device), name)
    if len(devices) > 1:
        listing = ", ".join(f"{d} ({n})" for d, n in devices.items())
        raise ValueError(f"{what}: parameters on several devices: {listing}; one optimizer or scaler "
                         "takes the parameters of one device")
    device = next(iter(devices))
    if not device.startswith("cpu") and not (device.startswith("cuda") and "cupy" in BACKENDS):
        raise ValueError(f"{what}: parameters on {device}: upgd_ref takes CPU tensors, and CUDA tensors "
                         "when CuPy is installed (pip install cupy-cuda12x)")
    return [real_dtype(p) for p in tensors]


def deduplicate(group: dict) -> None:
    """A param group's parameters (and ``param_names``) with each tensor kept once, in place
    (torch warns about a parameter listed twice and would step it twice)."""
    params = group["params"]
    first = {}
    for j, p in enumerate(params):
        first.setdefault(id(p), j)
    if len(first) == len(params):
        return
    keep = sorted(first.values())
    group["params"] = [params[j] for j in keep]
    if "param_names" in group:
        group["param_names"] = [group["param_names"][j] for j in keep]


def check_grad(what: str, g: torch.Tensor, p: torch.Tensor) -> None:
    """A gradient the core can take for parameter ``p``: dense, complex only for a complex
    parameter (``what`` names it in errors)."""
    if g.layout != torch.strided:
        raise TypeError(f"{what}: sparse gradients ({g.layout}) are not supported")
    if g.is_complex() and not p.is_complex():
        raise TypeError(f"{what}: a complex gradient of a real parameter is not supported")


def segment_views(flat: torch.Tensor, layout: FlatLayout) -> list[torch.Tensor]:
    """One tensor per segment of ``layout``, in its shape, sharing memory with ``flat``."""
    return [flat[layout.segment_slice(i)].view(s) for i, s in enumerate(layout.shapes)]


def flat_buffer(layout: FlatLayout, device: torch.device):
    """``(core buffer, segment views)`` sharing one zeroed flat buffer of the layout: a 64-byte
    aligned NumPy array on the CPU, a CuPy view of a CUDA tensor (DLPack, no copy) on a GPU
    (CUDA allocations are at least 256-byte aligned); the views as :func:`segment_views`."""
    if device.type == "cpu":
        array = layout.zeros()
        return array, segment_views(tensor_view(array), layout)
    import cupy

    tensor = torch.zeros(layout.size, dtype=TORCH_DTYPES[layout.dtype.name], device=device)
    return cupy.from_dlpack(tensor), segment_views(tensor, layout)


def tensor_view(array) -> torch.Tensor:
    """A core buffer (NumPy or CuPy) as a tensor sharing its memory (a bfloat16 NumPy buffer,
    which ``torch.from_numpy`` does not know, through its bits)."""
    if isinstance(array, np.ndarray):
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


@contextlib.contextmanager
def on_stream(device: torch.device):
    """On a GPU, make CuPy launch on torch's current stream (kernels stay ordered with torch's)."""
    if device.type != "cuda":
        yield
        return
    import cupy

    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        yield


class Bucket:
    """One flat parameter buffer and one flat gradient buffer (64-byte aligned) of one dtype
    on the parameters' device: NumPy arrays for CPU tensors, CuPy views of CUDA tensors otherwise.

    ``param_views[i]`` / ``grad_views[i]`` are tensors sharing memory with segment ``i`` (no
    copy), as the parameter sees them (complex for a complex parameter). ``rehomed[i]``:
    :meth:`home` makes the view the parameter's storage; otherwise the parameter is gathered
    into it before each step (:meth:`ensure_homed`) and written back after a committed one
    (:meth:`scatter`). ``segment_by_id`` maps ``id(param)`` to its segment.
    """

    def __init__(self, params, layout: FlatLayout, names, rehomed):
        self.params = list(params)
        self.names = list(names)
        self.layout = layout
        self.rehomed = list(rehomed)
        self.device = params[0].device if params else torch.device("cpu")
        self.param_flat, real_params = flat_buffer(layout, self.device)
        self.grad_flat, real_grads = flat_buffer(layout, self.device)
        self.param_views = [as_param(v, p.is_complex()) for v, p in zip(real_params, self.params)]
        self.grad_views = [as_param(v, p.is_complex()) for v, p in zip(real_grads, self.params)]
        self.param_ptrs = [v.data_ptr() for v in self.param_views]
        self.grad_ptrs = [v.data_ptr() for v in self.grad_views]
        self.shapes = [p.shape for p in self.params]
        self.dtypes = [p.dtype for p in self.params]
        self.segment_by_id = {id(p): i for i, p in enumerate(self.params)}

    def is_homed(self, i: int) -> bool:
        p = self.params[i]
        return (self.rehomed[i] and p.data_ptr() == self.param_ptrs[i] and p.dtype == self.dtypes[i]
                and p.shape == self.shapes[i] and p.is_contiguous())

    def moved(self) -> bool:
        """Whether a parameter's dtype or device differs from its segment's (``model.to(...)``)."""
        return any(p.dtype != d or p.device != self.device for p, d in zip(self.params, self.dtypes))

    def home(self) -> None:
        """Copy every parameter (and existing gradient) in; re-point the re-homed ones and the
        gradients at their segments."""
        ref = weakref.ref(self)
        done = []
        try:
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    old_data, grad = p.data, p.grad
                    self.param_views[i].copy_(old_data)
                    if self.rehomed[i]:
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
        """Gather the gathered parameters; re-home re-homed ones whose ``.data`` was replaced
        since (``p.data = ...``, another optimizer)."""
        ref = weakref.ref(self)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if not self.rehomed[i]:
                    self.param_views[i].copy_(p.data)
                    continue
                if self.is_homed(i):
                    continue
                if p.shape != self.shapes[i] or p.layout != torch.strided:
                    raise ValueError(
                        f"{self.names[i]} changed to shape {tuple(p.shape)}, layout {p.layout} since the optimizer "
                        f"was built (shape {tuple(self.shapes[i])}); create the optimizer after reshaping the model")
                self.param_views[i].copy_(p.data)
                p.data = self.param_views[i]
                _HOME[p] = (ref, i)

    def scatter(self, present) -> None:
        """Write the new values of the present gathered parameters back, in segment order (where
        gathered parameters overlap, the later segment's values win)."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if present[i] and not self.rehomed[i]:
                    write_back(p, self.param_views[i])

    def gather_grads(self, start: int = 0, stop: int | None = None):
        """``(present, copied)`` for segments ``start:stop``; gradients that are not views of
        this bucket are copied into it (``copied`` lists them, for :meth:`adopt_grads`).

        Only segments no ``.grad`` points at are written, so a failure later leaves every
        user-visible tensor unchanged.
        """
        stop = len(self.params) if stop is None else stop
        present, copied = [], []
        for i in range(start, stop):
            p = self.params[i]
            g = p.grad
            if g is None:
                present.append(False)
                continue
            check_grad(self.names[i], g, p)
            present.append(True)
            if g.data_ptr() != self.grad_ptrs[i] or not g.is_contiguous() or g.dtype != self.dtypes[i]:
                copied.append(i)
        if copied:
            with torch.no_grad():
                for i in copied:
                    self.grad_views[i].copy_(self.params[i].grad)
        return present, copied

    def negate_grads(self, segments) -> None:
        """``g <- -g`` in place for these segments of the gradient buffer (exact)."""
        with torch.no_grad():
            for i in segments:
                self.grad_views[i].neg_()

    def adopt_grads(self, copied) -> None:
        """Point ``.grad`` of the copied segments at their views (next backward accumulates there)."""
        for i in copied:
            self.params[i].grad = self.grad_views[i]


def bucket_run(params):
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
