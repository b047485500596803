"""specs/tolerances.md and upgd_ref/tolerances.py state the same constants."""

from __future__ import annotations

import re
from pathlib import Path

from upgd_ref import tolerances

SPEC = Path(__file__).resolve().parents[2] / "specs" / "tolerances.md"


def test_spec_constants_match_the_code():
    text = SPEC.read_text()
    found = dict(re.findall(r"`([A-Z_0-9]+) = (\d+)`", text))
    expected = {name: str(getattr(tolerances, name)) for name in
                ("STATE_ULPS", "PARAM_ULPS", "REDUCTION_ULPS", "SCALAR_ULPS_F64", "ROUNDING_ULPS_16")}
    assert found == expected


def test_unit_roundoffs_are_ieee():
    assert tolerances.unit_roundoff("float32") == 2.0**-24
    assert tolerances.unit_roundoff("float64") == 2.0**-53
