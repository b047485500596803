"""The CUDA source compiles with NVRTC for sm_90, without a GPU (``specs/kernels-cuda.md`` §6).

CuPy's low-level ``cupy.cuda.nvrtc`` API needs only the NVRTC library (the
``nvidia-cuda-nvrtc-cu12`` wheel, in the ``test`` extra), so every run of the suite compiles
every entry point and the GPU code cannot rot unseen. A missing NVRTC fails this module.
"""

from __future__ import annotations

import re

import pytest
from cupy.cuda import nvrtc

from upgd_ref.kernels.cuda_source import COMPILE_OPTIONS, KERNEL_SIGNATURES, compile_with_nvrtc, ptx_entries

#: Entry points whose every instruction is promised bit-identical to the CPU: none may hold
#: a fused multiply-add. (``family_pass2_*`` calls CUDA's exp for the paper's protection,
#: whose library code uses FMAs by design; it is judged by the tolerance contract.)
FMA_FREE = sorted(name for name in KERNEL_SIGNATURES if not name.startswith("family_pass2"))


try:
    nvrtc.getVersion()  # loads the NVRTC library, which importing CuPy does not need
except Exception as exc:
    raise RuntimeError(f"NVRTC unavailable ({type(exc).__name__}: {exc}); the test extra installs "
                       "nvidia-cuda-nvrtc-cu12") from exc


@pytest.fixture(scope="module")
def sm90():
    return compile_with_nvrtc("sm_90")


def _parameter_count(entry_text: str) -> int:
    header = entry_text.split(")", 1)[0]
    return len(re.findall(r"\.param\s", header))


def test_every_entry_point_compiles_to_ptx_and_cubin_for_sm90(sm90):
    assert sm90["cubin"] and len(sm90["cubin"]) > 10_000
    assert ".target sm_90" in sm90["ptx"]
    entries = ptx_entries(sm90["ptx"])
    assert sorted(entries) == sorted(KERNEL_SIGNATURES)  # no entry missing, none unaccounted for
    for name, kinds in KERNEL_SIGNATURES.items():
        assert _parameter_count(entries[name]) == len(kinds), name


def test_compute_90_ptx_only():
    result = compile_with_nvrtc("compute_90", cubin=False)
    assert result["cubin"] is None and ".target sm_90" in result["ptx"]


def test_no_fused_multiply_add_where_bits_are_promised(sm90):
    entries = ptx_entries(sm90["ptx"])
    assert "--fmad=false" in COMPILE_OPTIONS
    for name in FMA_FREE:
        assert "fma." not in entries[name], f"{name} contains a fused multiply-add"


def test_the_fma_check_can_fail():
    """Without --fmad=false NVRTC contracts the update's a * b + c: the check above means something."""
    options = tuple(o for o in COMPILE_OPTIONS if o != "--fmad=false")
    entries = ptx_entries(compile_with_nvrtc("sm_90", options=options, cubin=False)["ptx"])
    assert "fma." in entries["pass2_f32"] and "fma." in entries["noise_f64"]


def test_a_compile_error_carries_nvrtc_log(monkeypatch):
    from upgd_ref.kernels import cuda_source

    monkeypatch.setattr(cuda_source, "cuda_source", lambda: "extern \"C\" __global__ void broken( { }")
    with pytest.raises(RuntimeError, match="NVRTC failed to compile upgd_step.cu for sm_90"):
        cuda_source.compile_with_nvrtc("sm_90")


def test_the_gpu_loads_a_cubin_compiled_with_exactly_our_options(tmp_path, monkeypatch, sm90):
    """CuPy's own compilation would append -ftz=true; the backend loads this cached CUBIN instead."""
    from upgd_ref.kernels import cuda_source

    monkeypatch.setenv("UPGD_REF_CACHE_DIR", str(tmp_path))
    path = cuda_source.cached_cubin("sm_90")
    assert path.parent == tmp_path and path.read_bytes() == sm90["cubin"]
    assert "--ftz=false" in COMPILE_OPTIONS and not any("ftz=true" in o for o in COMPILE_OPTIONS)
    monkeypatch.setattr(cuda_source, "compile_with_nvrtc", lambda *a, **k: pytest.fail("recompiled"))
    assert cuda_source.cached_cubin("sm_90") == path  # cached: no second compilation
