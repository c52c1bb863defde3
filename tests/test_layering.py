"""The package's layers point down: the tuner math knows nothing of diffusers, the integration or the search; the
registry and the integration never import training, search or evaluation; nothing imports the benchmarks.

Read from the source (module-level and function-level imports alike), so a lazy import breaking the rule fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resattn_diffusion"

#: folder or module (relative to the package) -> top-level names it must never import (package parts or libraries)
FORBIDDEN = {
    "tuners": {"diffusers", "integration", "training", "search", "evaluation", "registry", "config", "benchmarks"},
    "registry.py": {"integration", "training", "search", "evaluation", "benchmarks"},
    "integration": {"training", "search", "evaluation", "benchmarks"},
    "evaluation": {"training", "search", "benchmarks"},
    "training": {"evaluation", "benchmarks"},
}


def imported_names(path: Path) -> set[str]:
    """The first package-relative part (``..search.x`` -> ``search``) or top-level name of every import in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("resattn_diffusion."):
                names.add(module.split(".")[1])
            elif node.level >= 2 or (node.level == 1 and path.parent == PACKAGE):
                # a relative import that leaves the file's own sub-package names a package part
                names.add(module.split(".")[0] if module else node.names[0].name)
            elif node.level == 0:
                names.add(module.split(".")[0])
    return names


def files_of(part: str) -> list[Path]:
    target = PACKAGE / part
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_layers_point_down(part):
    files = files_of(part)
    assert files, f"{part} has no Python files: the layering table is out of date"
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_names(path) & FORBIDDEN[part])
        for path in files
        if imported_names(path) & FORBIDDEN[part]
    }
    assert not offenders, f"{part} imports what lies above it: {offenders}"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    inner = tmp_path / "resattn_diffusion" / "tuners"
    inner.mkdir(parents=True)
    source = inner / "x.py"
    source.write_text(
        "from .base import A\nimport torch\n\ndef f():\n    from ..search.glora_space import S\n"
        "    import diffusers.models\n",
        encoding="utf-8",
    )
    assert imported_names(source) >= {"search", "diffusers", "torch"}
    assert "base" not in imported_names(source)
