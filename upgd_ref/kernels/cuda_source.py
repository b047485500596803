"""The CUDA source of the GPU kernels, its compile options and its entry points.

``upgd_step.cu`` (next to this file) holds the kernels; :func:`cuda_source` prepends a
prelude of ``#define`` constants generated here from their Python definitions (chunk-table
and coefficient columns from :mod:`.chunk_abi`, Philox and fdlibm constants from
:mod:`upgd_ref.rng`, the tanh series as straight-line Horner code), so every number exists
once. :data:`KERNEL_SIGNATURES` names each entry point's arguments; both launchers (CuPy on
a GPU, the host-compiled emulator) convert and check arguments with it, because neither a
CUDA launch nor ctypes checks them.

:func:`compile_with_nvrtc` compiles the source with NVRTC through CuPy's low-level
``cupy.cuda.nvrtc`` API, which needs the NVRTC library (the ``nvidia-cuda-nvrtc-cu12``
wheel) but no GPU and no driver: that is how CI checks that the GPU code compiles.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from .. import rng, rng_v2
from . import chunk_abi

__all__ = [
    "THREADS", "COMPILE_OPTIONS", "KERNEL_SIGNATURES", "ARGUMENT_DTYPES", "cuda_source", "checked_arguments",
    "kernel_name",
    "compile_with_nvrtc", "cache_dir", "cached_cubin", "ptx_entries",
]

#: Threads per block. Part of the definition of the reductions' order (specs/kernels-cuda.md §2).
THREADS = 256
#: NVRTC options of every compilation: no contraction of a * b + c into an FMA (bit-identity
#: with the CPU), C++17 (hex float literals, lambdas). Division and square root are IEEE
#: (NVRTC's defaults ``-prec-div=true``, ``-prec-sqrt=true``, ``-ftz=false``), spelled out.
COMPILE_OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "-std=c++17")

SOURCE_FILE = Path(__file__).with_name("upgd_step.cu")

_DTYPE_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_PER_DTYPE = {
    "nonfinite": ("T*", "i64*", "u8*", "i64", "f64*"),
    "scale": ("T*", "i64*", "u8*", "i64", "T"),
    "moments": ("T*", "i64*", "u8*", "i64", "f64*"),
    "pass1": ("T*", "T*", "T*", "T*", "T*", "i64*", "u8*", "T*", "i64", "T", "i32", "f64*"),
    "pass2": ("T*", "T*", "T*", "T*", "T*", "i64*", "u8*", "T*", "i64", "T", "i32", "T", "T",
              "u32", "u32", "u32", "u32", "i32"),
    "family_pass2": ("T*", "T*", "T*", "T*", "T*", "i64*", "u8*", "T*", "i64", "T", "i32", "T", "T", "T", "i32",
                     "u32", "u32", "u32", "u32", "i32"),
    "noise": ("T*", "i64*", "i64", "u32", "u32", "u32", "u32", "i32"),  # ... step, seed words, noise format
}
#: Entry point -> argument kinds: ``f32``, ``f64``, ``i32``, ``i64``, ``u32`` (by value) and the
#: same with ``*`` (a device buffer of that dtype; ``u8*`` holds the present flags).
KERNEL_SIGNATURES: dict[str, tuple[str, ...]] = {
    f"{name}_{suffix}": tuple(kind.replace("T", suffix) for kind in kinds)
    for name, kinds in _PER_DTYPE.items() for suffix in ("f32", "f64")
}
KERNEL_SIGNATURES["segment_reduce"] = ("f64*", "i64*", "u8*", "i64", "f64*")
#: NumPy dtype of each argument kind (pointer or value).
ARGUMENT_DTYPES = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64), "i32": np.dtype(np.int32),
                   "i64": np.dtype(np.int64), "u32": np.dtype(np.uint32), "u8": np.dtype(np.bool_)}


def checked_arguments(name: str, args, array_type, pointer) -> list:
    """``args`` of entry point ``name`` converted for a launch: buffers must be contiguous
    ``array_type`` arrays of the argument's dtype and become ``pointer(array)``; values become
    NumPy scalars of the argument's type (neither CUDA nor ctypes checks either)."""
    converted = []
    for position, (kind, value) in enumerate(zip(KERNEL_SIGNATURES[name], args, strict=True)):
        if kind.endswith("*"):
            expected = ARGUMENT_DTYPES[kind[:-1]]
            if not isinstance(value, array_type) or value.dtype != expected or not value.flags.c_contiguous:
                raise TypeError(f"{name} argument {position} must be a contiguous {expected} "
                                f"{array_type.__module__.split('.')[0]} array")
            converted.append(pointer(value))
        else:
            converted.append(ARGUMENT_DTYPES[kind].type(value))
    return converted


def kernel_name(base: str, dtype) -> str:
    """``pass1`` and float32 -> ``pass1_f32``."""
    return f"{base}_{_DTYPE_SUFFIX[np.dtype(dtype)]}"


def _double(value: float) -> str:
    return f"({float(value).hex()})"


def _float(value: float) -> str:
    return f"({float(np.float32(value)).hex()}f)"


def _tanh_function(ctype: str, halves, literal) -> str:
    """``tanh(w)`` for ``|w| <= 1/2`` as in the Numba kernels: ``w * (H(y) y**len(low) + L(y))``,
    ``y = w * w``, two Horner chains from 0, coefficients rounded to the dtype."""
    high, low = halves
    lines = [f"UPGD_DEVICE {ctype} tanh_half_unit({ctype} w) {{",
             f"    {ctype} y = w * w;",
             f"    {ctype} high = ({ctype})0;"]
    lines += [f"    high = high * y + {literal(c)};" for c in high]
    lines += [f"    {ctype} low = ({ctype})0;", f"    {ctype} power = ({ctype})1;"]
    for c in low:
        lines += [f"    low = low * y + {literal(c)};", "    power = power * y;"]
    lines += ["    return w * (high * power + low);", "}"]
    return "\n".join(lines)


def _prelude() -> str:
    integers = {
        "UPGD_THREADS": THREADS,
        **{name: getattr(chunk_abi, name) for name in (
            "SEGMENT", "START", "LENGTH", "LOGICAL", "BETA_U", "ONE_MINUS_BETA_U", "BETA1", "ONE_MINUS_BETA1",
            "BETA2", "ONE_MINUS_BETA2", "DECAY", "LR", "EPS", "INV_CU", "INV_BC1", "INV_BC2", "STD",
            "NUM_COEFFICIENTS", "SUM", "SUM_SQ", "MIN_U", "MAX_U", "MAX_P", "MAX_D", "BAD", "NUM_PARTIALS",
            "MOMENTS_NONE", "PROTECTION_MAX", "NOISE_TERMS")},
        "PHILOX_ROUNDS": rng.PHILOX_ROUNDS,
        "OCTANT_FRACTION_BITS": rng.OCTANT_FRACTION_BITS,
    }
    words = {name: getattr(rng, name) for name in ("PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1")}
    doubles = {name: getattr(rng, name) for name in (
        "LN2_HI", "LN2_LO", "LG1", "LG2", "LG3", "LG4", "LG5", "LG6", "LG7", "SQRT2",
        "S1", "S2", "S3", "S4", "S5", "S6", "C1", "C2", "C3", "C4", "C5", "C6", "PI_OVER_4")}
    doubles["OCTANT_FRACTION_SCALE"] = 2.0 ** -rng.OCTANT_FRACTION_BITS
    floats = {f"V2_{name}": getattr(rng_v2, name) for name in (  # noise format 2 (binary32)
        "LN2_HI", "LN2_LO", "LG1", "LG2", "LG3", "LG4", "SQRT2", "ONE_MINUS_SQRT_HALF", "S1", "S2", "S3", "C1", "C2",
        "C3", "ANGLE_SCALE")}
    lines = ["// Generated by upgd_ref/kernels/cuda_source.py from the Python definitions."]
    lines += [f"#define {name} {value}" for name, value in integers.items()]
    lines += [f"#define {name} 0x{value:08X}u" for name, value in words.items()]
    lines += [f"#define {name} {_double(value)}" for name, value in doubles.items()]
    lines += [f"#define {name} {_float(value)}" for name, value in floats.items()]
    return "\n".join(lines) + "\n"


def _tanh_functions() -> str:
    return "\n\n".join([_tanh_function("float", chunk_abi.TANH_FLOAT32, _float),
                        _tanh_function("double", chunk_abi.TANH_FLOAT64, _double)]) + "\n"


@functools.lru_cache(maxsize=1)
def cuda_source() -> str:
    """The complete CUDA source: generated constants, then ``upgd_step.cu`` with the tanh
    series functions inserted at its ``// @tanh-functions`` line."""
    body = SOURCE_FILE.read_text()
    marker = "// @tanh-functions\n"
    if marker not in body:
        raise RuntimeError(f"{SOURCE_FILE} lacks the line {marker.strip()!r}")
    return _prelude() + body.replace(marker, _tanh_functions())


def compile_with_nvrtc(arch: str = "sm_90", *, options=COMPILE_OPTIONS, cubin: bool = True) -> dict:
    """Compile :func:`cuda_source` with NVRTC; no GPU or driver needed.

    ``arch``: ``"sm_90"`` gives PTX and a CUBIN for that GPU, ``"compute_90"`` PTX only.
    Returns ``{"ptx": str, "cubin": bytes | None, "log": str, "version": (major, minor)}``;
    a compile error raises ``RuntimeError`` carrying NVRTC's log.
    """
    from cupy.cuda import nvrtc

    program = nvrtc.createProgram(cuda_source(), "upgd_step.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed to compile upgd_step.cu for {arch}: {exc}\n"
                               f"{nvrtc.getProgramLog(program)}") from None
        ptx = nvrtc.getPTX(program)
        return {
            "ptx": ptx.decode() if isinstance(ptx, bytes) else ptx,
            "cubin": nvrtc.getCUBIN(program) if cubin and arch.startswith("sm_") else None,
            "log": nvrtc.getProgramLog(program),
            "version": nvrtc.getVersion(),
        }
    finally:
        nvrtc.destroyProgram(program)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$UPGD_REF_CACHE_DIR``, default ``~/.cache/upgd_ref``."""
    return Path(os.environ.get("UPGD_REF_CACHE_DIR", Path.home() / ".cache" / "upgd_ref"))


def cached_cubin(arch: str) -> Path:
    """A CUBIN of :func:`cuda_source` for ``arch`` (``"sm_90"``), compiled by
    :func:`compile_with_nvrtc` with exactly :data:`COMPILE_OPTIONS` once per source text,
    NVRTC version and architecture, and kept in :func:`cache_dir`.

    The GPU backend loads this file rather than compiling through ``cupy.RawModule(code=...)``,
    because CuPy appends ``-ftz=true`` to every compilation of its own, which would flush
    float32 subnormals to zero and break bit-identity with the CPU.
    """
    from cupy.cuda import nvrtc

    version = "%d.%d" % nvrtc.getVersion()
    key = hashlib.sha256("\0".join([cuda_source(), arch, version, *COMPILE_OPTIONS]).encode()).hexdigest()[:20]
    target = cache_dir() / f"upgd_step_{arch}_{key}.cubin"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(compile_with_nvrtc(arch)["cubin"])
        os.replace(partial, target)  # atomic: concurrent processes never load a partial file
    return target


def ptx_entries(ptx: str) -> dict[str, str]:
    """Entry name -> its PTX text (from ``.entry name(`` to the next entry)."""
    parts = ptx.split(".entry ")
    entries = {}
    for part in parts[1:]:
        name = part.split("(", 1)[0].strip()
        entries[name] = part
    return entries
