"""Lines the layout keeps, read from the source: what may import what."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

SHARED_CLI = {"options", "errors"}  # the modules every command may use; main.py registers the commands


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a module imports ("." for the package it sits in is resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_tests_import_helpers_not_each_other():
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bad = {n for n in imported_modules(path) if n.split(".")[0].startswith("test_") or n == "conftest"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: move what it needs into tests/helpers/"


def test_commands_do_not_import_each_other():
    cli = ROOT / "ms4local" / "cli"
    commands = {p.stem for p in cli.glob("*.py")} - SHARED_CLI - {"__init__", "main"}
    for path in sorted(cli.glob("*.py")):
        if path.stem == "main":
            continue
        bad = {n for n in imported_modules(path) if n.startswith("ms4local.cli.") and n.split(".")[2] in commands}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: shared code belongs in the library or ui.py"
