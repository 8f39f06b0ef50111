"""The layers import one way: each package imports only from itself and the layers before it.

model (pure math) <- quant (tensor code) <- runtime (loading, preprocessing, generation, serving)
<- export (exporters, layer-by-layer quantization, calibration) <- scripts (fixtures, synthetic
training) <- bench (benchmarks, eval) <- cli (the ``qvl`` command). The package root
(``qvl/__init__.py``, the public API) stands with runtime. Every import is read, function-level
ones included, since a lazy import is still an arrow.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["model", "quant", "runtime", "export", "scripts", "bench", "cli"]
RANK = {name: i for i, name in enumerate(ORDER)}


def _layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if len(rel.parts) == 1:
        return "cli" if rel.name == "cli.py" else "runtime"  # __init__.py: the public API
    return rel.parts[0]


def _sources():
    files = [ROOT / "__init__.py", ROOT / "cli.py"]
    for layer in ORDER[:-1]:
        files += sorted((ROOT / layer).rglob("*.py"))
    return files


def imported_layers(source: str) -> list[tuple[int, str]]:
    """(line, layer) for every import of a qvl package in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside their package; the project uses none across
                continue
            names = [node.module or ""]
            if names[0] == "qvl":  # from qvl import runtime, cli
                names = [f"qvl.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "qvl" and len(parts) > 1:
                target = parts[1]
                if target in RANK:
                    out.append((node.lineno, target))
    return out


def test_the_scan_sees_every_layer():
    found = {t for f in _sources() for _, t in imported_layers(f.read_text(encoding="utf-8"))}
    assert {"model", "quant", "runtime", "export", "scripts", "bench"} <= found


def test_the_scan_reads_function_level_imports():
    src = "import qvl.model.rope\ndef f():\n    from qvl.runtime import engine\n    from qvl import cli\n"
    assert sorted(imported_layers(src)) == [(1, "model"), (3, "runtime"), (4, "cli")]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    layer = _layer_of(path)
    found = imported_layers(path.read_text(encoding="utf-8"))
    bad = [f"line {n}: {layer} imports {t}" for n, t in found if RANK[t] > RANK[layer]]
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)
