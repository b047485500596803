"""Bit-exact snapshots of everything a step may touch.

``snapshot(*objects)`` turns optimizers, scalers, arrays and plain values into nested
tuples of bytes, so that ``snapshot(...) == snapshot(...)`` means bit-identical (NaN
payloads and padding included) and a mismatch can be located with ``diff_snapshots``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler


def fingerprint(value):
    """A hashable, bit-exact description of ``value`` (arrays by dtype, shape and bytes)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, np.ascontiguousarray(value).tobytes())
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.tobytes())
    if isinstance(value, float):
        return ("float", value.hex())
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, dict):
        items = sorted(((fingerprint(k), fingerprint(v)) for k, v in value.items()), key=lambda kv: repr(kv[0]))
        return ("dict", tuple(items))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v) for v in value))
    if isinstance(value, FlatLayout):
        return ("FlatLayout", fingerprint(value.to_dict()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return (type(value).__name__, fingerprint(fields))
    if isinstance(value, AdaptiveUPGD):
        return ("AdaptiveUPGD", fingerprint({
            "state": value.state, "param_groups": value.param_groups, "defaults": value.defaults,
            "seed": value.seed, "noise_norm": value.noise_norm, "layout": value.layout,
        }))
    if isinstance(value, VarianceGradientScaler):
        return ("VarianceGradientScaler", fingerprint({
            "state": value.state, "hyperparams": value.hyperparams, "layout": value.layout,
        }))
    raise TypeError(f"snapshot: cannot fingerprint {type(value).__name__}")


def snapshot(*objects) -> tuple:
    """Bit-exact snapshot of optimizers, scalers, buffers (e.g. ``snapshot(opt, params, grads)``)."""
    return tuple(fingerprint(o) for o in objects)


def diff_snapshots(before, after, path="") -> list[str]:
    """Paths at which two snapshots differ (empty when identical)."""
    if type(before) is not type(after):
        return [path or "<root>"]
    if isinstance(before, tuple):
        if len(before) != len(after):
            return [path or "<root>"]
        if len(before) == 2 and before[0] == "dict" and after[0] == "dict":
            keys_a = [k for k, _ in before[1]]
            keys_b = [k for k, _ in after[1]]
            if keys_a != keys_b:
                return [f"{path}.<keys>"]
            out = []
            for (k, a), (_, b) in zip(before[1], after[1]):
                out += diff_snapshots(a, b, f"{path}.{k[1]}")
            return out
        out = []
        for i, (a, b) in enumerate(zip(before, after)):
            out += diff_snapshots(a, b, f"{path}[{i}]")
        return out
    return [] if before == after else [path or "<root>"]


def assert_unchanged(before, after) -> None:
    """``before == after`` (snapshots), else fail naming what changed."""
    differences = diff_snapshots(before, after)
    assert not differences, f"modified despite the error: {differences[:10]}"


def random_buffers(layout: FlatLayout, seed: int, scale: float = 1.0):
    """``(params, grads)`` packed from seeded standard normals (padding zero)."""
    rng = np.random.default_rng(seed)
    params = layout.pack([rng.standard_normal(s) for s in layout.shapes])
    grads = layout.pack([scale * rng.standard_normal(s) for s in layout.shapes])
    return params, grads
