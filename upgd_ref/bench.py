"""``upgd-ref bench``: the Numba kernels against the NumPy reference and PyTorch, side by side.

Every row is timed in the same process, one row after the other, each after one untimed
warm-up call; a row's time is the median of its repetitions. Rows (``specs/kernels.md`` §6):

* numba full step: ``AdaptiveUPGD.step(params, grads, vgs=scaler)``, adaptive noise, VGS on;
* numba noise-free step: ``AdaptiveUPGD.step`` with ``sigma = 0``, no VGS;
* numba noise alone: ``upgd_ref.noise(..., out=buffer)`` (into an existing buffer, as
  ``torch.randn(n, out=buffer)``: the generators, not the allocator, are compared);
* NumPy reference step: the full step on ``backend="reference"``;
* with PyTorch installed: fused Adam (``torch.optim.Adam(fused=True)``), ``torch.randn`` of
  the same count, and a per-tensor PyTorch loop implementing the production algorithm (VGS,
  adaptive noise, ``.item()`` reductions, ``torch.randn_like``), as users run it today.

Gradients that a row scales in place are restored before each repetition, outside the timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .backends import BACKENDS
from .step import noise, warmup
from .hyperparams import UPGD_DEFAULTS, VGS_DEFAULTS
from .layout import FlatLayout
from .optimizer import AdaptiveUPGD
from .scaler import VarianceGradientScaler

__all__ = [
    "register", "run_benchmark", "format_report", "torch_production_step", "torch_vgs_state", "DEFAULT_SIZES",
    "TARGETS", "TARGET_SIZE",
]

DEFAULT_SIZES = (1_000_000, 10_000_000)
DEFAULT_DTYPES = ("float32", "float64")
DEFAULT_SEGMENTS = 16
DEFAULT_REPEATS = 7
SLOW_CALL_SECONDS = 0.5  # rows slower than this per call get MIN_SLOW_REPEATS repetitions
MIN_SLOW_REPEATS = 3

#: Performance targets, judged at :data:`TARGET_SIZE` float32 parameters on 2 threads:
#: ratio name -> (comparison, bound).
TARGETS = {
    "full_step_speedup_vs_torch_loop": (">=", 8.0),
    "noise_free_step_over_fused_adam": ("<=", 2.0),
    "noise_over_torch_randn": ("<=", 1.0),
}
TARGET_SIZE = 10_000_000

# Hyper-parameters of the benchmarked steps (production defaults where they do not matter).
_STEP_HYPER = dict(lr=1e-3, weight_decay=1e-3, sigma=0.01, adaptive_noise=True, noise_ema_init=0.0)
_VGS_HYPER = dict(warmup_steps=0)


@dataclass
class Row:
    size: int
    dtype: str
    name: str
    seconds: float  # median per call
    repeats: int

    @property
    def ns_per_param(self) -> float:
        return self.seconds / self.size * 1e9


@dataclass
class Case:
    """One benchmarked call: ``prepare()`` (untimed) then ``call()`` (timed)."""

    name: str
    call: Callable[[], object]
    prepare: Callable[[], object] = lambda: None


# --- the cases --------------------------------------------------------------------------


def _segment_shapes(size: int, segments: int) -> list[tuple[int]]:
    base = size // segments
    return [(base + (size - base * segments if i == segments - 1 else 0),) for i in range(segments)]


def _numpy_cases(layout: FlatLayout, rng: np.random.Generator) -> list[Case]:
    params0 = layout.pack([rng.standard_normal(s) for s in layout.shapes])
    grads0 = layout.pack([0.1 * rng.standard_normal(s) for s in layout.shapes])
    cases = []

    def full_step(backend):
        params, grads = params0.copy(), grads0.copy()
        opt = AdaptiveUPGD(layout, backend=backend, **_STEP_HYPER)
        vgs = VarianceGradientScaler(layout, backend=backend, **_VGS_HYPER)
        return lambda: opt.step(params, grads, vgs=vgs), lambda: np.copyto(grads, grads0)

    call, prepare = full_step("numba")
    cases.append(Case("numba full step (VGS + adaptive noise)", call, prepare))
    params_nf = params0.copy()
    opt_nf = AdaptiveUPGD(layout, backend="numba", **dict(_STEP_HYPER, sigma=0.0, adaptive_noise=False))
    cases.append(Case("numba noise-free step", lambda: opt_nf.step(params_nf, grads0)))
    counter, normals = iter(range(1, 2**62)), layout.zeros()
    cases.append(Case("numba noise alone", lambda: noise(layout, 0, next(counter), out=normals, backend="numba")))
    call, prepare = full_step("reference")
    cases.append(Case("NumPy reference step (VGS + adaptive noise)", call, prepare))
    return cases


def torch_production_step(torch, params, states: dict, vgs: dict, hyper: dict) -> None:
    """The production AdaptiveUPGD + VGS step on a list of tensors with ``.grad`` (one loop
    per pass over the tensors, ``.item()`` host reads, ``torch.randn_like`` noise).

    ``states``: per-tensor dicts (created on first use); ``vgs``: ``{"k", "a", "b"}`` with
    per-tensor lists and the VGS hyper-parameters. A tensor whose ``.grad`` is None sits the
    step out. Semantics: ``specs/algorithm.md``.
    """
    h = hyper
    present = [(i, p) for i, p in enumerate(params) if p.grad is not None]
    with torch.no_grad():
        factor = _torch_vgs_factor(torch, vgs)
        if factor != 1.0:
            for _, p in present:
                p.grad.mul_(factor)
        u_max, u_min = -math.inf, math.inf
        for _, p in present:
            state = states.setdefault(p, {
                "step": 0, "avg_utility": torch.zeros_like(p), "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p), "grad_norm_ema": h["noise_ema_init"],
            })
            state["step"] += 1
            g = p.grad
            state["avg_utility"].mul_(h["beta_utility"]).add_(-g * p, alpha=1 - h["beta_utility"])
            state["exp_avg"].mul_(h["beta1"]).add_(g, alpha=1 - h["beta1"])
            state["exp_avg_sq"].mul_(h["beta2"]).addcmul_(g, g, value=1 - h["beta2"])
            u_max = max(u_max, state["avg_utility"].max().item())
            u_min = min(u_min, state["avg_utility"].min().item())
        for _, p in present:
            state, t = states[p], states[p]["step"]
            exp_avg_hat = state["exp_avg"] / (1 - h["beta1"] ** t)
            exp_avg_sq_hat = state["exp_avg_sq"] / (1 - h["beta2"] ** t)
            norm = p.grad.norm().item()
            state["grad_norm_ema"] = h["noise_beta"] * state["grad_norm_ema"] + (1 - h["noise_beta"]) * norm
            if not h["instant_noise_scale"]:
                norm = state["grad_norm_ema"] / (1 - h["noise_beta"] ** t)
            noise = torch.randn_like(p.grad) * max(h["sigma"] * norm, h["min_noise_std"])
            x = ((state["avg_utility"] / (1 - h["beta_utility"] ** t) - u_min) / (u_max - u_min + 1e-8)).clamp_(0, 1)
            protection = torch.sigmoid(2 * (x - 0.5))
            update = (exp_avg_hat / (exp_avg_sq_hat.sqrt() + h["eps"]) + noise) * (1 - protection)
            p.mul_(1 - h["lr"] * h["weight_decay"]).add_(update, alpha=-h["lr"])
        vgs["k"] += 1
        for i, p in present:
            vgs["a"][i] = vgs["beta"] * vgs["a"][i] + (1 - vgs["beta"]) * p.grad.mean().item()
            vgs["b"][i] = vgs["beta"] * vgs["b"][i] + (1 - vgs["beta"]) * (p.grad * p.grad).mean().item()


def _torch_vgs_factor(torch, vgs: dict) -> float:
    """``f`` of the production scaler from its per-tensor statistics."""
    if not vgs["enabled"] or vgs["k"] < vgs["warmup_steps"] or vgs["k"] == 0:
        return 1.0
    c = 1 - vgs["beta"] ** vgs["k"]
    mu = torch.tensor(vgs["a"], dtype=torch.float64) / c
    s = torch.tensor(vgs["b"], dtype=torch.float64) / c
    nv = torch.clamp(s - mu * mu, min=0) / (torch.clamp(mu * mu, min=1e-12) + vgs["eps"])
    nv = torch.where(torch.isfinite(nv), nv, torch.zeros_like(nv))
    g = torch.quantile(nv, 0.9).clamp(0, 1e6).item()
    if vgs["variance_cap"] is not None:
        g = min(g, vgs["variance_cap"])
    return min(max(1 / (1 + vgs["alpha"] * g), vgs["min_scaling_factor"]), 1.0)


def torch_vgs_state(num_tensors: int, **overrides) -> dict:
    """Fresh production VGS statistics (hyper-parameters: the scaler's defaults + overrides)."""
    return {**VGS_DEFAULTS, **overrides, "k": 0, "a": [0.0] * num_tensors, "b": [0.0] * num_tensors}


def _torch_cases(torch, layout: FlatLayout, rng: np.random.Generator) -> list[Case]:
    dtype = getattr(torch, layout.dtype.name)
    n = layout.num_logical

    def tensors():
        params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s)).to(dtype)) for s in layout.shapes]
        grads0 = [torch.from_numpy(0.1 * rng.standard_normal(s)).to(dtype) for s in layout.shapes]
        for p, g in zip(params, grads0):
            p.grad = g.clone()
        return params, grads0

    adam_params, _ = tensors()
    adam = torch.optim.Adam(adam_params, lr=_STEP_HYPER["lr"], fused=True)
    prod_params, prod_grads0 = tensors()
    states, vgs = {}, torch_vgs_state(len(prod_params), **_VGS_HYPER)
    hyper = {**UPGD_DEFAULTS, **_STEP_HYPER}

    def restore():
        for p, g in zip(prod_params, prod_grads0):
            p.grad.copy_(g)

    normals = torch.empty(n, dtype=dtype)
    return [
        Case("torch fused Adam", adam.step),
        Case("torch.randn (same count)", lambda: torch.randn(n, dtype=dtype, out=normals)),
        Case("torch per-tensor loop (production: VGS + adaptive noise)",
             lambda: torch_production_step(torch, prod_params, states, vgs, hyper), restore),
    ]


# --- measuring --------------------------------------------------------------------------


class _Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def __call__(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _time_rows(cases: list[Case], repeats: int, progress: Callable[[str], None], label: str) -> dict:
    """``{name: (median seconds, repetitions)}``: each case after its own warm-up call.

    Cases run one after the other, not interleaved: Numba's and PyTorch's OpenMP worker
    threads spin for a while after each parallel region, and interleaving the two libraries
    would make each compete with the other's idle spinners.
    """
    out = {}
    for c in cases:
        progress(f"bench: {label}: {c.name}: warm-up")
        c.prepare()
        start = time.perf_counter()
        c.call()
        count = MIN_SLOW_REPEATS if time.perf_counter() - start > SLOW_CALL_SECONDS else repeats
        samples = []
        for r in range(count):
            progress(f"bench: {label}: {c.name}: {r + 1}/{count}")
            c.prepare()
            start = time.perf_counter()
            c.call()
            samples.append(time.perf_counter() - start)
        out[c.name] = (statistics.median(samples), count)
    return out


def _import_torch(enabled: bool):
    if not enabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def _ratios(rows: list[Row]) -> list[dict]:
    """The target ratios per (size, dtype) from the rows present."""
    out = []
    for size, dtype in dict.fromkeys((r.size, r.dtype) for r in rows):
        t = {r.name: r.seconds for r in rows if (r.size, r.dtype) == (size, dtype)}
        entry = {"size": size, "dtype": dtype}

        def ratio(key, numerator, denominator):
            if numerator in t and denominator in t:
                entry[key] = t[numerator] / t[denominator]

        ratio("full_step_speedup_vs_torch_loop", "torch per-tensor loop (production: VGS + adaptive noise)",
              "numba full step (VGS + adaptive noise)")
        ratio("noise_free_step_over_fused_adam", "numba noise-free step", "torch fused Adam")
        ratio("noise_over_torch_randn", "numba noise alone", "torch.randn (same count)")
        ratio("full_step_speedup_vs_numpy_reference", "NumPy reference step (VGS + adaptive noise)",
              "numba full step (VGS + adaptive noise)")
        out.append(entry)
    return out


def _jit_report(dtypes, cold: bool) -> dict:
    """Compile (or load) every kernel now and say which it was; with ``cold``, also time a
    compilation from scratch in a fresh process with an empty cache."""
    from .kernels.numba_backend import kernel_cache_stats

    hits0, misses0 = kernel_cache_stats()
    seconds = warmup(dtypes).get("numba", 0.0)
    hits, misses = kernel_cache_stats()
    report = {"seconds": seconds, "loaded_from_cache": hits - hits0, "compiled": misses - misses0,
              "cold_compile_seconds": None}
    if cold:
        with tempfile.TemporaryDirectory() as cache:
            code = f"import json, upgd_ref; print(json.dumps(upgd_ref.warmup({list(dtypes)!r})))"
            done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_CACHE_DIR=cache),
                                  capture_output=True, text=True, check=True)
        report["cold_compile_seconds"] = json.loads(done.stdout.splitlines()[-1])["numba"]
    return report


def run_benchmark(sizes=DEFAULT_SIZES, dtypes=DEFAULT_DTYPES, threads=None, segments=DEFAULT_SEGMENTS,
                  repeats=DEFAULT_REPEATS, use_torch=True, quiet=False, cold_jit=False) -> dict:
    """Measure every row; returns ``{"config", "jit", "rows", "ratios"}`` (seconds per call)."""
    import numba

    if "numba" not in BACKENDS:
        raise RuntimeError("upgd-ref bench needs Numba (the numba backend is not registered)")
    threads = numba.config.NUMBA_NUM_THREADS if threads is None else threads
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] (NUMBA_NUM_THREADS)")
    # torch first: Numba's OpenMP layer loads the system libgomp.so.1, and a torch imported
    # after it binds to that instead of its own and runs several times slower (specs/kernels.md §6).
    torch = _import_torch(use_torch)
    if torch is not None:
        torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    progress = _Progress(quiet)
    progress("bench: compiling the Numba kernels (or loading them from the cache)")
    jit = _jit_report(dtypes, cold_jit)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            label = f"{_size_label(size)} {dtype}"
            progress(f"bench: {label}: preparing buffers")
            layout = FlatLayout(_segment_shapes(size, segments), dtype=dtype)
            rng = np.random.default_rng(0)
            cases = _numpy_cases(layout, rng) + (_torch_cases(torch, layout, rng) if torch is not None else [])
            for name, (seconds, count) in _time_rows(cases, repeats, progress, label).items():
                rows.append(Row(size, dtype, name, seconds, count))
            del cases  # free this group's buffers before the next group allocates its own
    progress.done()
    config = {
        "sizes": list(sizes), "dtypes": list(dtypes), "threads": threads, "segments": segments,
        "repeats": repeats, "numba": numba.__version__, "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
    }
    return {"config": config, "jit": jit, "rows": [dict(asdict(r), ns_per_param=r.ns_per_param) for r in rows],
            "ratios": _ratios(rows)}


# --- printing and the command line ------------------------------------------------------


def _size_label(size: int) -> str:
    for unit, scale in (("M", 1_000_000), ("K", 1_000)):
        if size >= scale and size % (scale // 10) == 0:
            return f"{size / scale:g}{unit}"
    return str(size)


def format_report(result: dict) -> str:
    """The table (and ratios) that ``upgd-ref bench`` prints."""
    cfg, jit = result["config"], result["jit"]
    lines = [
        f"upgd-ref bench: {cfg['threads']} thread(s), {cfg['segments']} segments, median of up to "
        f"{cfg['repeats']} repetitions after 1 warm-up (numba {cfg['numba']}, numpy {cfg['numpy']}, "
        f"torch {cfg['torch'] or 'not installed'})",
        f"numba JIT: {jit['seconds']:.2f} s in this process ({jit['compiled']} kernel(s) compiled, "
        f"{jit['loaded_from_cache']} loaded from Numba's on-disk cache)"
        + ("" if jit["cold_compile_seconds"] is None else
           f"; compiling everything from scratch: {jit['cold_compile_seconds']:.1f} s"),
        "",
        f"{'size':>6}  {'dtype':<8} {'row':<58} {'ns/param':>9} {'ms/step':>9} {'reps':>4}",
    ]
    for r in result["rows"]:
        lines.append(f"{_size_label(r['size']):>6}  {r['dtype']:<8} {r['name']:<58} "
                     f"{r['ns_per_param']:9.3f} {r['seconds'] * 1e3:9.3f} {r['repeats']:>4}")
    lines += ["", "ratios (time of one over the other; targets below):"]
    header = (f"{'size':>6}  {'dtype':<8} {'full vs torch loop':>19} {'noise-free / Adam':>18} "
              f"{'noise / randn':>14} {'full vs NumPy ref':>18}")
    lines.append(header)
    for entry in result["ratios"]:
        def cell(key, width, suffix):
            return f"{entry[key]:{width - 1}.2f}{suffix}" if key in entry else f"{'-':>{width}}"

        lines.append(f"{_size_label(entry['size']):>6}  {entry['dtype']:<8} "
                     f"{cell('full_step_speedup_vs_torch_loop', 19, 'x')} "
                     f"{cell('noise_free_step_over_fused_adam', 18, 'x')} "
                     f"{cell('noise_over_torch_randn', 14, 'x')} "
                     f"{cell('full_step_speedup_vs_numpy_reference', 18, 'x')}")
    lines += ["", *_target_lines(result)]
    return "\n".join(lines)


def _target_lines(result: dict) -> list[str]:
    """Each target against the measured ratio at TARGET_SIZE float32 (when measured)."""
    entry = next((e for e in result["ratios"] if e["size"] == TARGET_SIZE and e["dtype"] == "float32"), None)
    threads = result["config"]["threads"]
    lines = [f"targets at {_size_label(TARGET_SIZE)} float32 on 2 threads (this run: {threads} thread(s)):"]
    for key, (comparison, bound) in TARGETS.items():
        if entry is None or key not in entry:
            lines.append(f"  {key} {comparison} {bound:g}: not measured")
            continue
        met = entry[key] >= bound if comparison == ">=" else entry[key] <= bound
        lines.append(f"  {key} {comparison} {bound:g}: {entry[key]:.2f} ({'met' if met else 'MISSED'})")
    return lines


def _size(text: str) -> int:
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = float(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1B, 1M, 250k, 4096)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive whole number, got {text!r}")
    return int(value)


def _sizes(text: str) -> list[int]:
    return [_size(part) for part in text.split(",") if part]


def _dtypes(text: str) -> list[str]:
    dtypes = [part for part in text.split(",") if part]
    bad = [d for d in dtypes if d not in DEFAULT_DTYPES]
    if bad or not dtypes:
        raise argparse.ArgumentTypeError(f"dtypes must be among {DEFAULT_DTYPES}, got {text!r}")
    return dtypes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run(args) -> int:
    if args.backend == "cupy":
        from .bench_cuda import DEFAULT_CUDA_SIZES, format_cuda_report, run_cuda_benchmark

        try:
            result = run_cuda_benchmark(args.sizes or DEFAULT_CUDA_SIZES, args.dtypes or ["float32"],
                                        args.segments, args.repeats, quiet=args.quiet)
        except (ImportError, RuntimeError) as exc:
            print(f"upgd-ref bench: error: {exc}", file=sys.stderr)
            return 2
        print(format_cuda_report(result))
    else:
        result = run_benchmark(args.sizes or DEFAULT_SIZES, args.dtypes or DEFAULT_DTYPES, args.threads,
                               args.segments, args.repeats, use_torch=not args.no_torch, quiet=args.quiet,
                               cold_jit=args.cold_jit)
        print(format_report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def register(subparsers) -> None:
    """Add ``upgd-ref bench``."""
    parser = subparsers.add_parser(
        "bench", help="time the Numba kernels against the NumPy reference and PyTorch",
        description="Time one optimizer step of the Numba kernels, the NumPy reference and (when "
                    "installed) PyTorch, side by side; prints one table in ns/parameter and ms/step.",
    )
    parser.add_argument("--backend", choices=("numba", "cupy"), default="numba",
                        help="numba (default): the CPU kernels against NumPy and PyTorch; cupy: the CUDA "
                             "kernels against the GPU's device-to-device copy bandwidth")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="comma-separated parameter counts, e.g. 1M,10M (default; 1M,100M,1B with "
                             "--backend cupy) or 4096")
    parser.add_argument("--dtypes", type=_dtypes, default=None,
                        help="comma-separated, from float32,float64 (default both; float32 with --backend cupy)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="Numba and torch threads (default: NUMBA_NUM_THREADS)")
    parser.add_argument("--segments", type=_positive_int, default=DEFAULT_SEGMENTS,
                        help=f"segments (tensors) the parameters are split into (default {DEFAULT_SEGMENTS})")
    parser.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                        help=f"timed repetitions per row (default {DEFAULT_REPEATS}; "
                             f"rows slower than {SLOW_CALL_SECONDS} s per call get {MIN_SLOW_REPEATS})")
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    parser.add_argument("--cold-jit", action="store_true",
                        help="also time compiling every kernel from scratch (a fresh process, empty cache)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.set_defaults(run=_run)
