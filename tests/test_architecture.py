"""The layering of architecture.md, checked on the source: imports go down, never up."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package names they are installed as (see pyproject.toml).
PACKAGES = {"ghostmatch": ROOT / "ghostmatch", "ghostmatch.indexes": ROOT / "indexes"}

# The foundations: what they may not import (the parts built on them).
BUILT_ON = (
    "ghostmatch.cli",
    "ghostmatch.library",
    "ghostmatch.search",
    "ghostmatch.retrieval",
    "ghostmatch.dupes",
    "ghostmatch.ingest.indexer",
    "ghostmatch.ingest.ray_embed",
    "ghostmatch.eval",
    "ghostmatch.train",
    "ghostmatch.serve",
    "ghostmatch.recognition",
)
FOUNDATIONS = (
    "ghostmatch.model",
    "ghostmatch.store",
    "ghostmatch.indexes",
    "ghostmatch.ingest.images",
    "ghostmatch.ingest.scan",
    "ghostmatch.errors",
    "ghostmatch.pathtext",
)
# The components behind the facade: they may not import the facade or the CLI.
COMPONENTS = (
    "ghostmatch.search",
    "ghostmatch.retrieval",
    "ghostmatch.dupes",
    "ghostmatch.ingest.indexer",
    "ghostmatch.ingest.ray_embed",
    "ghostmatch.recognition",
)


def module_name(package: str, folder: Path, file: Path) -> str:
    parts = [*file.relative_to(folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports() -> dict[str, set[str]]:
    """Every module of the package (cli/ excluded) and the ghostmatch modules it imports,
    including imports inside functions and under TYPE_CHECKING."""
    found: dict[str, set[str]] = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            name = module_name(package, folder, file)
            targets: set[str] = set()
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                    targets.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
            found[name] = {t for t in targets if t.startswith("ghostmatch")}
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_package_never_imports_the_command_line() -> None:
    wrong = {
        (module, target)
        for module, targets in imports().items()
        for target in targets
        if within(target, ("ghostmatch.cli",))
    }
    assert not wrong


def test_only_the_server_imports_the_server() -> None:
    wrong = {
        (module, target)
        for module, targets in imports().items()
        if not within(module, ("ghostmatch.serve",))
        for target in targets
        if within(target, ("ghostmatch.serve",))
    }
    assert not wrong


def test_foundations_do_not_import_what_is_built_on_them() -> None:
    wrong = {
        (module, target)
        for module, targets in imports().items()
        if within(module, FOUNDATIONS)
        for target in targets
        if within(target, BUILT_ON)
    }
    assert not wrong


def test_components_do_not_import_the_facade() -> None:
    wrong = {
        (module, target)
        for module, targets in imports().items()
        if within(module, COMPONENTS)
        for target in targets
        if within(target, ("ghostmatch.library",)) or target == "ghostmatch"
    }
    assert not wrong


def test_the_checks_see_the_modules_they_are_about() -> None:
    names = set(imports())
    for expected in (
        "ghostmatch.library",
        "ghostmatch.search",
        "ghostmatch.dupes.finder",
        "ghostmatch.ingest.indexer",
        "ghostmatch.store.vectors",
        "ghostmatch.model.binding",
        "ghostmatch.indexes.vector_index",
        "ghostmatch.serve.engine",
    ):
        assert expected in names


def test_every_package_is_installed() -> None:
    # A package missing from pyproject's list is left out of a wheel: an installed
    # ``ghostmatch`` then fails at its first import of it, though a checkout works.
    import tomllib

    root = ROOT
    project = tomllib.loads((root / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "ghostmatch").rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
