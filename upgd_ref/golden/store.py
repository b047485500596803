"""Writing and reading the golden files: generation, the manifest and its integrity
check, loading a case (``specs/golden.md`` §1)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..config import build, load_config
from ..rng import noise as reference_noise
from ..trace import FIELDS, logical, read_trace, write_trace
from .cases import (
    CASES,
    DEFAULT_DIR,
    GOLDEN_FORMAT,
    GOLDEN_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    CaseSpec,
    GoldenCase,
    case_inputs,
    make_case,
)
from .truth import reference_step


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
    case = make_case(spec.name, entry, arrays)
    state, rows = case.initial_state(), []
    for k in range(1, spec.steps + 1):
        values = reference_step(case, k, state).values
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
    return make_case(name, entry, arrays)
