"""The bytes-per-parameter table of ``specs/kernels.md`` §5 is what ``upgd_ref.traffic`` computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from upgd_ref.traffic import copy_bytes, fused_adam_bytes, kernel_floor, step_traffic

SPEC = Path(__file__).resolve().parents[2] / "specs" / "kernels.md"
MEMBERS = {"AdaptiveUPGD, UPGDW": ("AdaptiveUPGD", "UPGDW"), "UPGD": ("UPGD",)}


def _spec_rows() -> list[list[str]]:
    text = SPEC.read_text()
    section = text[text.index("## 5. Bytes moved per parameter"):text.index("## 6. Benchmark")]
    rows = [[cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in MEMBERS]
    return rows


def test_the_spec_table_is_the_function():
    rows = _spec_rows()
    assert len(rows) == 2 * 6 * 2  # members (AdaptiveUPGD and UPGDW share a row) x dtypes x VGS
    for label, params, state, vgs, *numbers in rows:
        for name in MEMBERS[label]:
            t = step_traffic(name, params, state, vgs == "on")
            assert [int(x) for x in numbers] == [*t, t.total, kernel_floor(name, params, state, vgs == "on")], label


def test_the_counts_follow_the_streams():
    """Float32 AdaptiveUPGD: 5 streams read twice, 4 written (56 B, 60 B with VGS); float64
    twice that; a member without moments drops m, v from both passes."""
    assert step_traffic("AdaptiveUPGD", "float32").total == 56 == kernel_floor("AdaptiveUPGD", "float32")
    assert step_traffic("AdaptiveUPGD", "float32", vgs=True).total == 60
    assert step_traffic("AdaptiveUPGD", "float64").total == 2 * 56
    assert step_traffic("UPGD", "float32").total == 56 - 2 * (2 * 4) - 2 * 4
    assert step_traffic("AdaptiveUPGD", "bfloat16", "float32").pass1_read == 20
    assert fused_adam_bytes("float32") == 28 and copy_bytes(10) == 20


def test_a_state_dtype_a_step_cannot_have_is_refused():
    with pytest.raises(ValueError, match="keeps its state in float64, got float32"):
        step_traffic("AdaptiveUPGD", "float64", "float32")
