"""``upgd-ref bench --backend cupy``: the CUDA kernels against the GPU's own copy bandwidth.

Rows (``specs/kernels-cuda.md`` §5), each timed with CUDA events around whole calls (host
work and the step's two small device-to-host copies included), median of the repetitions
after one untimed warm-up call, all in one process:

* device-to-device copy: ``cupy.copyto`` of an array of the step's dtype and size; its
  bandwidth (bytes read + bytes written per second) is the yardstick;
* cupy noise-free step: ``AdaptiveUPGD.step`` with ``sigma = 0``, no VGS;
* cupy full step: VGS + adaptive noise, ``opt.step(..., vgs=scaler)``;
* cupy noise alone: ``upgd_ref.noise(..., out=buffer)``.

A step's bandwidth is its compulsory traffic over its time (``upgd_ref.traffic``, the table
of ``specs/kernels.md`` §5): 56 B per float32 parameter without VGS scaling (pass 1 reads
``g, p, u, m, v`` and writes nothing; pass 2 reads ``g, p, u, m, v`` and writes ``u, m, v,
p``), 60 B with it (pass 2 writes ``g`` back); twice that in float64.
"""

from __future__ import annotations

import statistics

from .layout import FlatLayout
from .traffic import copy_bytes, step_traffic

__all__ = ["run_cuda_benchmark", "format_cuda_report", "CUDA_TARGETS", "DEFAULT_CUDA_SIZES"]

DEFAULT_CUDA_SIZES = (1_000_000, 100_000_000, 1_000_000_000)
#: Targets at >= 100M float32 parameters: noise-free step bandwidth / copy bandwidth, full /
#: noise-free time.
CUDA_TARGETS = {"noise_free_bandwidth_over_copy": (">=", 0.70), "full_over_noise_free": ("<=", 1.3)}
CUDA_TARGET_MIN_SIZE = 100_000_000


def _timer(cupy, call, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` after one warm-up, by CUDA events."""
    call()
    cupy.cuda.Device().synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(samples)


def _rows_for(cupy, size: int, dtype: str, segments: int, repeats: int, progress) -> list[dict]:
    import upgd_ref

    shapes = [(size // segments + (1 if i < size % segments else 0),) for i in range(segments)]
    layout = FlatLayout(shapes, dtype=dtype)
    itemsize = layout.dtype.itemsize
    rng = cupy.random.default_rng(0)
    params = rng.standard_normal(layout.size, dtype=layout.dtype)
    grads = rng.standard_normal(layout.size, dtype=layout.dtype) * layout.dtype.type(1e-3)
    rows = []

    def add(name, seconds, traffic_bytes):
        rows.append(dict(size=size, dtype=dtype, name=name, seconds=seconds, ns_per_param=seconds / size * 1e9,
                         gbytes_per_s=traffic_bytes / seconds / 1e9))

    progress(f"bench cupy: {size:,} {dtype}: copy")
    source = cupy.empty_like(params)
    add("device-to-device copy", _timer(cupy, lambda: cupy.copyto(source, params), repeats),
        copy_bytes(size * itemsize))

    progress(f"bench cupy: {size:,} {dtype}: noise-free step")
    quiet = upgd_ref.AdaptiveUPGD(layout, lr=1e-3, sigma=0.0, backend="cupy")
    add("noise-free step", _timer(cupy, lambda: quiet.step(params, grads), repeats),
        step_traffic("AdaptiveUPGD", dtype).total * size)

    progress(f"bench cupy: {size:,} {dtype}: full step")
    full = upgd_ref.AdaptiveUPGD(layout, lr=1e-3, sigma=0.01, adaptive_noise=True, backend="cupy")
    scaler = upgd_ref.VarianceGradientScaler(layout, warmup_steps=0, backend="cupy")
    add("full step", _timer(cupy, lambda: full.step(params, grads, vgs=scaler), repeats),
        step_traffic("AdaptiveUPGD", dtype, vgs=True).total * size)

    progress(f"bench cupy: {size:,} {dtype}: noise alone")
    out = cupy.empty(layout.size, dtype=layout.dtype)
    add("noise alone", _timer(cupy, lambda: upgd_ref.noise(layout, 1, 1, out=out), repeats),
        size * itemsize)
    return rows


def run_cuda_benchmark(sizes=DEFAULT_CUDA_SIZES, dtypes=("float32",), segments: int = 16, repeats: int = 7,
                       progress=None) -> dict:
    """Time the rows for every size and dtype on the current GPU; returns rows and ratios.
    ``progress``: a callable taking a status text, or None."""
    import cupy

    if not cupy.is_available():
        raise RuntimeError("upgd-ref bench --backend cupy needs a CUDA GPU (cupy.is_available() is False)")

    progress = progress or (lambda text: None)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            rows += _rows_for(cupy, size, dtype, segments, repeats, progress)
            cupy.get_default_memory_pool().free_all_blocks()
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return {"device": properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"],
            "cupy": cupy.__version__, "rows": rows, "ratios": _cuda_ratios(rows)}


def _cuda_ratios(rows) -> list[dict]:
    out = []
    for size, dtype in dict.fromkeys((r["size"], r["dtype"]) for r in rows):
        by_name = {r["name"]: r for r in rows if (r["size"], r["dtype"]) == (size, dtype)}
        copy, quiet, full = (by_name.get(k) for k in ("device-to-device copy", "noise-free step", "full step"))
        entry = {"size": size, "dtype": dtype}
        if copy and quiet:
            entry["noise_free_bandwidth_over_copy"] = quiet["gbytes_per_s"] / copy["gbytes_per_s"]
        if quiet and full:
            entry["full_over_noise_free"] = full["seconds"] / quiet["seconds"]
        out.append(entry)
    return out


def format_cuda_report(result: dict) -> str:
    lines = [f"upgd-ref bench --backend cupy on {result['device']} (CuPy {result['cupy']})", "",
             "| size | dtype | row | ms/step | ns/param | GB/s | % of copy |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        copy = next(c for c in result["rows"] if (c["size"], c["dtype"], c["name"]) ==
                    (r["size"], r["dtype"], "device-to-device copy"))
        lines.append(f"| {r['size']:,} | {r['dtype']} | {r['name']} | {r['seconds'] * 1e3:.3f} | "
                     f"{r['ns_per_param']:.4f} | {r['gbytes_per_s']:.0f} | "
                     f"{100 * r['gbytes_per_s'] / copy['gbytes_per_s']:.0f}% |")
    lines += ["", "Targets (float32, >= 100M parameters):"]
    for entry in result["ratios"]:
        if entry["dtype"] != "float32" or entry["size"] < CUDA_TARGET_MIN_SIZE:
            continue
        for key, (op, bound) in CUDA_TARGETS.items():
            if key in entry:
                value = entry[key]
                met = value >= bound if op == ">=" else value <= bound
                lines.append(f"- {entry['size']:,}: {key} = {value:.3f} (target {op} {bound}): "
                             f"{'met' if met else 'MISSED'}")
    return "\n".join(lines)

