r"""Golden vectors: the cases, their generation, backend replay and the trace comparator.

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

Modules: :mod:`.cases` (definitions, inputs, the loaded case), :mod:`.truth` (one float64
reference step), :mod:`.store` (generation, manifest, loading), :mod:`.replay` (a case
through the stateful API on a backend), :mod:`.comparator` (the contract check and report).

Example::

    >>> from upgd_ref import golden
    >>> case = golden.load_case("fixed_f64")
    >>> result = golden.compare(case, golden.replay(case, "reference"))
    >>> result.passed, result.first_divergence
    (True, None)
"""

from __future__ import annotations

from .cases import (
    CASES,
    DEFAULT_DIR,
    EXACT_FIELDS,
    GOLDEN_FORMAT,
    GOLDEN_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    STATE_FIELDS,
    VGS_STATE_FIELDS,
    CaseSpec,
    GoldenCase,
    case_inputs,
)
from .comparator import Comparison, FieldReport, TraceError, compare, format_comparison, required_fields
from .replay import replay, replay_paths
from .store import check_manifest, generate, golden_trace, load_case, load_manifest

__all__ = [
    "GOLDEN_FORMAT",
    "GOLDEN_VERSION",
    "READABLE_VERSIONS",
    "MANIFEST",
    "DEFAULT_DIR",
    "CASES",
    "EXACT_FIELDS",
    "STATE_FIELDS",
    "VGS_STATE_FIELDS",
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
    "replay_paths",
    "compare",
    "required_fields",
    "format_comparison",
]
