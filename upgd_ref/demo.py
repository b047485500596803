r"""``upgd-ref demo``: fixed vs adaptive noise, with and without VGS, measured.

The workload (``specs/demo.md``) is a continual-regression stream: inputs
``x ~ N(0, I_8)``, targets from a random two-layer tanh *target function* (a "teacher"
network) that is redrawn every ``drift_every`` steps, and a two-layer tanh *student*
(8 -> 32 -> 1, four segments) trained on mini-batches with hand-written backpropagation and
the core API only (:class:`AdaptiveUPGD`, :class:`VarianceGradientScaler`, :func:`record_step`).

The same stream, initial weights and noise seed are used for four runs,
{fixed sigma, adaptive sigma} x {VGS off, VGS on}. The two noise modes are calibrated to
the same noise level at the start: ``sigma_abs = sigma_rel * N``, with ``N`` the typical
per-segment gradient norm of a short probe run (:func:`probe_grad_norm`, the same
measurement ``upgd-ref migrate-config --probe demo`` makes). :class:`Runs` trains each
distinct configuration once, so :mod:`upgd_ref.claims` (the seed design's claims,
measured) reuses these runs; :mod:`upgd_ref.demo_plot` draws the picture.

Per run the table reports the mean (post-VGS) gradient norm, the mean VGS factor ``f``, the
mean noise std, the NSR (``std_i / ||g_i||``, median over segments) averaged over the first,
middle and last tenth of the run, its spread (90th / 10th percentile over all steps) and the
final loss (mean of the last tenth).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import numpy as np

from .config import Config, build, load_config
from .diagnostics import StepLog, record_step
from .layout import FlatLayout

__all__ = [
    "Workload",
    "DEMO_CONFIG",
    "RUNS",
    "DriftingTeacherStream",
    "forward_backward",
    "init_params",
    "train",
    "probe_grad_norm",
    "typical_grad_norm",
    "run_demo",
    "summarize",
    "format_table",
    "findings",
    "quick_settings",
    "Runs",
    "configure",
    "DEFAULT_STEPS",
    "QUICK",
]

# The demo's own base configuration: production hyper-parameters except a learning rate
# that lets a toy network learn in a thousand steps, a VGS warmup of 100 steps and the
# absolute sigma of the seed design's worked examples (0.005).
DEMO_CONFIG = {
    "optimizer": "AdaptiveUPGD",
    "optimizer_kwargs": {"lr": 3.0e-3, "sigma": 0.005, "adaptive_noise": False},
    "vgs": {"enabled": True, "warmup_steps": 100},
}
DEFAULT_STEPS = 600
# --quick (CI): fewer steps, a shorter warmup and faster drifts, same runs and tables.
QUICK = {"steps": 100, "warmup_steps": 20, "drift_every": 40}

# (label, adaptive_noise, VGS enabled), in table order.
RUNS = (
    ("fixed sigma, VGS off", False, False),
    ("fixed sigma, VGS on", False, True),
    ("adaptive sigma, VGS off", True, False),
    ("adaptive sigma, VGS on", True, True),
)
WINDOW_FRACTION = 0.1  # start / middle / end windows and the final-loss window
PROBE_STEPS = 200


@dataclass(frozen=True)
class Workload:
    """Sizes of the stream and the student network."""

    inputs: int = 8
    hidden: int = 32
    teacher_hidden: int = 16
    batch: int = 16
    drift_every: int = 150

    def shapes(self) -> list[tuple[int, ...]]:
        """Student segments: W1 (hidden, inputs), b1 (hidden,), W2 (1, hidden), b2 (1,)."""
        return [(self.hidden, self.inputs), (self.hidden,), (1, self.hidden), (1,)]

    def layout(self) -> FlatLayout:
        return FlatLayout(self.shapes(), dtype="float32")


class DriftingTeacherStream:
    """Mini-batches ``(x, y)``: ``y = tanh(x A^T) c``, a random *target function* (the "teacher"
    network ``(A, c)`` the student imitates) redrawn every ``drift_every`` steps.

    Every batch is a pure function of ``(seed, step)``, so all runs see the same stream.
    """

    def __init__(self, workload: Workload, seed: int):
        self.workload, self.seed = workload, seed
        self._regime, self._teacher = -1, None

    def teacher(self, step: int):
        regime = (step - 1) // self.workload.drift_every
        if regime != self._regime:
            w = self.workload
            rng = np.random.default_rng([self.seed, 1, regime])
            a = rng.standard_normal((w.teacher_hidden, w.inputs)) * (2.0 / math.sqrt(w.inputs))
            c = rng.standard_normal(w.teacher_hidden) / math.sqrt(w.teacher_hidden)
            self._regime, self._teacher = regime, (a, c)
        return self._teacher

    def batch(self, step: int):
        a, c = self.teacher(step)
        rng = np.random.default_rng([self.seed, 2, step])
        x = rng.standard_normal((self.workload.batch, self.workload.inputs))
        y = np.tanh(x @ a.T) @ c
        return x.astype(np.float32), y.astype(np.float32)[:, None]


def init_params(layout: FlatLayout, seed: int) -> np.ndarray:
    """Student weights ``N(0, 1/fan_in)``, biases 0, packed into a flat buffer."""
    rng = np.random.default_rng([seed, 0])
    arrays = [
        rng.standard_normal(shape) / math.sqrt(shape[-1]) if len(shape) == 2 else np.zeros(shape)
        for shape in layout.shapes
    ]
    return layout.pack([a.astype(np.float32) for a in arrays])


def forward_backward(layout: FlatLayout, params: np.ndarray, x: np.ndarray, y: np.ndarray):
    r"""Loss and flat gradient of ``L = mean((tanh(x W1^T + b1) W2^T + b2 - y)^2) / 2``.

    Backprop: ``e = (out - y) / B``; ``dW2 = e^T h``, ``db2 = sum e``;
    ``d = (e W2) * (1 - h^2)``; ``dW1 = d^T x``, ``db1 = sum d``.
    """
    w1, b1, w2, b2 = layout.unpack(params)
    h = np.tanh(x @ w1.T + b1)
    err = h @ w2.T + b2 - y
    loss = 0.5 * float(np.mean(err * err))
    e = err / np.float32(x.shape[0])
    d = (e @ w2) * (1.0 - h * h)
    grads = layout.pack([d.T @ x, d.sum(axis=0), e.T @ h, e.sum(axis=0)])
    return loss, grads


def configure(base: Config, *, seed: int, vgs: dict | None = None, **optimizer_kwargs) -> Config:
    """``base`` with some optimizer keyword arguments, the seed and VGS keys replaced."""
    raw = copy.deepcopy(base.raw)
    kwargs = raw.get("optimizer_kwargs") or {}
    kwargs.update(optimizer_kwargs, seed=int(seed))
    raw["optimizer_kwargs"] = kwargs
    if vgs is not None:
        raw["vgs"] = dict(raw.get("vgs") or {}, **vgs)
    return load_config(raw, source=base.source)


def _config_with(base: Config, *, adaptive: bool, sigma: float, vgs_on: bool | None, seed: int) -> Config:
    """``base`` with the noise mode, sigma, seed and VGS switch of one run replaced."""
    return configure(base, seed=seed, vgs=None if vgs_on is None else {"enabled": bool(vgs_on)},
                     adaptive_noise=adaptive, sigma=float(sigma))


def train(config: Config, workload: Workload, steps: int, seed: int, progress=None) -> StepLog:
    """Train the student for ``steps`` steps under ``config``; one record per step, with the
    metrics ``loss`` and ``backprop_grad_norm`` (each segment's ``||g_i||`` from the
    backpropagated gradient before VGS, in float64 NumPy: a check on the optimizer's own
    ``grad_norm``, which is measured after VGS scaling)."""
    layout = workload.layout()
    built = build(config, layout)
    stream = DriftingTeacherStream(workload, seed)
    params = init_params(layout, seed)
    log = StepLog()
    for step in range(1, steps + 1):
        x, y = stream.batch(step)
        loss, grads = forward_backward(layout, params, x, y)
        norms = np.array([np.sqrt(np.sum(np.square(g, dtype=np.float64))) for g in layout.unpack(grads)])
        log.append(record_step(built.optimizer, params, grads, built.scaler, loss=loss, backprop_grad_norm=norms))
        if progress is not None:
            progress.advance()
    return log


class Runs:
    """Training runs on one stream (workload, steps, seed): each distinct configuration once.

    ``progress`` (a :class:`ProgressBar`) advances by ``steps`` for every run asked for,
    trained or found already done.
    """

    def __init__(self, workload: Workload, steps: int, seed: int, progress=None):
        self.workload, self.steps, self.seed, self.progress = workload, steps, seed, progress
        self._logs: dict[str, StepLog] = {}

    def __call__(self, config: Config, label: str = "") -> StepLog:
        key = json.dumps(config.to_dict(), sort_keys=True, default=repr)  # defaults resolved
        if self.progress is not None:
            self.progress.set_label(label)
        if key in self._logs:
            if self.progress is not None:
                self.progress.advance(self.steps)
        else:
            self._logs[key] = train(config, self.workload, self.steps, self.seed, self.progress)
        return self._logs[key]

    def __len__(self) -> int:
        return len(self._logs)


def typical_grad_norm(log: StepLog, noise_norm: str = "segment") -> float:
    """The norm adaptive noise multiplies sigma by, typically: median over steps and segments.

    Per-segment norms (``noise_norm="segment"``) of present, non-empty segments with a
    non-zero gradient, or the global norm per step (``"global"``), *before* VGS scaling
    (``grad_norm / vgs_factor``): the gradient scale the absolute sigma was tuned against.
    """
    pre_vgs = log.column("pre_vgs_grad_norm")
    if noise_norm == "global":
        present = log.column("present").astype(bool)
        norms = np.sqrt(np.sum(np.where(present, pre_vgs, 0.0) ** 2, axis=1))
    else:
        norms = pre_vgs.ravel()
    norms = norms[np.isfinite(norms) & (norms > 0)]
    if not norms.size:
        raise ValueError("no non-zero gradient norm was measured")
    return float(np.median(norms))


def probe_grad_norm(config: Config, workload: Workload = Workload(), steps: int = PROBE_STEPS,
                    seed: int = 0) -> float:
    """The calibration norm ``N``: :func:`typical_grad_norm` (median pre-VGS gradient norm) of
    the first ``steps`` demo steps trained under ``config``'s hyper-parameters with its noise
    fixed at its sigma and VGS off, data and noise seeded with ``seed``. ``upgd-ref demo`` and
    ``upgd-ref migrate-config --probe demo`` both report this number."""
    probe = _config_with(config, adaptive=False, sigma=config.hyperparams["sigma"], vgs_on=False, seed=seed)
    return typical_grad_norm(train(probe, workload, steps, seed), config.noise_norm)


def _window_mean(values: np.ndarray, where: str) -> float:
    n = len(values)
    width = max(1, int(round(n * WINDOW_FRACTION)))
    start = {"start": 0, "middle": max(0, (n - width) // 2), "end": n - width}[where]
    return float(np.mean(values[start : start + width]))


def summarize(log: StepLog) -> dict:
    """The table's numbers for one run."""
    nsr = log.column("nsr")
    finite = nsr[np.isfinite(nsr)]
    p10, p90 = np.percentile(finite, [10, 90])
    return {
        "mean_grad_norm": float(np.mean(log.column("global_grad_norm"))),
        "mean_vgs_factor": float(np.mean(log.column("vgs_factor"))),
        "vgs_factor_end": _window_mean(log.column("vgs_factor"), "end"),
        "mean_noise_std": float(np.mean(log.column("mean_noise_std"))),
        "nsr_start": _window_mean(nsr, "start"),
        "nsr_middle": _window_mean(nsr, "middle"),
        "nsr_end": _window_mean(nsr, "end"),
        "nsr_spread": float(p90 / p10),
        "final_loss": _window_mean(log.column("loss"), "end"),
    }


_COLUMNS = (
    ("run", "{:<24}"),
    ("mean |g|", "{:>9.3g}"),
    ("mean f", "{:>7.3f}"),
    ("mean std", "{:>9.3g}"),
    ("NSR start", "{:>9.3g}"),
    ("NSR mid", "{:>9.3g}"),
    ("NSR end", "{:>9.3g}"),
    ("spread", "{:>7.2f}"),
    ("final loss", "{:>10.4g}"),
)
_KEYS = ("mean_grad_norm", "mean_vgs_factor", "mean_noise_std", "nsr_start", "nsr_middle",
         "nsr_end", "nsr_spread", "final_loss")


def format_table(summaries: dict) -> str:
    """Fixed-width text table, one row per run (``summaries``: label -> :func:`summarize`)."""
    widths = [len(fmt.format("x" if i == 0 else 0.0)) for i, (_, fmt) in enumerate(_COLUMNS)]
    header = " ".join(name.rjust(w) if i else name.ljust(w) for i, ((name, _), w) in enumerate(zip(_COLUMNS, widths)))
    lines = [header, "-" * len(header)]
    for label, row in summaries.items():
        cells = [_COLUMNS[0][1].format(label)]
        cells += [fmt.format(row[key]) for (_, fmt), key in zip(_COLUMNS[1:], _KEYS)]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def findings(summaries: dict, sigma_rel: float) -> list[str]:
    """The design's claims, checked against the measured numbers (nothing here is assumed)."""
    off, on = summaries[RUNS[0][0]], summaries[RUNS[1][0]]
    a_off, a_on = summaries[RUNS[2][0]], summaries[RUNS[3][0]]
    rise = on["nsr_end"] / off["nsr_end"]
    lines = [
        f"fixed sigma: VGS on/off NSR ratio at the end = {rise:.2f}x "
        f"(1 / f over the same last tenth = {1.0 / on['vgs_factor_end']:.2f}x; the ratio differs because the two "
        f"runs' gradients differ)",
        f"adaptive sigma (sigma = {sigma_rel:.4g}): NSR start/mid/end with VGS on = "
        f"{a_on['nsr_start']:.4g} / {a_on['nsr_middle']:.4g} / {a_on['nsr_end']:.4g}, spread "
        f"{a_on['nsr_spread']:.3f} (VGS off: spread {a_off['nsr_spread']:.3f})",
    ]
    return lines


def run_demo(config: Config, *, steps: int, seed: int, workload: Workload = Workload(), progress=None,
             runs: Runs | None = None) -> dict:
    """Probe, calibrate and train the four runs; returns logs, summaries and the sigmas.

    ``runs`` (a :class:`Runs` on the same stream) lets other tables reuse these runs;
    ``progress`` (``set_label(text)``, ``advance(n)``) is told about every step.
    """
    runs = Runs(workload, steps, seed, progress) if runs is None else runs
    norm = probe_grad_norm(config, runs.workload, min(PROBE_STEPS, runs.steps), runs.seed)
    sigma = config.hyperparams["sigma"]
    if config.hyperparams["adaptive_noise"]:
        sigma_rel, sigma_abs = sigma, sigma * norm
    else:
        sigma_abs, sigma_rel = sigma, sigma / norm
    logs, summaries = {}, {}
    for label, adaptive, vgs_on in RUNS:
        run_config = _config_with(config, adaptive=adaptive, sigma=sigma_rel if adaptive else sigma_abs,
                                  vgs_on=vgs_on, seed=runs.seed)
        logs[label] = runs(run_config, label)
        summaries[label] = summarize(logs[label])
    return {"logs": logs, "summaries": summaries, "probe_grad_norm": norm,
            "sigma_abs": sigma_abs, "sigma_rel": sigma_rel}


def quick_settings(config: Config, seed: int) -> tuple[int, Workload, Config]:
    """``(steps, workload, config)`` of ``--quick``: :data:`QUICK`'s steps, drift and VGS warmup."""
    quick = configure(config, seed=seed, vgs={"warmup_steps": QUICK["warmup_steps"]})
    return QUICK["steps"], Workload(drift_every=QUICK["drift_every"]), quick
