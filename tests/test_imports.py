"""The package's modules import one another in one direction only."""

import ast
from pathlib import Path

import synthetic_instruction_tuner

PACKAGE = Path(synthetic_instruction_tuner.__file__).parent


def _imports(path: Path) -> set[str]:
    """Package modules a module imports, at the top or inside functions (`from .x import` or absolute)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("synthetic_instruction_tuner."):
                out.add(node.module.split(".")[1])
    return out


def test_no_two_modules_import_each_other():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    mutual = sorted(
        f"{a} <-> {b}" for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, set())
    )
    assert mutual == []


def test_evaluation_and_comparison_share_metrics_without_a_cycle():
    assert "metrics" in _imports(PACKAGE / "comparison.py")
    assert "evaluation" not in _imports(PACKAGE / "comparison.py")
