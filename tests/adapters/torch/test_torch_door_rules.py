"""Issue 13's rules for the torch adapter, read from its source: it writes no attribute of an
object it does not own (core objects included), and it steps through the functional door."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "adapters" / "torch"
#: Attributes of other objects the adapter may assign: torch's ``p.data`` / ``p.grad`` (the
#: re-homing, ``specs/adapters-torch.md`` §2) and the public classes' ``__module__``.
ALLOWED = {"data", "grad", "__module__"}


#: The adapter's own records reached through ``self``: the optimizer's ``FlatUPGDState``
#: (``_state``), the scaler's ``FlatVGSState`` (``_stats``) and ``optimizer.state`` (its view).
OWN_RECORDS = {"_state", "_stats", "state"}


def _owned(target: ast.Attribute) -> bool:
    """``self.x`` / ``cls.x``, or ``self.<own record>.x``."""
    base = target.value
    if isinstance(base, ast.Name):
        return base.id in ("self", "cls")
    return (isinstance(base, ast.Attribute) and base.attr in OWN_RECORDS and isinstance(base.value, ast.Name)
            and base.value.id == "self")


def foreign_attribute_writes(source: str, name: str) -> list[str]:
    """``obj.attr = ...`` (or ``+=``) where ``obj`` is neither ``self``/``cls`` nor one of its own records."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and t.attr not in ALLOWED and not _owned(t):
                    found.append(f"{name}:{t.lineno} writes {ast.unparse(t)}")
    return found


def test_no_adapter_module_writes_another_objects_attributes():
    found = [w for path in sorted(PACKAGE.glob("*.py")) for w in foreign_attribute_writes(path.read_text(), path.name)]
    assert found == []


def test_the_rule_finds_writes():
    source = ("def f(self, core, p):\n    core.param_groups = []\n    core.state.step += 1\n    p.data = 1\n"
              "    self.x = 2\n    self._core.hyperparams = {}\n    self._stats.step = 3\n")
    assert foreign_attribute_writes(source, "m.py") == [
        "m.py:2 writes core.param_groups", "m.py:3 writes core.state.step", "m.py:6 writes self._core.hyperparams"]


def test_the_optimizer_and_scaler_step_through_the_door():
    optimizer = (PACKAGE / "flat_optimizer.py").read_text()
    scaler = (PACKAGE / "scaler.py").read_text()
    assert "upgd_step(" in optimizer and ".step(bucket" not in optimizer
    sharded = (PACKAGE / "distributed.py").read_text()  # process_group: the sharded door
    assert "sharded_step(" in sharded and "first_pass" not in sharded and "second_pass" not in sharded
    for door in ("vgs_factor(", "vgs_scale_step(", "vgs_update_step("):
        assert door in scaler
