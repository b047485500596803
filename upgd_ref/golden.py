r"""Golden vectors: generation, backend replay, and the trace comparator.

Normative description: ``specs/golden.md``. A *case* is a layout, a configuration (the
``specs/configs/`` format, every value explicit), a number of steps and deterministic
inputs (initial parameters, per-step gradients and presence masks, all drawn from the
library's own Philox generator so they are bit-identical everywhere). Its golden file is
a trace (:mod:`upgd_ref.trace`) of the float64 reference run free from those inputs; for a
float32 case the inputs are float32 values and the recorded trajectory is the float64 truth.

The comparator checks a candidate trace step by step against the tolerance contract
(:mod:`upgd_ref.tolerances`): step ``k`` of the candidate must lie within the contract bound
of the float64 reference step taken from the candidate's *own* state after step ``k - 1``
and the case's inputs of step ``k``, so a free-running port is judged by its rounding at
each step, never by accumulated drift; inputs and integers must match exactly. It also
reports every field's error against the golden trajectory (absolute, relative, ulps).

Example::

    >>> from upgd_ref import golden
    >>> case = golden.load_case("fixed_f64")
    >>> result = golden.compare(case, golden.replay(case, "reference"))
    >>> result.passed, result.first_divergence
    (True, None)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import reference as ref
from .arrays import as_kind, to_numpy
from .backends import BACKENDS, available_backends
from .config import Config, build, load_config
from .layout import FlatLayout
from .rng import noise as reference_noise
from .rng import standard_normals
from .tolerances import (
    REDUCTION_ULPS,
    SCALAR_ULPS_F64,
    STATE_ULPS,
    unit_roundoff,
    upgd_step_bounds,
    upgd_step_scales,
)
from .trace import ELEMENT, FIELDS, SCALAR, SEGMENT, TraceWriter, logical, read_trace, write_trace

__all__ = [
    "GOLDEN_FORMAT",
    "GOLDEN_VERSION",
    "DEFAULT_DIR",
    "CASES",
    "CaseSpec",
    "GoldenCase",
    "Comparison",
    "FieldReport",
    "TraceError",
    "case_inputs",
    "golden_trace",
    "generate",
    "load_manifest",
    "load_case",
    "check_manifest",
    "replay",
    "compare",
    "required_fields",
    "format_comparison",
    "register",
]

GOLDEN_FORMAT = "upgd_ref.golden"
GOLDEN_VERSION = 2  # 2: UPGD-family cases; each entry names its "variant" (specs/golden.md §1)
READABLE_VERSIONS = (1, 2)  # a version-1 manifest has production AdaptiveUPGD cases only
MANIFEST = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "specs" / "golden"
EXACT_FIELDS = ("grads", "present", "normals", "segment_step")
STATE_FIELDS = ("params", "utility", "first_moment", "second_moment")
VGS_STATE_FIELDS = ("vgs_grad_mean_avg", "vgs_grad_sq_avg")
PARAMS0_SCALE = 0.5  # initial parameters: 0.5 * standard normal


# --- case definitions -----------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """How to build one golden case.

    Gradient of segment ``i`` at step ``k``: ``grad_scale[i] * (grad_mean[i] + z)``, ``z`` the
    Philox normals of ``(input_seed, k)`` at the segment's logical indices, rounded to
    ``dtype``; ``params0 = 0.5 * z`` with ``z`` those of ``(input_seed, 0)``. ``absent``:
    ``(segment, steps)`` pairs, ``steps`` a tuple or ``"all"``; ``absent_steps``: steps
    at which no segment has a gradient.
    """

    name: str
    description: str
    shapes: tuple
    dtype: str
    steps: int
    config: dict
    input_seed: int
    groups: tuple | None = None
    grad_scale: tuple | None = None
    grad_mean: tuple | None = None
    absent: tuple = ()
    absent_steps: tuple = ()

    def layout(self) -> FlatLayout:
        return FlatLayout(self.shapes, self.dtype, self.groups)

    def present_mask(self) -> np.ndarray:
        mask = np.ones((self.steps, len(self.shapes)), dtype=bool)
        for segment, steps in self.absent:
            rows = slice(None) if steps == "all" else [k - 1 for k in steps]
            mask[rows, segment] = False
        for k in self.absent_steps:
            mask[k - 1, :] = False
        return mask

    def inputs_description(self) -> dict:
        n = len(self.shapes)
        return {
            "seed": self.input_seed,
            "params0": f"{PARAMS0_SCALE} * standard_normals(seed, step=0)",
            "grads": "grad_scale[i] * (grad_mean[i] + standard_normals(seed, step=k)) per segment",
            "grad_scale": list(self.grad_scale or (1.0,) * n),
            "grad_mean": list(self.grad_mean or (0.0,) * n),
            "absent": [[s, steps if steps == "all" else list(steps)] for s, steps in self.absent],
            "absent_steps": list(self.absent_steps),
        }


def _config(vgs=None, optimizer="AdaptiveUPGD", **optimizer_kwargs) -> dict:
    """A case configuration: golden base hyper-parameters plus overrides."""
    base = {"lr": 0.01, "weight_decay": 0.01, "beta_utility": 0.9, "sigma": 0.01}
    if optimizer == "UPGDW":  # beta_utility is betas[1]
        base = {"lr": 0.01, "weight_decay": 0.01, "sigma": 0.01, "betas": [0.9, 0.9]}
    return {"optimizer": optimizer, "optimizer_kwargs": {**base, **optimizer_kwargs}, "vgs": vgs}


_SMALL = ((4, 5), (6,), (1,))
_SIX = ((3,), (4,), (2, 2), (5,), (1,), (3, 2))
_ADAPTIVE = {"adaptive_noise": True, "sigma": 0.05}

CASES = (
    CaseSpec("fixed_f64", "fixed (absolute) noise, float64", _SMALL, "float64", 30,
             _config(seed=11), input_seed=1001),
    CaseSpec("fixed_f32", "fixed (absolute) noise, float32", _SMALL, "float32", 30,
             _config(seed=12), input_seed=1002),
    CaseSpec("adaptive_instant_f64", "adaptive noise, instant per-segment norm, float64", _SMALL, "float64", 30,
             _config(seed=13, **_ADAPTIVE), input_seed=1003),
    CaseSpec("adaptive_instant_f32", "adaptive noise, instant per-segment norm, float32", _SMALL, "float32", 30,
             _config(seed=14, **_ADAPTIVE), input_seed=1004),
    CaseSpec("adaptive_ema_init1_f64",
             "adaptive noise, EMA norm starting at 1.0 (production flaw 1), noise_beta 0.999",
             _SMALL, "float64", 40,
             _config(seed=15, instant_noise_scale=False, noise_ema_init=1.0, noise_beta=0.999, **_ADAPTIVE),
             input_seed=1005),
    CaseSpec("adaptive_ema_init0_f32", "adaptive noise, EMA norm starting at 0.0 (unbiased), float32",
             _SMALL, "float32", 40,
             _config(seed=16, instant_noise_scale=False, noise_ema_init=0.0, noise_beta=0.99, **_ADAPTIVE),
             input_seed=1006),
    CaseSpec("global_norm_f64", "adaptive noise scaled by the global gradient norm", _SMALL, "float64", 30,
             _config(seed=17, noise_norm="global", **_ADAPTIVE), input_seed=1007),
    CaseSpec("floor_hit_f32", "adaptive noise, segment 1's tiny gradients hit min_noise_std", _SMALL, "float32", 30,
             _config(seed=18, min_noise_std=1e-3, **_ADAPTIVE), input_seed=1008,
             grad_scale=(1.0, 1e-4, 1.0)),
    CaseSpec("vgs_warmup_cap_f64", "VGS with a 5-step warmup and a variance cap that binds (f = 1/(1+0.5*2))",
             _SMALL, "float64", 30,
             _config(seed=19, vgs={"warmup_steps": 5, "variance_cap": 2.0, "alpha": 0.5}, **_ADAPTIVE),
             input_seed=1009),
    CaseSpec("vgs_quantile_f64", "VGS without cap on six segments of distinct mean/variance (interpolated 0.9 quantile)",
             _SIX, "float64", 30,
             _config(seed=20, vgs={"warmup_steps": 3, "variance_cap": None}, **_ADAPTIVE), input_seed=1010,
             grad_mean=(1.0, 0.5, 2.0, -1.0, 0.3, 1.5), grad_scale=(1.0, 0.2, 1.0, 3.0, 1.0, 0.5)),
    CaseSpec("vgs_min_factor_f32", "VGS with alpha 100 clipped at min_scaling_factor 0.2, fixed noise",
             _SMALL, "float32", 30,
             _config(seed=21, vgs={"warmup_steps": 2, "variance_cap": None, "alpha": 100.0,
                                   "min_scaling_factor": 0.2}), input_seed=1011),
    CaseSpec("frozen_zero_size_f64",
             "zero-size segments 1 and 2, segment 3 never has a gradient, segment 4 intermittently, "
             "no gradient at all at step 6; VGS and adaptive noise",
             ((4, 3), (0,), (2, 0), (5,), (3,)), "float64", 30,
             _config(seed=22, vgs={"warmup_steps": 2}, **_ADAPTIVE), input_seed=1012,
             absent=((3, "all"), (4, (2, 3, 9, 10, 11, 17, 25))), absent_steps=(6,)),
    CaseSpec("param_groups_f64", "explicit parameter groups with their own lr, noise mode and sigma, VGS",
             ((4, 3), (3,), (2, 3), (2,)), "float64", 30,
             _config(seed=23, vgs={"warmup_steps": 4}, param_groups=[
                 {"segments": [0, 1], "lr": 0.02, "adaptive_noise": True, "sigma": 0.1},
                 {"segments": [2], "sigma": 0.005, "weight_decay": 0.0},
             ]), input_seed=1013),
    CaseSpec("param_groups_layout_f32", "parameter groups matched by the layout's group ids, float32",
             ((4, 3), (3,), (2, 3), (2,)), "float32", 30,
             _config(seed=24, param_groups=[
                 {"adaptive_noise": True, "instant_noise_scale": False, "noise_ema_init": 0.0,
                  "noise_beta": 0.9, "sigma": 0.05},
                 {"beta1": 0.5, "beta2": 0.9, "eps": 1e-6},
             ]), input_seed=1014, groups=(0, 1, 0, 1)),
    CaseSpec("production_defaults_f32", "every production default, VGS defaults (still warming up)",
             _SMALL, "float32", 40,
             {"optimizer": "AdaptiveUPGD", "optimizer_kwargs": {"seed": 25}, "vgs": {}}, input_seed=1015),
    # --- the other members of the UPGD family (specs/algorithm.md §7) ---
    CaseSpec("upgd_plain_f64", "UPGD (production, no moments): fixed noise, VGS, a frozen segment",
             _SMALL, "float64", 30,
             _config(seed=26, optimizer="UPGD", vgs={"warmup_steps": 3}), input_seed=1016,
             absent=((2, (4, 5, 12)),)),
    CaseSpec("upgd_plain_adaptive_f32", "UPGD (production, no moments): adaptive noise, float32",
             _SMALL, "float32", 30,
             _config(seed=27, optimizer="UPGD", **_ADAPTIVE), input_seed=1017),
    CaseSpec("upgdw_f64", "UPGDW: beta_utility tied to betas[1] = 0.9, adaptive noise, VGS",
             _SMALL, "float64", 30,
             _config(seed=28, optimizer="UPGDW", vgs={"warmup_steps": 4}, **_ADAPTIVE), input_seed=1018),
    CaseSpec("upgdw_defaults_f32", "UPGDW with every production default (lr 1e-4, wd 0.01, betas 0.9/0.999)",
             _SMALL, "float32", 30,
             {"optimizer": "UPGDW", "optimizer_kwargs": {"seed": 29}, "vgs": None}, input_seed=1019),
    CaseSpec("paper_adam_f64",
             "AdaptiveUPGD profile paper: sigmoid((u/cu)/U_hi), twice the step, noise in both terms, eps 1e-5",
             _SMALL, "float64", 30,
             _config(seed=30, profile="paper", vgs={"warmup_steps": 3}, **_ADAPTIVE), input_seed=1020,
             grad_mean=(0.3, -0.2, 0.5)),
    CaseSpec("paper_adam_f32", "AdaptiveUPGD profile paper, fixed noise, float32",
             _SMALL, "float32", 30,
             _config(seed=31, profile="paper"), input_seed=1021, grad_mean=(0.3, -0.2, 0.5)),
    CaseSpec("paper_plain_f64", "UPGD profile paper: plain gradient, sigmoid((u/cu)/U_hi), twice the step",
             _SMALL, "float64", 30,
             _config(seed=32, optimizer="UPGD", profile="paper", vgs={"warmup_steps": 3}, **_ADAPTIVE),
             input_seed=1022, grad_mean=(0.3, -0.2, 0.5)),
    CaseSpec("paper_plain_f32", "UPGD profile paper, fixed noise, float32",
             _SMALL, "float32", 30,
             _config(seed=33, optimizer="UPGD", profile="paper"), input_seed=1023, grad_mean=(0.3, -0.2, 0.5)),
)


def case_inputs(spec: CaseSpec) -> dict[str, np.ndarray]:
    """``params0`` ``(N,)``, ``grads`` ``(T, N)`` in the case dtype and ``present`` ``(T, S)``."""
    layout = spec.layout()
    n, dtype = layout.num_logical, np.dtype(spec.dtype)
    params0 = (PARAMS0_SCALE * standard_normals(spec.input_seed, 0, 0, n)).astype(dtype)
    described = spec.inputs_description()
    scale = np.repeat(described["grad_scale"], layout.sizes)
    mean = np.repeat(described["grad_mean"], layout.sizes)
    grads = np.stack([
        (scale * (mean + standard_normals(spec.input_seed, k, 0, n))).astype(dtype)
        for k in range(1, spec.steps + 1)
    ])
    return {"params0": params0, "grads": grads, "present": spec.present_mask()}


# --- one reference step on logical vectors ------------------------------------------------


def _split(layout: FlatLayout, vector, dtype=np.float64) -> list[np.ndarray]:
    """Per-segment float arrays (shaped) of a logical vector."""
    vector = np.asarray(vector, dtype=dtype)
    return [vector[o : o + s].reshape(shape)
            for o, s, shape in zip(layout.logical_offsets, layout.sizes, layout.shapes)]


def _joined(arrays) -> np.ndarray:
    """The float64 logical vector of per-segment arrays."""
    return logical(list(arrays)).astype(np.float64)


@dataclass
class _Step:
    """The float64 reference step ``k`` from a given state: values and contract scales."""

    values: dict
    scales: dict
    vgs_scales: dict | None


def _reference_step(case: GoldenCase, k: int, prev: dict, factor=None) -> _Step:
    """Step ``k`` of ``case`` by the float64 reference from ``prev`` (state after step k - 1).

    ``prev`` holds logical arrays for :data:`STATE_FIELDS`, ``segment_step``,
    ``grad_norm_ema`` and, with VGS, the VGS statistics. ``factor`` replaces the VGS factor
    computed from ``prev`` (the candidate's own ``f``, once that has been checked).
    """
    layout, inputs = case.layout, case.arrays
    present = [bool(b) for b in inputs["present"][k - 1]]
    grads = _split(layout, inputs["grads"][k - 1])
    normals = _split(layout, inputs["normals"][k - 1])
    values, vgs_scales = {}, None
    if case.vgs is not None:
        vgs_state = ref.VGSState(np.int64(k - 1), np.asarray(prev["vgs_grad_mean_avg"], dtype=np.float64),
                                 np.asarray(prev["vgs_grad_sq_avg"], dtype=np.float64))
        with np.errstate(all="ignore"):
            f, g = ref.vgs_scaling_factor(vgs_state, **case.vgs)
        values["vgs_factor"], values["vgs_normalized_variance"] = float(f), float(g)
        grads = ref.vgs_scale(grads, np.float64(values["vgs_factor"] if factor is None else factor), present)
        updated = ref.vgs_update(vgs_state, grads, beta=case.vgs["beta"], present=present)
        values["vgs_grad_mean_avg"] = np.asarray(updated.grad_mean_avg)
        values["vgs_grad_sq_avg"] = np.asarray(updated.grad_sq_avg)
        vgs_scales = _vgs_scales(vgs_state, grads, case.vgs["beta"], present)
    state = ref.UPGDState(
        step=np.int64(k - 1),
        segment_step=np.asarray(prev["segment_step"], dtype=np.int64),
        utility=_split(layout, prev["utility"]),
        first_moment=_split(layout, prev["first_moment"]),
        second_moment=_split(layout, prev["second_moment"]),
        grad_norm_ema=np.asarray(prev["grad_norm_ema"], dtype=np.float64),
    )
    (new_params, new_state, stats), scales = upgd_step_scales(
        _split(layout, prev["params"]), grads, state, normals, case.hyper, present=present,
        noise_norm=case.config.noise_norm, variant=case.variant,
    )
    values.update(
        params=_joined(new_params), utility=_joined(new_state.utility),
        first_moment=_joined(new_state.first_moment), second_moment=_joined(new_state.second_moment),
        segment_step=np.asarray(new_state.segment_step, dtype=np.int64),
        grad_norm_ema=np.asarray(new_state.grad_norm_ema, dtype=np.float64),
        grad_norm=np.asarray(stats.grad_norm, dtype=np.float64),
        noise_std=np.asarray(stats.noise_std, dtype=np.float64),
        utility_min=float(stats.utility_min), utility_max=float(stats.utility_max),
    )
    scales["grad_norm_ema"] = _ema_norm_scales(case, prev, values["grad_norm"], present)
    return _Step(values, scales, vgs_scales)


def _vgs_scales(vgs_state, grads, beta, present) -> dict:
    """Scales of ``a_i``, ``b_i``: ``|beta * old| + (1 - beta) * mean(|g|)`` (resp. ``g**2``)."""
    a, b = np.zeros(len(grads)), np.zeros(len(grads))
    for i, g in enumerate(grads):
        if present[i] and g.size:
            a[i] = abs(beta * vgs_state.grad_mean_avg[i]) + (1.0 - beta) * float(np.mean(np.abs(g)))
            b[i] = abs(beta * vgs_state.grad_sq_avg[i]) + (1.0 - beta) * float(np.mean(g * g))
    return {"vgs_grad_mean_avg": a, "vgs_grad_sq_avg": b}


def _ema_norm_scales(case, prev, grad_norm, present) -> np.ndarray:
    """Scale of ``n_i = nb * n_old + (1 - nb) * r``; 0 where ``n_i`` must stay unchanged."""
    out = np.zeros(len(present))
    global_norm = math.sqrt(sum(float(grad_norm[i]) ** 2 for i in range(len(present)) if present[i]))
    for i, h in enumerate(case.hyper):
        if present[i] and h["adaptive_noise"]:
            r = float(grad_norm[i]) if case.config.noise_norm == "segment" else global_norm
            out[i] = abs(h["noise_beta"] * float(prev["grad_norm_ema"][i])) + abs((1.0 - h["noise_beta"]) * r)
    return out


# --- golden generation ------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenCase:
    """A case ready to run: layout, validated config, per-segment hyper-parameters, arrays."""

    name: str
    entry: dict
    layout: FlatLayout
    config: Config
    hyper: list
    arrays: dict
    variant: ref.UPGDVariant = ref.PRODUCTION

    @property
    def steps(self) -> int:
        return int(self.entry["steps"])

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    @property
    def vgs(self) -> dict | None:
        return self.config.vgs

    def segments(self, vector, dtype=None) -> list[np.ndarray]:
        """Per-segment arrays (in the layout's shapes) of a logical vector, e.g. ``arrays['grads'][k-1]``."""
        return _split(self.layout, vector, self.dtype if dtype is None else dtype)

    def initial_state(self) -> dict:
        """The state before step 1, as logical arrays."""
        n, s = self.layout.num_logical, self.layout.num_segments
        state = {name: np.zeros(n) for name in STATE_FIELDS}
        state["params"] = np.asarray(self.arrays["params0"], dtype=np.float64)
        state["segment_step"] = np.zeros(s, dtype=np.int64)
        state["grad_norm_ema"] = np.asarray([h["noise_ema_init"] for h in self.hyper], dtype=np.float64)
        state.update({name: np.zeros(s) for name in VGS_STATE_FIELDS})
        return state


def _make_case(name: str, entry: dict, arrays: dict) -> GoldenCase:
    """The case's optimizer class and profile come from its config; the optimizer resolves
    the per-segment hyper-parameters (UPGDW's ``beta_utility = beta2``, the paper's eps)."""
    layout = FlatLayout.from_dict(entry["layout"])
    config = load_config(entry["config"], source=f"golden case {name}")
    optimizer = build(config, layout, backend="reference").optimizer
    variant = optimizer.variant
    if "variant" in entry and ref.check_variant(entry["variant"]) != variant:
        raise ValueError(f"golden case {name}: manifest variant {entry['variant']} differs from the one its "
                         f"config builds ({dict(variant._asdict())})")
    return GoldenCase(name, entry, layout, config, optimizer.step_hyperparams(), arrays, variant)


def golden_trace(spec: CaseSpec) -> tuple[dict, dict]:
    """``(manifest entry without file/sha256, trace arrays)`` of a case: the float64 reference run."""
    layout = spec.layout()
    config = load_config(spec.config, source=f"golden case {spec.name}")
    variant = build(config, layout, backend="reference").optimizer.variant
    entry = {"name": spec.name, "description": spec.description, "steps": spec.steps,
             "dtype": spec.dtype, "layout": layout.to_dict(), "config": config.to_dict(),
             "variant": dict(variant._asdict()), "inputs": spec.inputs_description()}
    arrays = case_inputs(spec)
    arrays["normals"] = np.stack([logical(layout.unpack(reference_noise(layout, config.seed, k)))
                                  for k in range(1, spec.steps + 1)])
    case = _make_case(spec.name, entry, arrays)
    state, rows = case.initial_state(), []
    for k in range(1, spec.steps + 1):
        values = _reference_step(case, k, state).values
        rows.append(values)
        state = {**state, **values}
    for name in FIELDS:
        if name not in arrays and name in rows[0]:
            arrays[name] = np.stack([np.asarray(row[name]) for row in rows])
    return entry, arrays


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def generate(out_dir=DEFAULT_DIR, specs=CASES) -> dict:
    """Write every case's trace and ``manifest.json`` to ``out_dir``; return the manifest.

    Byte-deterministic: traces go through :func:`upgd_ref.trace.write_npz` and the manifest is
    JSON with a fixed key order. Files listed by a previous manifest and no longer produced
    are removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = set()
    if (out_dir / MANIFEST).exists():
        old = {c["file"] for c in load_manifest(out_dir)["cases"]}
    cases = []
    for spec in specs:
        entry, arrays = golden_trace(spec)
        path = out_dir / f"{spec.name}.npz"
        write_trace(path, arrays, case=spec.name)
        cases.append({**entry, "file": path.name, "sha256": _sha256(path)})
    for stale in old - {c["file"] for c in cases}:
        (out_dir / stale).unlink(missing_ok=True)
    manifest = {"format": GOLDEN_FORMAT, "version": GOLDEN_VERSION,
                "generator": "upgd-ref golden generate", "cases": cases}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


# --- loading and integrity ----------------------------------------------------------------


def load_manifest(golden_dir=DEFAULT_DIR) -> dict:
    path = Path(golden_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no golden manifest (run `upgd-ref golden generate` or pass --golden)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{path}: not a golden manifest (format must be {GOLDEN_FORMAT!r})")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: manifest version {manifest.get('version')!r}, this reader knows "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    return manifest


def check_manifest(golden_dir=DEFAULT_DIR) -> list[str]:
    """Integrity problems: hash mismatches, missing files, files the manifest does not list."""
    golden_dir = Path(golden_dir)
    manifest = load_manifest(golden_dir)
    problems, listed = [], set()
    for entry in manifest["cases"]:
        path = golden_dir / entry["file"]
        listed.add(entry["file"])
        if not path.exists():
            problems.append(f"{entry['name']}: {entry['file']} is missing")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{entry['name']}: sha256 of {entry['file']} is {_sha256(path)}, manifest says {entry['sha256']}")
    for path in sorted(golden_dir.glob("*.npz")):
        if path.name not in listed:
            problems.append(f"{path.name} is not listed in {MANIFEST}")
    return problems


def load_case(name: str, golden_dir=DEFAULT_DIR) -> GoldenCase:
    """A golden case from ``golden_dir``; its file must match the manifest's sha256."""
    golden_dir = Path(golden_dir)
    manifest = load_manifest(golden_dir)
    entries = {c["name"]: c for c in manifest["cases"]}
    if name not in entries:
        raise KeyError(f"no golden case {name!r}; cases: {', '.join(entries)}")
    entry = entries[name]
    path = golden_dir / entry["file"]
    if _sha256(path) != entry["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {MANIFEST}; the golden file was modified")
    _, arrays = read_trace(path)
    return _make_case(name, entry, arrays)


# --- replay through the stateful API -----------------------------------------------------


def replay(case: GoldenCase, backend: str = "auto", *, fused: bool = True) -> dict:
    """Run ``case`` through its optimizer class (+ scaler) on ``backend``; return its trace arrays.

    The class and profile are the case config's (``AdaptiveUPGD``, ``UPGD``, ``UPGDW``).

    ``fused``: with a scaler, one ``opt.step(..., vgs=scaler)`` call per step; otherwise the
    three calls ``scaler.scale``, ``opt.step``, ``scaler.update``.
    """
    layout = case.layout
    built = build(case.config, layout, backend=backend)
    opt, scaler = built.optimizer, built.scaler
    kind = "numpy" if backend == "auto" else BACKENDS[backend].array_kind  # CuPy backends: buffers on the GPU
    params = as_kind(layout.pack(case.segments(case.arrays["params0"])), kind)
    writer = TraceWriter(case=case.name)
    writer.set_initial(layout.unpack(to_numpy(params)))
    for k in range(1, case.steps + 1):
        host_grads = layout.pack(case.segments(case.arrays["grads"][k - 1]))
        grads = as_kind(host_grads, kind)
        present = [bool(b) for b in case.arrays["present"][k - 1]]
        fields = dict(grads=[g.copy() for g in layout.unpack(host_grads)], present=np.asarray(present),
                      normals=layout.unpack(to_numpy(opt.noise())))
        if scaler is None or fused:
            info = opt.step(params, grads, present, vgs=scaler)
            factor, variance = info.vgs_factor, info.vgs_normalized_variance
        else:
            variance = scaler.normalized_variance()  # the G behind this step's f
            factor = scaler.scale(grads, present)
            info = opt.step(params, grads, present)
            scaler.update(grads, present)
        fields.update(
            params=layout.unpack(to_numpy(params)), segment_step=opt.state.segment_step,
            grad_norm_ema=opt.state.grad_norm_ema, grad_norm=info.grad_norm, noise_std=info.noise_std,
            utility_min=info.utility_min, utility_max=info.utility_max,
            **{name: layout.unpack(to_numpy(getattr(opt.state, name))) for name in STATE_FIELDS[1:]},
        )
        if scaler is not None:
            fields.update(vgs_factor=factor, vgs_normalized_variance=variance,
                          vgs_grad_mean_avg=scaler.state.grad_mean_avg, vgs_grad_sq_avg=scaler.state.grad_sq_avg)
        writer.add_step(**fields)
    return writer.arrays()


# --- the comparator -------------------------------------------------------------------------


@dataclass
class FieldReport:
    """One field at one step: error against the golden trajectory and against the contract."""

    step: int
    field: str
    max_abs: float  # max |candidate - golden|
    max_rel: float  # max |candidate - golden| / |golden|
    max_ulp: float  # max |candidate - golden| in ulps of the candidate's dtype at |golden|
    contract: float  # max |candidate - local truth| / bound (inf: an exact field differs)
    where: str  # the element with the largest contract ratio
    candidate: float
    truth: float
    bound: float

    @property
    def failed(self) -> bool:
        return not self.contract <= 1.0


@dataclass
class Comparison:
    case: str
    dtype: str
    steps: int
    fields: list
    missing: list
    reports: list = field(default_factory=list)

    @property
    def failures(self) -> list:
        return [r for r in self.reports if r.failed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def first_divergence(self) -> FieldReport | None:
        failures = self.failures
        return failures[0] if failures else None

    def to_dict(self) -> dict:
        def plain(x):
            return x if not isinstance(x, float) or math.isfinite(x) else str(x)

        return {"case": self.case, "dtype": self.dtype, "steps": self.steps, "passed": self.passed,
                "fields": self.fields, "missing": self.missing,
                "reports": [{k: plain(v) for k, v in vars(r).items()} for r in self.reports]}


class TraceError(ValueError):
    """The trace cannot be compared (missing fields, wrong shapes): not a numerical failure."""


def required_fields(case: GoldenCase) -> list[str]:
    """Fields a trace must hold to be checked step by step (``specs/golden.md`` §3)."""
    needed = list(STATE_FIELDS)
    if any(h["adaptive_noise"] for h in case.hyper):
        needed.append("grad_norm_ema")
    if case.vgs is not None:
        needed.extend(VGS_STATE_FIELDS)
    return needed


def _check_shapes(case: GoldenCase, trace: dict) -> None:
    t, n, s = case.steps, case.layout.num_logical, case.layout.num_segments
    expected = {ELEMENT: (t, n), SEGMENT: (t, s), SCALAR: (t,)}
    for name, value in trace.items():
        shape = (n,) if name == "params0" else expected[FIELDS[name][0]]
        if value.shape != shape:
            raise TraceError(f"trace field {name!r} has shape {value.shape}, case {case.name!r} needs {shape}")
        if name not in ("present", "segment_step") and not np.issubdtype(value.dtype, np.floating):
            raise TraceError(f"trace field {name!r} must be floating point, got {value.dtype}")
    if trace["params"].dtype.name not in ("float32", "float64"):
        raise TraceError(f"trace field 'params' must be float32 or float64, got {trace['params'].dtype}")


def _ratios(candidate, truth, bound) -> np.ndarray:
    """``|candidate - truth| / bound`` per element: 0 when equal (NaN == NaN), inf when one is NaN."""
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), truth.shape).reshape(-1)
    error = np.abs(candidate - truth)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0.0, 0.0, error / bound)
    same_nan = np.isnan(candidate) & np.isnan(truth)
    one_nan = np.isnan(candidate) ^ np.isnan(truth)
    return np.where(same_nan, 0.0, np.where(one_nan, np.inf, ratio))


def _golden_errors(candidate, golden, dtype) -> tuple[float, float, float]:
    """Max absolute, relative and ulp error of the candidate against the golden trajectory."""
    c = np.asarray(candidate, dtype=np.float64).reshape(-1)
    g = np.asarray(golden, dtype=np.float64).reshape(-1)
    if not c.size:
        return 0.0, 0.0, 0.0
    both_nan = np.isnan(c) & np.isnan(g)
    error = np.where(both_nan, 0.0, np.abs(c - g))
    error = np.where(np.isnan(error), np.inf, error)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(error == 0.0, 0.0, error / np.abs(g))
        ulp = np.where(error == 0.0, 0.0, error / np.spacing(np.abs(np.nan_to_num(g)).astype(dtype)).astype(np.float64))
    return float(error.max()), float(np.nanmax(rel)), float(np.nanmax(ulp))


def _where(case: GoldenCase, name: str, index: int) -> str:
    kind = FIELDS[name][0] if name in FIELDS else ELEMENT
    if kind == SCALAR:
        return "-"
    if kind == SEGMENT:
        return f"segment {index}"
    layout = case.layout
    # Zero-size segments share their offset with the next one; side="right" skips them.
    segment = int(np.searchsorted(np.asarray(layout.logical_offsets), index, side="right") - 1)
    return f"segment {segment} element {index - layout.logical_offsets[segment]}"


def _relative_bound(u: float, terms, scale) -> np.ndarray:
    """The contract's reduction rule: ``(REDUCTION_ULPS * u + n * 2**-53) * scale``."""
    return (REDUCTION_ULPS * u + np.asarray(terms, dtype=np.float64) * 2.0**-53) * np.abs(scale)


def _step_bounds(case: GoldenCase, step: _Step, dtype, present) -> dict:
    """Allowed |candidate - truth| per field at one step (``specs/golden.md`` §3)."""
    u = unit_roundoff(dtype)
    sizes = case.layout.sizes
    per_segment = upgd_step_bounds(step.scales, dtype, sizes)
    bounds = {name: _joined(per_segment[name]) for name in STATE_FIELDS}
    bounds["grad_norm"] = per_segment["grad_norm"]
    terms = sizes if case.config.noise_norm == "segment" else [sum(s for s, p in zip(sizes, present) if p)] * len(sizes)
    bounds["noise_std"] = _relative_bound(u, terms, step.values["noise_std"])
    bounds["grad_norm_ema"] = _relative_bound(u, terms, step.scales["grad_norm_ema"])
    scale_u = [s for s, p in zip(step.scales["utility"], present) if p and s.size]
    extreme = STATE_ULPS * u * max((float(np.max(s)) for s in scale_u), default=0.0)
    bounds["utility_min"] = bounds["utility_max"] = extreme
    if step.vgs_scales is not None:
        for name in ("vgs_factor", "vgs_normalized_variance"):
            bounds[name] = SCALAR_ULPS_F64 * 2.0**-53 * abs(step.values[name])
        for name in VGS_STATE_FIELDS:
            bounds[name] = _relative_bound(u, sizes, step.vgs_scales[name])
    return bounds


def _report(case, k, name, candidate, golden, truth, bound, dtype) -> FieldReport:
    ratios = _ratios(candidate, truth, bound)
    worst = int(np.argmax(ratios)) if ratios.size else 0
    flat = lambda x: np.asarray(x, dtype=np.float64).reshape(-1)  # noqa: E731
    pick = lambda x: float(flat(x)[worst]) if flat(x).size else math.nan  # noqa: E731
    return FieldReport(
        k, name, *_golden_errors(candidate, golden, dtype),
        contract=float(ratios.max()) if ratios.size else 0.0, where=_where(case, name, worst),
        candidate=pick(candidate), truth=pick(truth),
        bound=pick(np.broadcast_to(np.asarray(bound, dtype=np.float64), flat(truth).shape)),
    )


def compare(case: GoldenCase, trace: dict, *, per_step_callback=None) -> Comparison:
    """Check a candidate trace (field -> stacked array) against ``case`` (``specs/golden.md`` §3)."""
    trace = {k: np.asarray(v) for k, v in trace.items()}
    missing_required = [f for f in required_fields(case) if f not in trace]
    if missing_required:
        raise TraceError(f"trace lacks required field(s) {missing_required} for case {case.name!r}")
    if case.vgs is None and any(f.startswith("vgs_") for f in trace):
        raise TraceError(f"case {case.name!r} has no VGS but the trace has VGS fields")
    _check_shapes(case, trace)
    dtype = trace["params"].dtype
    gold = case.arrays
    fields = [f for f in ("params0", *FIELDS) if f in trace]
    result = Comparison(case.name, dtype.name, case.steps, fields,
                        [f for f in ("params0", *FIELDS) if f in gold and f not in trace])
    if "params0" in trace:
        result.reports.append(_report(case, 0, "params0", trace["params0"], gold["params0"], gold["params0"], 0.0, dtype))
    prev = case.initial_state()
    if "params0" in trace:
        prev["params"] = trace["params0"]
    for k in range(1, case.steps + 1):
        row = k - 1
        present = [bool(b) for b in gold["present"][row]]
        step = _reference_step(case, k, prev)
        if case.vgs is not None and "vgs_factor" in trace:
            truth_f, candidate_f = step.values["vgs_factor"], float(trace["vgs_factor"][row])
            if candidate_f != truth_f and abs(candidate_f - truth_f) <= SCALAR_ULPS_F64 * 2.0**-53 * abs(truth_f):
                # f is within its contract: judge the rest of the step from the candidate's own f.
                step = _reference_step(case, k, prev, candidate_f)
        bounds = _step_bounds(case, step, dtype, present)
        for name in fields:
            if name == "params0":
                continue
            golden_value = gold[name][row]
            if name in EXACT_FIELDS:
                result.reports.append(_report(case, k, name, trace[name][row], golden_value, golden_value, 0.0, dtype))
            else:
                result.reports.append(_report(case, k, name, trace[name][row], golden_value,
                                              step.values[name], bounds[name], dtype))
        # The next step starts from the candidate's state (golden values for fields it lacks).
        prev = {**prev, **{name: gold[name][row] for name in ("segment_step", "grad_norm_ema", *VGS_STATE_FIELDS)
                           if name in gold}}
        prev.update({name: trace[name][row] for name in (*STATE_FIELDS, "grad_norm_ema", *VGS_STATE_FIELDS)
                     if name in trace})
        if per_step_callback is not None:
            per_step_callback(k)
    return result


# --- command line -------------------------------------------------------------------------


def format_comparison(result: Comparison, *, per_step: bool = False, limit: int = 10) -> str:
    """The human-readable report: per-field summary, optional per-step table, verdict."""
    lines = [f"golden case {result.case!r}: {result.steps} steps; trace dtype {result.dtype}",
             f"checked fields: {', '.join(result.fields)}"]
    if result.missing:
        lines.append(f"not in the trace (not checked): {', '.join(result.missing)}")
    header = f"{'field':<24} {'max abs err':>11} {'max rel err':>11} {'max ulps':>9} {'contract':>9}  worst at"
    rows = []
    for name in result.fields:
        reports = [r for r in result.reports if r.field == name]
        worst = max(reports, key=lambda r: (r.contract, r.max_abs))
        where = f"step {worst.step}, {worst.where}" if worst.contract > 0 else "-"
        rows.append(f"{name:<24} {max(r.max_abs for r in reports):11.3g} {max(r.max_rel for r in reports):11.3g} "
                    f"{max(r.max_ulp for r in reports):9.3g} {worst.contract:9.3g}  {where}")
    lines += ["", "vs golden trajectory (abs/rel/ulps) and vs contract (max error / bound, <= 1 passes):",
              header, *rows]
    if per_step:
        lines += ["", f"{'step':>4} {header}"]
        lines += [f"{r.step:>4} {r.field:<24} {r.max_abs:11.3g} {r.max_rel:11.3g} {r.max_ulp:9.3g} {r.contract:9.3g}  {r.where}"
                  for r in result.reports]
    lines.append("")
    first = result.first_divergence
    if first is None:
        lines.append("PASS: every step within the tolerance contract")
    else:
        lines.append(
            f"FAIL: first divergence at step {first.step}, field {first.field!r} ({first.where}): "
            f"trace {first.candidate!r}, reference {first.truth!r}, error {abs(first.candidate - first.truth):.3g} "
            f"> bound {first.bound:.3g}"
        )
        others = result.failures[1:limit]
        for r in others:
            lines.append(f"  also beyond the contract: step {r.step}, {r.field} ({r.where}), {r.contract:.3g} x bound")
        if len(result.failures) > limit:
            lines.append(f"  ... {len(result.failures) - limit} more")
    return "\n".join(lines)


def _cmd_generate(args) -> int:
    manifest = generate(args.out)
    total = sum((Path(args.out) / c["file"]).stat().st_size for c in manifest["cases"])
    for case in manifest["cases"]:
        print(f"{case['name']:<26} {case['sha256'][:16]}  {case['description']}")
    print(f"wrote {len(manifest['cases'])} cases ({total / 1024:.0f} KiB) and {MANIFEST} to {args.out}")
    return 0


def _cmd_list(args) -> int:
    for case in load_manifest(args.golden)["cases"]:
        print(f"{case['name']:<26} {case['layout']['dtype']:<8} {case['steps']:>3} steps  {case['description']}")
    return 0


def _cmd_compare(args) -> int:
    try:
        meta, trace = read_trace(args.trace)
        name = args.case or meta.get("case")
        if not name:
            raise TraceError("the trace names no case: pass --case NAME")
        result = compare(load_case(name, args.golden), trace)
    except (TraceError, KeyError, ValueError, FileNotFoundError) as exc:
        print(f"upgd-ref golden compare: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(result, per_step=args.per_step))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    return 0 if result.passed else 1


def _cmd_verify(args) -> int:
    problems = check_manifest(args.golden)
    for problem in problems:
        print(f"integrity: {problem}")
    backends = args.backend or available_backends(emulators=True)
    for entry in load_manifest(args.golden)["cases"]:
        case = load_case(entry["name"], args.golden)
        for backend in backends:
            for fused in (True, False) if case.vgs is not None else (True,):
                result = compare(case, replay(case, backend, fused=fused))
                worst = max((r.contract for r in result.reports), default=0.0)
                verdict = "ok" if result.passed else "FAIL"
                path = "fused" if fused and case.vgs is not None else "calls"
                print(f"{verdict:<4} {backend:<10} {path:<5} {case.name:<26} worst {worst:.3g} x bound")
                if not result.passed:
                    problems.append(format_comparison(result).splitlines()[-1])
    print("all golden cases verified" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def register(subparsers) -> None:
    """Add ``upgd-ref golden {generate,list,compare,verify}``."""
    parser = subparsers.add_parser("golden", help="golden vectors: generate, list, compare a trace, verify backends")
    sub = parser.add_subparsers(dest="golden_command", required=True)

    gen = sub.add_parser("generate", help="write specs/golden/ (deterministic) from the float64 reference")
    gen.add_argument("--out", default=str(DEFAULT_DIR), help=f"directory (default {DEFAULT_DIR})")
    gen.set_defaults(run=_cmd_generate)

    listing = sub.add_parser("list", help="list the golden cases")
    listing.add_argument("--golden", default=str(DEFAULT_DIR), help="golden directory")
    listing.set_defaults(run=_cmd_list)

    cmp_ = sub.add_parser("compare", help="check a trace (.npz, specs/golden.md) against a golden case")
    cmp_.add_argument("trace", help="trace file written with upgd_ref.trace.TraceWriter or the documented format")
    cmp_.add_argument("--case", help="golden case name (default: the trace's meta.case)")
    cmp_.add_argument("--golden", default=str(DEFAULT_DIR), help="golden directory")
    cmp_.add_argument("--per-step", action="store_true", help="print every step and field")
    cmp_.add_argument("--json", help="also write the full report as JSON here")
    cmp_.set_defaults(run=_cmd_compare)

    ver = sub.add_parser("verify", help="check manifest hashes and replay every case on every backend")
    ver.add_argument("--golden", default=str(DEFAULT_DIR), help="golden directory")
    ver.add_argument("--backend", action="append", choices=list(BACKENDS), help="only this backend (repeatable)")
    ver.set_defaults(run=_cmd_verify)
