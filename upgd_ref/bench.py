"""``upgd-ref bench``: the Numba kernels against the NumPy reference and PyTorch, side by side.

Every row is timed in the same process, one row after the other, each after one untimed
warm-up call; a row's time is the median of its repetitions. Rows (``specs/kernels.md`` §6):

* numba full step: ``AdaptiveUPGD.step(params, grads, vgs=scaler)``, adaptive noise, VGS on;
* numba noise-free step: ``AdaptiveUPGD.step`` with ``sigma = 0``, no VGS;
* numba noise alone: ``upgd_ref.noise(..., out=buffer)`` (into an existing buffer, as
  ``torch.randn(n, out=buffer)``: the generators, not the allocator, are compared);
* the full step and the noise alone again in noise format 2 (``noise_version=2``, the binary32
  transform of ``specs/noise-v2.md``), side by side with format 1 (the default);
* numba noisy step: fixed noise (``sigma = 0.01``, not adaptive), no VGS: against the
  noise-free step, what the noise costs inside the step (``specs/kernels.md`` §6.2);
* copy: a copy moving the full step's bytes (threaded ``np.copyto``, as many threads as the
  kernels), the memory bandwidth the other rows are compared with;
* NumPy reference step: the full step on ``backend="reference"``;
* the rows of each *baseline*: a file outside the package (``benchmarks/production_torch.py``
  in a checkout: fused Adam, ``torch.randn`` of the same count, and the production algorithm
  as a per-tensor PyTorch loop) loaded with :func:`load_baseline`. A baseline file defines
  ``NAME``, ``setup(threads) -> dict`` (imports its framework, ``ImportError`` when missing;
  returns versions to report) and ``cases(layout, rng, step_hyper, vgs_hyper) -> list[Case]``.

Rows whose traffic is known carry their bytes per parameter (``upgd_ref.traffic``, the table
of ``specs/kernels.md`` §5), from which the report derives GB/s and the share of the copy's
bandwidth. The scaling table times the float32 full and noise-free steps and the copy over
a range of sizes (where the caches stop helping).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends import BACKENDS
from .hyperparams import validate_upgd
from .precision import is_low_precision, state_dtype
from .rng import noise_dtype
from .state import FlatUPGDState
from .step import StepRequest, noise, upgd_step, warmup
from .layout import FlatLayout
from .optimizer import AdaptiveUPGD
from .scaler import VarianceGradientScaler
from .traffic import copy_bytes, step_traffic

__all__ = [
    "run_benchmark", "format_report", "load_baseline", "default_baselines", "Case", "DEFAULT_SIZES",
    "DEFAULT_DTYPES", "ALL_DTYPES", "DEFAULT_SEGMENTS", "DEFAULT_REPEATS", "STEP_HYPER", "VGS_HYPER", "TARGETS", "TARGET_SIZE",
    "DEFAULT_SCALING_SIZES", "size_label", "FULL_STEP", "NOISE_FREE", "NOISY", "NOISE", "COPY",
]

DEFAULT_SIZES = (1_000_000, 10_000_000)
#: Sizes of the scaling table (float32): from within the last-level cache to far beyond it.
DEFAULT_SCALING_SIZES = (100_000, 1_000_000, 10_000_000, 100_000_000)
DEFAULT_DTYPES = ("float32", "float64")
#: Every dtype ``--dtypes`` takes: the 16-bit ones step in float32 (specs/precision.md), their
#: rows time the widening and the rounding too.
ALL_DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_SEGMENTS = 16
DEFAULT_REPEATS = 7
SLOW_CALL_SECONDS = 0.5  # rows slower than this per call get MIN_SLOW_REPEATS repetitions
MIN_SLOW_REPEATS = 3

#: Performance targets (issue 19), judged at :data:`TARGET_SIZE` float32 parameters on 2
#: threads: ratio name -> (comparison, bound).
TARGETS = {
    "full_step_speedup_vs_torch_loop": (">=", 6.0),
    "noise_free_step_over_fused_adam": ("<=", 2.0),
    "full_step_over_noise_free_step": ("<=", 1.4),
    "noise_over_torch_randn": ("<=", 0.2),
    "full_step_v2_over_noise_free_step": ("<=", 1.4),  # the same two targets in noise format 2
    "noise_v2_over_torch_randn": ("<=", 0.2),
}
TARGET_SIZE = 10_000_000

# Hyper-parameters of the benchmarked steps (production defaults where they do not matter).
STEP_HYPER = dict(lr=1e-3, weight_decay=1e-3, sigma=0.01, adaptive_noise=True, noise_ema_init=0.0)
VGS_HYPER = dict(warmup_steps=0)
# Row names the ratios and the scaling table refer to.
FULL_STEP = "numba full step (VGS + adaptive noise)"
NOISE_FREE = "numba noise-free step"
NOISY = "numba noisy step (fixed noise, no VGS)"
NOISE = "numba noise alone"
FULL_STEP_V2 = "numba full step, noise format 2"
NOISE_V2 = "numba noise alone, noise format 2"
COPY = "copy (the full step's bytes)"
#: The baseline a checkout has (``benchmarks/`` is not installed with the package).
CHECKOUT_BASELINES = ("benchmarks/production_torch.py",)


@dataclass
class Row:
    size: int
    dtype: str
    name: str
    seconds: float  # median per call
    repeats: int
    bytes_per_param: float | None = None  # main-memory traffic, when known

    @property
    def ns_per_param(self) -> float:
        return self.seconds / self.size * 1e9

    @property
    def gb_per_second(self) -> float | None:
        """Achieved bandwidth: ``bytes_per_param * size / seconds``, in 10^9 B/s."""
        return None if self.bytes_per_param is None else self.bytes_per_param / self.ns_per_param


@dataclass
class Case:
    """One benchmarked call: ``prepare()`` (untimed) then ``call()`` (timed); ``bytes_per_param``:
    the main-memory bytes one call moves per parameter, when known (``upgd_ref.traffic``)."""

    name: str
    call: Callable[[], object]
    prepare: Callable[[], object] = lambda: None
    bytes_per_param: float | None = None


# --- the cases --------------------------------------------------------------------------


def _segment_shapes(size: int, segments: int) -> list[tuple[int]]:
    base = size // segments
    return [(base + (size - base * segments if i == segments - 1 else 0),) for i in range(segments)]


def _inputs(layout: FlatLayout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return (layout.pack([rng.standard_normal(s) for s in layout.shapes]),
            layout.pack([0.1 * rng.standard_normal(s) for s in layout.shapes]))


def _step_bytes(layout: FlatLayout, vgs: bool) -> int:
    """Bytes per parameter of the optimizer's step on ``layout`` (its state: ``state_dtype``)."""
    return step_traffic("AdaptiveUPGD", layout.dtype, state_dtype(layout.dtype), vgs=vgs).total


def _full_step_case(layout: FlatLayout, params0, grads0, backend: str = "numba", noise_version: int = 1) -> Case:
    params, grads = params0.copy(), grads0.copy()
    opt = AdaptiveUPGD(layout, backend=backend, noise_version=noise_version, **STEP_HYPER)
    vgs = VarianceGradientScaler(layout, backend=backend, **VGS_HYPER)
    if backend == "numba":
        return Case(FULL_STEP if noise_version == 1 else FULL_STEP_V2, lambda: opt.step(params, grads, vgs=vgs), lambda: np.copyto(grads, grads0),
                    _step_bytes(layout, vgs=True))
    return Case("NumPy reference step (VGS + adaptive noise)", lambda: opt.step(params, grads, vgs=vgs),
                lambda: np.copyto(grads, grads0))


def _step_case(name: str, layout: FlatLayout, params0, grads0, **hyper) -> Case:
    """A step without VGS (``grads`` only read) of the hyper-parameters ``STEP_HYPER | hyper``."""
    params = params0.copy()
    opt = AdaptiveUPGD(layout, backend="numba", **dict(STEP_HYPER, **hyper))
    return Case(name, lambda: opt.step(params, grads0), bytes_per_param=_step_bytes(layout, vgs=False))


def _copy_case(layout: FlatLayout, threads: int, bytes_per_param: int) -> Case:
    """A copy moving ``bytes_per_param`` per parameter (half read, half written), split over
    ``threads`` threads (``np.copyto`` releases the GIL): the memory bandwidth of this run."""
    count = bytes_per_param * layout.num_logical // 2
    source, target = np.ones(count, dtype=np.uint8), np.zeros(count, dtype=np.uint8)
    bounds = np.linspace(0, count, threads + 1).astype(np.int64)
    pool = ThreadPoolExecutor(threads)

    def copy():
        list(pool.map(lambda k: np.copyto(target[bounds[k]:bounds[k + 1]], source[bounds[k]:bounds[k + 1]]),
                      range(threads)))

    return Case(COPY, copy, bytes_per_param=copy_bytes(count) / layout.num_logical)


def _numpy_cases(layout: FlatLayout, rng: np.random.Generator, threads: int) -> list[Case]:
    params0, grads0 = _inputs(layout, rng)
    full = _full_step_case(layout, params0, grads0)
    cases = [full, _step_case(NOISE_FREE, layout, params0, grads0, sigma=0.0, adaptive_noise=False),
             _step_case(NOISY, layout, params0, grads0, adaptive_noise=False)]
    counter, normals = iter(range(1, 2**62)), layout.zeros(noise_dtype(layout))
    for name, version in ((NOISE, 1), (NOISE_V2, 2)):
        cases.append(Case(name, lambda version=version: noise(layout, 0, next(counter), out=normals, backend="numba",
                                                             noise_version=version),
                          bytes_per_param=normals.dtype.itemsize))
    cases.append(_full_step_case(layout, params0, grads0, noise_version=2))
    if is_low_precision(layout.dtype):
        cases.append(_stochastic_rounding_case(layout, params0, grads0))
    cases.append(_copy_case(layout, threads, full.bytes_per_param))
    cases.append(_full_step_case(layout, params0, grads0, backend="reference"))
    return cases


def _scaling_cases(layout: FlatLayout, rng: np.random.Generator, threads: int) -> list[Case]:
    """The scaling table's rows: the full and the noise-free step, and the copy."""
    params0, grads0 = _inputs(layout, rng)
    full = _full_step_case(layout, params0, grads0)
    return [full, _step_case(NOISE_FREE, layout, params0, grads0, sigma=0.0, adaptive_noise=False),
            _copy_case(layout, threads, full.bytes_per_param)]


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
        out[c.name] = (statistics.median(samples), count, c.bytes_per_param)
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
        ratio("full_step_over_noise_free_step", FULL_STEP, NOISE_FREE)
        ratio("noise_over_torch_randn", NOISE, "torch.randn (same count)")
        ratio("full_step_v2_over_noise_free_step", FULL_STEP_V2, NOISE_FREE)
        ratio("noise_v2_over_torch_randn", NOISE_V2, "torch.randn (same count)")
        ratio("full_step_speedup_vs_numpy_reference", "NumPy reference step (VGS + adaptive noise)", FULL_STEP)
        if all(name in t for name in (NOISY, NOISE_FREE, NOISE)):  # the noise's cost inside the step
            entry["noise_in_step_over_noise_alone"] = (t[NOISY] - t[NOISE_FREE]) / t[NOISE]
        out.append(entry)
    return out


def _with_bandwidth(rows: list[Row]) -> list[dict]:
    """The rows as dicts, with GB/s and the percentage of the same group's copy bandwidth."""
    copies = {(r.size, r.dtype): r.gb_per_second for r in rows if r.name == COPY}
    out = []
    for r in rows:
        copy = copies.get((r.size, r.dtype))
        share = None if r.gb_per_second is None or not copy else 100.0 * r.gb_per_second / copy
        out.append(dict(asdict(r), ns_per_param=r.ns_per_param, gb_per_second=r.gb_per_second,
                        percent_of_copy=share))
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
                  repeats=DEFAULT_REPEATS, baselines=(), cold_jit=False, progress=None, scaling_sizes=()) -> dict:
    """Measure every row; returns ``{"config", "jit", "baselines", "rows", "ratios", "scaling"}``
    (seconds per call; rows with ``bytes_per_param``, ``gb_per_second``, ``percent_of_copy``).

    ``baselines``: modules from :func:`load_baseline` whose rows are timed next to the
    kernels'; ``progress``: a callable taking a status text, or None; ``scaling_sizes``: the
    sizes of the scaling table (float32; empty: no table).
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
            label = f"{size_label(size)} {dtype}"
            progress(f"bench: {label}: preparing buffers")
            layout = FlatLayout(_segment_shapes(size, segments), dtype=dtype)
            rng = np.random.default_rng(0)
            cases = _numpy_cases(layout, rng, threads)
            for baseline in usable if not is_low_precision(dtype) else ():  # the baselines: float32/64
                cases += baseline.cases(layout, rng, dict(STEP_HYPER), dict(VGS_HYPER))
            for name, (seconds, count, nbytes) in _time_rows(cases, repeats, progress, label).items():
                rows.append(Row(size, dtype, name, seconds, count, nbytes))
            del cases  # free this group's buffers before the next group allocates its own
    scaling = []
    for size in scaling_sizes:
        label = f"scaling {size_label(size)} float32"
        progress(f"bench: {label}: preparing buffers")
        cases = _scaling_cases(FlatLayout(_segment_shapes(size, segments), dtype="float32"),
                               np.random.default_rng(0), threads)
        for name, (seconds, count, nbytes) in _time_rows(cases, repeats, progress, label).items():
            scaling.append(Row(size, "float32", name, seconds, count, nbytes))
        del cases
    versions = {k: v for report in reports for k, v in report["versions"].items()}
    config = {
        "sizes": list(sizes), "dtypes": list(dtypes), "threads": threads, "segments": segments,
        "scaling_sizes": list(scaling_sizes),
        "repeats": repeats, "numba": numba.__version__, "numpy": np.__version__,
        "torch": versions.get("torch"),
    }
    return {"config": config, "jit": jit, "baselines": reports,
            "rows": _with_bandwidth(rows), "ratios": _ratios(rows), "scaling": _with_bandwidth(scaling)}


# --- the report ---------------------------------------------------------------------------


def size_label(size: int) -> str:
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
        *_row_table(result["rows"]),
        "",
        "ratios (time of one over the other; targets below; noise in step / alone: (noisy step - noise-free "
        "step) / noise alone, 0 when the noise hides entirely behind the step's memory traffic):",
        f"{'size':>6}  {'dtype':<8} {'full vs torch loop':>19} {'noise-free / Adam':>18} {'full / noise-free':>18} "
        f"{'noise / randn':>14} {'noise in step / alone':>22} {'full vs NumPy ref':>18} {'v2: full / noise-free':>22} "
        f"{'v2: noise / randn':>18}",
    ]
    for entry in result["ratios"]:
        def cell(key, width, suffix):
            return f"{entry[key]:{width - 1}.2f}{suffix}" if key in entry else f"{'-':>{width}}"

        lines.append(f"{size_label(entry['size']):>6}  {entry['dtype']:<8} "
                     f"{cell('full_step_speedup_vs_torch_loop', 19, 'x')} "
                     f"{cell('noise_free_step_over_fused_adam', 18, 'x')} "
                     f"{cell('full_step_over_noise_free_step', 18, 'x')} "
                     f"{cell('noise_over_torch_randn', 14, 'x')} "
                     f"{cell('noise_in_step_over_noise_alone', 22, 'x')} "
                     f"{cell('full_step_speedup_vs_numpy_reference', 18, 'x')} "
                     f"{cell('full_step_v2_over_noise_free_step', 22, 'x')} "
                     f"{cell('noise_v2_over_torch_randn', 18, 'x')}")
    if result.get("scaling"):
        lines += ["", "scaling (float32; GB/s and % of the copy of the same bytes at the same size):",
                  *_row_table(result["scaling"])]
    lines += ["", *_target_lines(result)]
    return "\n".join(lines)


def _row_table(rows: list[dict]) -> list[str]:
    """Rows as lines: time per parameter and per step, bytes per parameter (``specs/kernels.md``
    §5), the bandwidth they give and its share of the copy's; ``-`` where the bytes are unknown."""
    def number(value, width, digits):
        return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"

    lines = [f"{'size':>6}  {'dtype':<8} {'row':<58} {'ns/param':>9} {'ms/step':>9} {'B/param':>8} {'GB/s':>7} "
             f"{'% copy':>7} {'reps':>4}"]
    for r in rows:
        lines.append(f"{size_label(r['size']):>6}  {r['dtype']:<8} {r['name']:<58} "
                     f"{r['ns_per_param']:9.3f} {r['seconds'] * 1e3:9.3f} {number(r['bytes_per_param'], 8, 0)} "
                     f"{number(r['gb_per_second'], 7, 1)} {number(r['percent_of_copy'], 7, 0)} {r['repeats']:>4}")
    return lines


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
    lines = [f"targets at {size_label(TARGET_SIZE)} float32 on 2 threads (this run: {threads} thread(s)):"]
    for key, (comparison, bound) in TARGETS.items():
        if entry is None or key not in entry:
            lines.append(f"  {key} {comparison} {bound:g}: not measured")
            continue
        met = entry[key] >= bound if comparison == ">=" else entry[key] <= bound
        lines.append(f"  {key} {comparison} {bound:g}: {entry[key]:.2f} ({'met' if met else 'MISSED'})")
    return lines
