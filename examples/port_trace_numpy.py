#!/usr/bin/env python
"""A "port" of AdaptiveUPGD + VGS as a plain NumPy loop, checked against a golden case.

This is what someone porting the algorithm (to JAX, TensorFlow, C++...) does: run their own
implementation on a golden case's inputs, write a trace, and hand it to the comparator.
The loop below uses no ``upgd_ref`` math; it only reads the case (layout, per-segment
hyper-parameters, inputs) and writes the trace with :class:`upgd_ref.trace.TraceWriter`.
It takes the standard normals from the golden file, so the optimizer math is tested
separately from the port's random-number generator (``specs/noise.md`` defines that one).

    python examples/port_trace_numpy.py adaptive_instant_f32 --out /tmp/trace.npz
    upgd-ref golden compare /tmp/trace.npz            # the trace names its case

Computation follows ``specs/algorithm.md``: element-wise math in the case's dtype,
per-segment scalars (norms, noise std, VGS statistics) in float64. A 16-bit case
(``specs/precision.md``) computes in float32 and rounds the new parameters once to its dtype.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from upgd_ref import golden
from upgd_ref.trace import TraceWriter


def vgs_factor(a, b, k, hp):
    """f = clip(1 / (1 + alpha G), f_min, 1), G = capped 0.9 quantile of var / mean^2."""
    if not hp["enabled"] or k < hp["warmup_steps"] or k == 0:
        return 1.0
    c = 1.0 - hp["beta"] ** int(k)
    mu, s = a / c, b / c
    with np.errstate(all="ignore"):
        nv = np.maximum(s - mu**2, 0.0) / (np.maximum(mu**2, 1e-12) + hp["eps"])
    nv = np.where(np.isfinite(nv), nv, 0.0)
    g = min(max(float(np.quantile(nv, 0.9)), 0.0), 1e6)
    if hp["variance_cap"] is not None:
        g = min(g, hp["variance_cap"])
    return min(max(1.0 / (1.0 + hp["alpha"] * g), hp["min_scaling_factor"]), 1.0)


def port_run(case) -> TraceWriter:
    """Run the case with this file's own implementation; return the filled trace writer."""
    stored, hyper, vgs = case.dtype, case.hyper, case.vgs
    dtype = np.dtype(np.float32) if stored.itemsize == 2 else stored  # 16-bit: float32 arithmetic
    shapes = case.layout.shapes
    nseg = len(shapes)
    params = case.segments(case.arrays["params0"], dtype)
    u = [np.zeros(s, dtype) for s in shapes]
    m = [np.zeros(s, dtype) for s in shapes]
    v = [np.zeros(s, dtype) for s in shapes]
    t = np.zeros(nseg, dtype=np.int64)
    n = np.array([h["noise_ema_init"] for h in hyper], dtype=np.float64)
    a, b = np.zeros(nseg), np.zeros(nseg)
    writer = TraceWriter(case=case.name)
    writer.set_initial(params)
    for k in range(1, case.steps + 1):
        grads = case.segments(case.arrays["grads"][k - 1], dtype)
        normals = case.segments(case.arrays["normals"][k - 1], dtype)
        present = [bool(x) for x in case.arrays["present"][k - 1]]
        record = {}
        if vgs is not None:
            f = vgs_factor(a, b, k - 1, vgs)
            grads = [g * dtype.type(f) if p else g for g, p in zip(grads, present)]
            record.update(vgs_factor=f)

        # Pass 1: step counts, utility traces, moments; then the global utility range.
        for i in range(nseg):
            if present[i]:
                h, g = hyper[i], grads[i]
                t[i] += 1
                u[i] = h["beta_utility"] * u[i] + (1 - h["beta_utility"]) * (-g * params[i])
                m[i] = h["beta1"] * m[i] + (1 - h["beta1"]) * g
                v[i] = h["beta2"] * v[i] + (1 - h["beta2"]) * (g * g)
        filled = [i for i in range(nseg) if present[i] and u[i].size]
        lo = min(u[i].min() for i in filled) if filled else np.nan
        hi = max(u[i].max() for i in filled) if filled else np.nan

        # Noise scale, then pass 2.
        norms = np.array([np.sqrt(np.sum(g.astype(np.float64) ** 2)) if p else np.nan
                          for g, p in zip(grads, present)])
        total = np.sqrt(np.nansum(norms**2))
        stds = np.full(nseg, np.nan)
        for i in range(nseg):
            if not present[i]:
                continue
            h = hyper[i]
            if h["adaptive_noise"]:
                r = norms[i] if case.config.noise_norm == "segment" else total
                n[i] = h["noise_beta"] * n[i] + (1 - h["noise_beta"]) * r
                scale = r if h["instant_noise_scale"] else n[i] / (1 - h["noise_beta"] ** int(t[i]))
                stds[i] = max(h["sigma"] * scale, h["min_noise_std"])
            else:
                stds[i] = h["sigma"]
            # beta ** int is the C library's double pow (NumPy's power may differ by an ulp,
            # which 1 - beta**t turns into many).
            cu = dtype.type(1 - h["beta_utility"] ** int(t[i]))
            m_hat = m[i] / dtype.type(1 - h["beta1"] ** int(t[i]))
            v_hat = v[i] / dtype.type(1 - h["beta2"] ** int(t[i]))
            x = np.clip((u[i] / cu - lo) / (hi - lo + 1e-8), 0, 1)
            su = 1 / (1 + np.exp(-2 * (x - 0.5)))
            noise = dtype.type(stds[i]) * normals[i]
            params[i] = params[i] * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * (
                m_hat / (np.sqrt(v_hat) + h["eps"]) + noise) * (1 - su)
            params[i] = params[i].astype(stored).astype(dtype)  # rounded once to the parameters' dtype

        if vgs is not None:  # statistics from the scaled gradients, after the step
            for i in range(nseg):
                if present[i] and grads[i].size:
                    g = grads[i].astype(np.float64)
                    a[i] = vgs["beta"] * a[i] + (1 - vgs["beta"]) * g.mean()
                    b[i] = vgs["beta"] * b[i] + (1 - vgs["beta"]) * (g * g).mean()
            record.update(vgs_grad_mean_avg=a, vgs_grad_sq_avg=b)
        writer.add_step(params=params, utility=u, first_moment=m, second_moment=v, segment_step=t,
                        grad_norm_ema=n, grad_norm=norms, noise_std=stds, utility_min=lo, utility_max=hi,
                        **record)
    return writer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", default="adaptive_instant_f32", help="golden case name")
    parser.add_argument("--out", help="write the trace here (.npz) for `upgd-ref golden compare`")
    parser.add_argument("--golden", default=str(golden.DEFAULT_DIR), help="golden directory")
    args = parser.parse_args(argv)
    case = golden.load_case(args.case, args.golden)
    writer = port_run(case)
    if args.out:
        writer.save(args.out)
        print(f"wrote {args.out}")
    result = golden.compare(case, writer.arrays())
    print(golden.format_comparison(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
