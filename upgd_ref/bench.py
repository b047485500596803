"""``upgd-ref bench``: the Numba kernels against the NumPy reference and PyTorch, side by side.

Every row is timed in the same process, one row after the other, each after one untimed
warm-up call; a row's time is the median of its repetitions. Rows (``specs/kernels.md`` §6):

* numba full step: ``AdaptiveUPGD.step(params, grads, vgs=scaler)``, adaptive noise, VGS on;
* numba noise-free step: ``AdaptiveUPGD.step`` with ``sigma = 0``, no VGS;
* numba noise alone: ``upgd_ref.noise(..., out=buffer)`` (into an existing buffer, as
  ``torch.randn(n, out=buffer)``: the generators, not the allocator, are compared);
* NumPy reference step: the full step on ``backend="reference"``;
* the rows of each *baseline*: a file outside the package (``benchmarks/production_torch.py``
  in a checkout: fused Adam, ``torch.randn`` of the same count, and the production algorithm
  as a per-tensor PyTorch loop) loaded with :func:`load_baseline`. A baseline file defines
  ``NAME``, ``setup(threads) -> dict`` (imports its framework, ``ImportError`` when missing;
  returns versions to report) and ``cases(layout, rng, step_hyper, vgs_hyper) -> list[Case]``.

Gradients that a row scales in place are restored before each repetition, outside the timing.
Nothing here prints: progress goes to the ``progress`` callback, the report is a string.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends import BACKENDS
from .hyperparams import validate_upgd
from .precision import is_low_precision
from .rng import noise_dtype
from .state import FlatUPGDState
from .step import StepRequest, noise, upgd_step, warmup
from .layout import FlatLayout
from .optimizer import AdaptiveUPGD
from .scaler import VarianceGradientScaler

__all__ = [
    "run_benchmark", "format_report", "load_baseline", "default_baselines", "Case", "DEFAULT_SIZES",
    "DEFAULT_DTYPES", "ALL_DTYPES", "DEFAULT_SEGMENTS", "DEFAULT_REPEATS", "STEP_HYPER", "VGS_HYPER", "TARGETS", "TARGET_SIZE",
]

DEFAULT_SIZES = (1_000_000, 10_000_000)
DEFAULT_DTYPES = ("float32", "float64")
#: Every dtype ``--dtypes`` takes: the 16-bit ones step in float32 (specs/precision.md), their
#: rows time the widening and the rounding too.
ALL_DTYPES = ("float32", "float64", "float16", "bfloat16")
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
STEP_HYPER = dict(lr=1e-3, weight_decay=1e-3, sigma=0.01, adaptive_noise=True, noise_ema_init=0.0)
VGS_HYPER = dict(warmup_steps=0)
#: The baseline a checkout has (``benchmarks/`` is not installed with the package).
CHECKOUT_BASELINES = ("benchmarks/production_torch.py",)


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
        opt = AdaptiveUPGD(layout, backend=backend, **STEP_HYPER)
        vgs = VarianceGradientScaler(layout, backend=backend, **VGS_HYPER)
        return lambda: opt.step(params, grads, vgs=vgs), lambda: np.copyto(grads, grads0)

    call, prepare = full_step("numba")
    cases.append(Case("numba full step (VGS + adaptive noise)", call, prepare))
    params_nf = params0.copy()
    opt_nf = AdaptiveUPGD(layout, backend="numba", **dict(STEP_HYPER, sigma=0.0, adaptive_noise=False))
    cases.append(Case("numba noise-free step", lambda: opt_nf.step(params_nf, grads0)))
    counter, normals = iter(range(1, 2**62)), layout.zeros(noise_dtype(layout))
    cases.append(Case("numba noise alone", lambda: noise(layout, 0, next(counter), out=normals, backend="numba")))
    if is_low_precision(layout.dtype):
        cases.append(_stochastic_rounding_case(layout, params0, grads0))
    call, prepare = full_step("reference")
    cases.append(Case("NumPy reference step (VGS + adaptive noise)", call, prepare))
    return cases


def _stochastic_rounding_case(layout: FlatLayout, params0, grads0) -> Case:
    """The full step's noise and moments with the 16-bit parameters rounded stochastically
    (through the door: the stateful classes round to nearest)."""
    params, state = params0.copy(), FlatUPGDState.zeros(layout, [0.0] * layout.num_segments)
    hyper = [validate_upgd(STEP_HYPER)] * layout.num_segments
    request = StepRequest(hyper=hyper, rounding="stochastic")
    return Case("numba step, stochastic rounding (no VGS)",
                lambda: upgd_step(layout, params, grads0, state, request, backend="numba"))


# --- measuring --------------------------------------------------------------------------


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


def load_baseline(path):
    """The baseline module in the Python file ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such baseline file")
    spec = importlib.util.spec_from_file_location(f"upgd_ref_baseline_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in ("NAME", "setup", "cases") if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{path}: a baseline file must define NAME, setup and cases; it lacks {', '.join(missing)}")
    return module


def default_baselines() -> list[Path]:
    """The baseline files of the checkout this package runs from (none in an installed copy)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        return []
    return [root / name for name in CHECKOUT_BASELINES if (root / name).is_file()]


def _set_up(baselines, threads: int) -> tuple[list, list[dict]]:
    """``(usable baselines, one report per baseline)``; a baseline whose framework is missing
    is reported with the reason, not run."""
    usable, reports = [], []
    for baseline in baselines:
        report = {"name": baseline.NAME, "file": getattr(baseline, "__file__", None), "versions": {},
                  "available": True, "reason": None}
        try:
            report["versions"] = dict(baseline.setup(threads) or {})
            usable.append(baseline)
        except ImportError as exc:
            report.update(available=False, reason=f"{exc.name} is not installed" if exc.name else str(exc))
        reports.append(report)
    return usable, reports


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
                  repeats=DEFAULT_REPEATS, baselines=(), cold_jit=False, progress=None) -> dict:
    """Measure every row; returns ``{"config", "jit", "baselines", "rows", "ratios"}`` (seconds per call).

    ``baselines``: modules from :func:`load_baseline` whose rows are timed next to the
    kernels'; ``progress``: a callable taking a status text, or None.
    """
    import numba

    if "numba" not in BACKENDS:
        raise RuntimeError("upgd-ref bench needs Numba (the numba backend is not registered)")
    threads = numba.config.NUMBA_NUM_THREADS if threads is None else threads
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] (NUMBA_NUM_THREADS)")
    progress = progress or (lambda text: None)
    # Baselines first: they import their frameworks before Numba starts its threads (torch
    # after Numba's OpenMP layer runs several times slower, specs/kernels.md §6).
    usable, reports = _set_up(baselines, threads)
    numba.set_num_threads(threads)
    progress("bench: compiling the Numba kernels (or loading them from the cache)")
    jit = _jit_report(dtypes, cold_jit)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            label = f"{_size_label(size)} {dtype}"
            progress(f"bench: {label}: preparing buffers")
            layout = FlatLayout(_segment_shapes(size, segments), dtype=dtype)
            rng = np.random.default_rng(0)
            cases = _numpy_cases(layout, rng)
            for baseline in usable if not is_low_precision(dtype) else ():  # the baselines: float32/64
                cases += baseline.cases(layout, rng, dict(STEP_HYPER), dict(VGS_HYPER))
            for name, (seconds, count) in _time_rows(cases, repeats, progress, label).items():
                rows.append(Row(size, dtype, name, seconds, count))
            del cases  # free this group's buffers before the next group allocates its own
    versions = {k: v for report in reports for k, v in report["versions"].items()}
    config = {
        "sizes": list(sizes), "dtypes": list(dtypes), "threads": threads, "segments": segments,
        "repeats": repeats, "numba": numba.__version__, "numpy": np.__version__,
        "torch": versions.get("torch"),
    }
    return {"config": config, "jit": jit, "baselines": reports,
            "rows": [dict(asdict(r), ns_per_param=r.ns_per_param) for r in rows], "ratios": _ratios(rows)}


# --- the report ---------------------------------------------------------------------------


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
        f"torch {cfg['torch'] or '-'})",
        *_baseline_lines(result.get("baselines", [])),
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


def _baseline_lines(reports: list[dict]) -> list[str]:
    """Which baseline rows are in the table, and why the others are not."""
    if not reports:
        return ["baselines: none (the PyTorch rows come from benchmarks/production_torch.py in a checkout, "
                "or --baseline FILE); the ratios against PyTorch are not measured"]
    return [f"baseline {r['name']}: " + ("measured" if r["available"] else f"unavailable, {r['reason']}")
            for r in reports]


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
