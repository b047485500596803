"""``upgd-ref noise``: a labelled table and ``--json``, both exactly the library's normals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from upgd_ref.cli import main
from upgd_ref.rng import standard_normals


def test_noise_table_has_a_header_and_the_exact_values(capsys):
    assert main(["noise", "--seed", "7", "--step", "3", "--start", "5", "--count", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# standard normals of seed 7, step 3, float64")
    assert lines[1].split("\t") == ["index", "hex", "value"]
    expected = standard_normals(7, 3, 5, 4, dtype=np.float64)
    rows = [line.split("\t") for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [5, 6, 7, 8]
    assert [float.fromhex(r[1]) for r in rows] == [float(v) for v in expected]
    assert [float(r[2]) for r in rows] == [float(v) for v in expected]


def test_noise_json_is_exact_for_float32(capsys):
    assert main(["noise", "--count", "3", "--dtype", "float32", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    expected = standard_normals(0, 1, 0, 3, dtype=np.float32)
    assert table["dtype"] == "float32" and table["index"] == [0, 1, 2]
    assert np.array(table["value"], dtype=np.float32).tobytes() == expected.tobytes()
    assert [float.fromhex(h) for h in table["hex"]] == table["value"]


@pytest.mark.parametrize("argv", [["--count", "0"], ["--seed", "-1"], ["--step", str(2**64)], ["--start", "-3"]])
def test_noise_refuses_bad_ranges(argv):
    with pytest.raises(SystemExit) as exc:
        main(["noise", *argv])
    assert exc.value.code == 2
