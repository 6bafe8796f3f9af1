"""The package's dependencies point one way (DESIGN.md): read from the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cbir"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, absolute or relative."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                base = ".".join((*package, base)) if base else ".".join(package)
            names.add(base)
    return names


def modules(folder: Path = PACKAGE):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_never_imports_a_command():
    offenders = [str(p.relative_to(PACKAGE)) for p in modules() if "cli" not in p.relative_to(PACKAGE).parts
                 and any(name == "cbir.cli" or name.startswith("cbir.cli.") for name in imports_of(p))]
    assert offenders == []


def test_the_labels_module_imports_nothing_above_it():
    inside = {name for name in imports_of(PACKAGE / "labels.py") if name.startswith("cbir")}
    assert inside <= {"cbir.errors", "cbir.files"}


def test_evaluation_knows_no_model_database_or_torch():
    for path in modules(PACKAGE / "evaluation"):
        forbidden = {name for name in imports_of(path)
                     if name.split(".")[0] in ("torch", "faiss", "redis", "torchvision", "timm")
                     or name.startswith(("cbir.models", "cbir.database", "cbir.embedding", "cbir.data"))}
        assert forbidden == set(), (path.name, forbidden)
