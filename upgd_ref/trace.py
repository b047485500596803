"""Step traces: the file format golden vectors and ported implementations share.

Normative description: ``specs/golden.md`` §2. A trace is an uncompressed ``.npz`` (a zip
of ``.npy`` members, readable by ``numpy.load``) holding, for a run of ``T`` steps on a
layout with ``S`` segments and ``N`` elements (padding excluded, segments concatenated in
order, each flattened in C order):

- ``meta``: uint8 bytes of a JSON object ``{"format": "upgd_ref.trace", "version": 1,
  "case": <golden case name or null>}``;
- ``params0`` ``(N,)``: the parameters before step 1;
- per step ``k = 1..T`` (row ``k - 1``): element fields ``(T, N)``, segment fields
  ``(T, S)`` and scalar fields ``(T,)``, listed in :data:`FIELDS`.

:class:`TraceWriter` builds one step at a time from whatever a port has (flat logical
vectors or lists of per-segment arrays); :func:`write_npz` is the byte-deterministic
writer (fixed member order and timestamps, no compression) used for golden files.

Example::

    >>> import numpy as np, io
    >>> writer = TraceWriter(case="fixed_f64")
    >>> writer.set_initial(params0=[np.zeros((2, 2)), np.ones(3)])
    >>> writer.add_step(params=[np.ones((2, 2)), np.ones(3)], segment_step=[1, 1])
    >>> sorted(writer.arrays())
    ['params', 'params0', 'segment_step']
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "FIELDS",
    "ELEMENT",
    "SEGMENT",
    "SCALAR",
    "TraceWriter",
    "write_npz",
    "write_trace",
    "read_trace",
    "logical",
]

TRACE_FORMAT = "upgd_ref.trace"
TRACE_VERSION = 1
ELEMENT, SEGMENT, SCALAR = "element", "segment", "scalar"

# Per-step fields: name -> (shape kind, meaning). Values are *after* step k unless noted.
FIELDS = {
    "grads": (ELEMENT, "input: gradient given to step k, before any VGS scaling"),
    "present": (SEGMENT, "input: bool, segment had a gradient at step k"),
    "normals": (ELEMENT, "input: standard normals of step k (specs/noise.md)"),
    "params": (ELEMENT, "parameters p"),
    "utility": (ELEMENT, "utility trace u"),
    "first_moment": (ELEMENT, "first moment m"),
    "second_moment": (ELEMENT, "second moment v"),
    "segment_step": (SEGMENT, "int64 t_i"),
    "grad_norm_ema": (SEGMENT, "float64 n_i"),
    "grad_norm": (SEGMENT, "||g_i||_2 of the scaled gradient (NaN if absent)"),
    "noise_std": (SEGMENT, "std_i (NaN if absent)"),
    "utility_min": (SCALAR, "U_lo (NaN if no present element)"),
    "utility_max": (SCALAR, "U_hi"),
    "vgs_factor": (SCALAR, "VGS f multiplied into step k's gradients"),
    "vgs_normalized_variance": (SCALAR, "VGS G behind that f"),
    "vgs_grad_mean_avg": (SEGMENT, "VGS a_i after the statistics update of step k"),
    "vgs_grad_sq_avg": (SEGMENT, "VGS b_i after the statistics update of step k"),
}
INITIAL_FIELDS = ("params0",)
_META = "meta"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest zip date: no wall-clock time in the file


def logical(values) -> np.ndarray:
    """A flat logical vector from a list of per-segment arrays (C order), or a vector as is.

    bfloat16 values become float32 (exact): ``.npy`` has no bfloat16, so a trace holds a
    bfloat16 run's values in float32 and the case's ``dtype`` names the candidate dtype
    (``specs/golden.md`` §2)."""
    if isinstance(values, (list, tuple)):
        pieces = [_storable(np.asarray(v)).reshape(-1) for v in values]
        return np.concatenate(pieces) if pieces else np.empty(0)
    return _storable(np.asarray(values))


def _storable(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


class TraceWriter:
    """Collects a run step by step and writes it as a trace (``specs/golden.md`` §2).

    ``add_step(**fields)`` takes any subset of :data:`FIELDS`, the same subset every step;
    element fields may be flat logical vectors or lists of per-segment arrays.
    """

    def __init__(self, case: str | None = None):
        self.case = case
        self.initial: dict[str, np.ndarray] = {}
        self.steps: list[dict[str, np.ndarray]] = []

    def set_initial(self, params0) -> None:
        self.initial["params0"] = logical(params0).copy()

    def add_step(self, **fields) -> None:
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown trace field(s) {unknown}; known: {list(FIELDS)}")
        if self.steps and set(fields) != set(self.steps[0]):
            raise ValueError(
                f"step {len(self.steps) + 1} has fields {sorted(fields)}, step 1 had {sorted(self.steps[0])}"
            )
        row = {}
        for name, value in fields.items():
            kind = FIELDS[name][0]
            row[name] = np.asarray(value).copy() if kind == SCALAR else logical(value).copy()
        self.steps.append(row)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field stacked over steps, plus the initial fields."""
        out = dict(self.initial)
        for name in self.steps[0] if self.steps else ():
            out[name] = np.stack([row[name] for row in self.steps])
        return out

    def save(self, path) -> None:
        write_trace(path, self.arrays(), case=self.case)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_npz(path, arrays: dict) -> None:
    """Write ``arrays`` as an ``.npz`` whose bytes depend only on the arrays.

    Members are sorted by name, stored uncompressed (deflate output can differ between zlib
    builds) with a fixed date and fixed attributes; the file is written to a temporary name
    and renamed into place.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # "Unix": the default depends on the writing platform
            info.external_attr = 0o644 << 16
            archive.writestr(info, _npy_bytes(np.asarray(arrays[name])))
    os.replace(tmp, path)


def write_trace(path, arrays: dict, case: str | None = None) -> None:
    """Write a trace: ``arrays`` (field -> stacked array) plus the ``meta`` member."""
    meta = json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION, "case": case}, sort_keys=True)
    write_npz(path, {**arrays, _META: np.frombuffer(meta.encode(), dtype=np.uint8)})


def read_trace(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a trace file; anything unreadable is a ``ValueError``.

    A file without ``meta`` is accepted (``case`` then must be given to the comparator).
    """
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            arrays = {name: np.array(data[name]) for name in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable .npz trace ({exc})") from exc
    meta = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "case": None}
    if _META in arrays:
        try:
            meta = json.loads(arrays.pop(_META).tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: corrupt trace metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: meta.format must be {TRACE_FORMAT!r}")
        if not isinstance(meta.get("version"), int) or meta["version"] > TRACE_VERSION:
            raise ValueError(f"{path}: trace version {meta.get('version')!r} is not readable (<= {TRACE_VERSION})")
    unknown = sorted(set(arrays) - set(FIELDS) - set(INITIAL_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown trace member(s) {unknown}; known: {[*INITIAL_FIELDS, *FIELDS]}")
    return meta, arrays
