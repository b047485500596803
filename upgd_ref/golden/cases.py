"""The golden cases: their definitions (a layout, a configuration, steps, deterministic
inputs) and the loaded form of one (``specs/golden.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import reference as ref
from ..config import Config, build, load_config
from ..layout import FlatLayout
from ..rng import standard_normals
from ..trace import logical

GOLDEN_FORMAT = "upgd_ref.golden"
GOLDEN_VERSION = 3  # 3: 16-bit cases (candidate dtype from the case); 2: the family's "variant" (specs/golden.md §1)
READABLE_VERSIONS = (1, 2, 3)  # a version-1 manifest has production AdaptiveUPGD cases only
MANIFEST = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "data"  # shipped with the package (specs/golden.md §1)
EXACT_FIELDS = ("grads", "present", "normals", "segment_step")
STATE_FIELDS = ("params", "utility", "first_moment", "second_moment")
VGS_STATE_FIELDS = ("vgs_grad_mean_avg", "vgs_grad_sq_avg")
PARAMS0_SCALE = 0.5  # initial parameters: 0.5 * standard normal


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
    # 16-bit parameters (specs/precision.md): stepped in float32, rounded to nearest; float32 state
    CaseSpec("adaptive_vgs_bf16", "bfloat16 parameters, adaptive noise, VGS, float32 state", _SMALL, "bfloat16", 30,
             _config(seed=34, vgs={"warmup_steps": 3}, **_ADAPTIVE), input_seed=1024, grad_mean=(0.3, -0.2, 0.5)),
    CaseSpec("production_defaults_f16", "float16 parameters, production defaults but lr 0.01, float32 state",
             _SIX, "float16", 30, _config(seed=35, lr=0.01, weight_decay=0.0), input_seed=1025,
             absent=((2, (3, 4, 5)),)),
)


def case_inputs(spec: CaseSpec) -> dict[str, np.ndarray]:
    """``params0`` ``(N,)``, ``grads`` ``(T, N)`` in the case dtype (bfloat16 values stored as
    float32, :func:`upgd_ref.trace.logical`) and ``present`` ``(T, S)``."""
    layout = spec.layout()
    n, dtype = layout.num_logical, layout.dtype
    params0 = logical((PARAMS0_SCALE * standard_normals(spec.input_seed, 0, 0, n)).astype(dtype))
    described = spec.inputs_description()
    scale = np.repeat(described["grad_scale"], layout.sizes)
    mean = np.repeat(described["grad_mean"], layout.sizes)
    grads = np.stack([
        logical((scale * (mean + standard_normals(spec.input_seed, k, 0, n))).astype(dtype))
        for k in range(1, spec.steps + 1)
    ])
    return {"params0": params0, "grads": grads, "present": spec.present_mask()}


# --- a loaded case ------------------------------------------------------------------------


def split_vector(layout: FlatLayout, vector, dtype=np.float64) -> list[np.ndarray]:
    """Per-segment float arrays (shaped) of a logical vector."""
    vector = np.asarray(vector, dtype=dtype)
    return [vector[o : o + s].reshape(shape)
            for o, s, shape in zip(layout.logical_offsets, layout.sizes, layout.shapes)]


def join_segments(arrays) -> np.ndarray:
    """The float64 logical vector of per-segment arrays."""
    return logical(list(arrays)).astype(np.float64)


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
        return split_vector(self.layout, vector, self.dtype if dtype is None else dtype)

    def initial_state(self) -> dict:
        """The state before step 1, as logical arrays."""
        n, s = self.layout.num_logical, self.layout.num_segments
        state = {name: np.zeros(n) for name in STATE_FIELDS}
        state["params"] = np.asarray(self.arrays["params0"], dtype=np.float64)
        state["segment_step"] = np.zeros(s, dtype=np.int64)
        state["grad_norm_ema"] = np.asarray([h["noise_ema_init"] for h in self.hyper], dtype=np.float64)
        state.update({name: np.zeros(s) for name in VGS_STATE_FIELDS})
        return state


def make_case(name: str, entry: dict, arrays: dict) -> GoldenCase:
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
