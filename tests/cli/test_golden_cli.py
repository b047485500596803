"""``upgd-ref golden``: generate needs an explicit --out; verify names a backend that cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from upgd_ref import golden
from upgd_ref.backends import absence_reason
from upgd_ref.cli import main


def test_generate_requires_out(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["golden", "generate"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_verify_refuses_a_backend_that_cannot_run(capsys):
    absent = [name for name in ("cupy", "cuda-emulator", "numba") if absence_reason(name) is not None]
    if not absent:
        pytest.skip("every backend runs on this machine (GPU): nothing to refuse")
    assert main(["golden", "verify", "--backend", absent[0]]) == 2
    assert f"backend {absent[0]!r} cannot run here" in capsys.readouterr().err


def test_the_shipped_set_is_package_data():
    assert golden.DEFAULT_DIR.parent.name == "golden" and golden.DEFAULT_DIR.name == "data"
    assert golden.DEFAULT_DIR.parent == Path(golden.__file__).parent
    assert golden.check_manifest() == []
