"""Benchmark: the PyTorch adapter's step against the raw core step and a production-style
per-tensor PyTorch step, on the same parameter shapes (default 10M float32 in 16 tensors).

Run: ``python benchmarks/bench_torch_adapter.py [--numel N] [--tensors T] [--reps R]``.

All rows are timed side by side in one process, round-robin (repetition ``r`` of every row
before repetition ``r + 1`` of any, so drift on a shared machine hits all rows alike), after
an untimed warm-up; gradients a row scales in place are restored outside the timing. The
table shows the median and the minimum per call, and the ratios the targets are stated in:

* adapter / core (target <= 1.15): the adapter's bookkeeping over the raw core step on the
  same parameters (``upgd_ref.AdaptiveUPGD.step`` on flat NumPy buffers);
* production / adapter (target: the core's >= 8x): the production algorithm as users run it
  today (``benchmarks/production_torch.py``, ``torch_production_step``: per-tensor loop, VGS, adaptive noise,
  ``.item()`` reads, ``torch.randn_like``) against the adapter's full step
  (``scale_gradients``, ``step``, ``VarianceGradientScaler.step``), and against the core's
  fused full step (``AdaptiveUPGD.step(..., vgs=scaler)``), the core's own headline.

"grads in place" is the steady state after ``zero_grad(set_to_none=False)``: autograd
accumulates straight into the flat gradient buffer and the step copies nothing. "grads
gathered" is the default ``zero_grad()`` (``set_to_none=True``): backward makes fresh
gradient tensors, which are copied into the flat buffer once per step.
Nothing here asserts a time: the script prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import upgd_ref
from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler
from upgd_ref.backends import auto_order
from production_torch import torch_production_step, torch_vgs_state  # benchmarks/, next to this file
from upgd_ref.hyperparams import UPGD_DEFAULTS

# The core benchmark's hyper-parameters (upgd_ref.bench.STEP_HYPER), so the ratios are comparable.
STEP_HYPER = dict(lr=1e-3, weight_decay=1e-3, sigma=0.01, adaptive_noise=True)
NOISE_EMA_INIT = 0.0
VGS_HYPER = dict(warmup_steps=0)


def shapes_for(numel: int, tensors: int) -> list[tuple[int, ...]]:
    """``tensors`` shapes of growing sizes (matrices of 1024 columns and vectors) summing to ``numel``."""
    weights = np.linspace(1.0, 3.0, tensors)
    sizes = np.floor(weights / weights.sum() * numel).astype(int)
    out, used, carry = [], 0, 0
    for i, size in enumerate(sizes):
        size = int(size) + carry
        if i == tensors - 1:
            out.append((numel - used,))
            break
        if i % 2 == 0 and size >= 1024:
            rows = size // 1024
            out.append((rows, 1024))
            carry = size - rows * 1024
        else:
            out.append((size,))
            carry = 0
        used += int(np.prod(out[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    shapes = shapes_for(args.numel, args.tensors)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads0 = [torch.randn(s, generator=gen, dtype=dtype) * 0.1 for s in shapes]
    layout = upgd_ref.FlatLayout(shapes, args.dtype)
    flat_grads0 = layout.pack([g.numpy() for g in grads0])

    def core_case(fused: bool):
        params, grads = layout.pack([t.numpy() for t in init]), flat_grads0.copy()
        opt = upgd_ref.AdaptiveUPGD(layout, seed=1, noise_ema_init=NOISE_EMA_INIT, **STEP_HYPER)
        if not fused:
            return lambda: opt.step(params, grads), None
        vgs = upgd_ref.VarianceGradientScaler(layout, **VGS_HYPER)
        return lambda: opt.step(params, grads, vgs=vgs), lambda: np.copyto(grads, flat_grads0)

    def adapter(with_vgs: bool):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = AdaptiveUPGD(params, seed=1, noise_ema_init=NOISE_EMA_INIT, **STEP_HYPER)
        vgs = VarianceGradientScaler(params, **VGS_HYPER) if with_vgs else None
        return params, opt, vgs

    in_place_params, in_place_opt, _ = adapter(False)
    for p, g in zip(in_place_params, grads0):
        p.grad = g.clone()
    in_place_opt.step()  # from now on the gradients are flat-buffer views

    gathered_params, gathered_opt, _ = adapter(False)
    fresh = [g.clone() for g in grads0]

    def gathered_prepare():
        for p, g in zip(gathered_params, fresh):
            p.grad = g  # not a view of the flat buffer: copied in by the step

    full_params, full_opt, full_vgs = adapter(True)
    full_grads = [g.clone() for g in grads0]

    def full_prepare():  # the default zero_grad(): fresh gradient tensors every step
        for p, g, g0 in zip(full_params, full_grads, grads0):
            g.copy_(g0)
            p.grad = g

    def full_step():
        full_vgs.scale_gradients()
        full_opt.step()
        full_vgs.step()

    prod_params = [torch.nn.Parameter(t.clone()) for t in init]
    for p, g in zip(prod_params, grads0):
        p.grad = g.clone()
    states, prod_vgs = {}, torch_vgs_state(len(prod_params), **VGS_HYPER)
    prod_hyper = {**UPGD_DEFAULTS, **STEP_HYPER, "noise_ema_init": NOISE_EMA_INIT}

    def prod_prepare():
        for p, g in zip(prod_params, grads0):
            p.grad.copy_(g)

    rows = {
        "core step": core_case(False),
        "adapter step (grads in place)": (in_place_opt.step, None),
        "adapter step (grads gathered)": (gathered_opt.step, gathered_prepare),
        "core full step (fused VGS)": core_case(True),
        "adapter full step (VGS, grads gathered)": (full_step, full_prepare),
        "production per-tensor PyTorch loop": (
            lambda: torch_production_step(torch, prod_params, states, prod_vgs, prod_hyper), prod_prepare),
    }
    for call, prepare in rows.values():  # warm-up: kernel compilation, first-touch page faults
        if prepare:
            prepare()
        call()
    times = {name: [] for name in rows}
    for _ in range(args.reps):
        for name, (call, prepare) in rows.items():
            if prepare:
                prepare()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.numel:,} {args.dtype} parameters in {len(shapes)} tensors, median of {args.reps}, "
          f"core backend {auto_order()[0]!r}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          "adaptive noise on")
    print(f"{'row':<42} {'median ms':>10} {'min ms':>9}")
    for name, ts in times.items():
        print(f"{name:<42} {1e3 * med[name]:>10.1f} {1e3 * min(ts):>9.1f}")
    print()
    core, prod = med["core step"], med["production per-tensor PyTorch loop"]
    print("target adapter / core step <= 1.15:  "
          f"grads in place {med['adapter step (grads in place)'] / core:.2f}x, "
          f"grads gathered {med['adapter step (grads gathered)'] / core:.2f}x")
    print("target production / adapter >= 8:    "
          f"{prod / med['adapter full step (VGS, grads gathered)']:.1f}x "
          f"(core's own: production / core full step {prod / med['core full step (fused VGS)']:.1f}x)")


if __name__ == "__main__":
    main()
