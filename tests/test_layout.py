"""The monorepo's shape: six libraries under one PEP 420 namespace, each complete and versioned.

Runs in `nox -s tests`, with every library installed (not editable) from this checkout.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "train", "infer", "eval", "agent", "rag")
# DESIGN.md, "The stack": which lmstack library each one stands on directly.
STANDS_ON = {
    "core": set(),
    "train": {"core"},
    "infer": {"core"},
    "eval": {"infer"},
    "agent": {"infer"},
    "rag": {"infer"},
}


def _package(layer: str) -> Path:
    return ROOT / "packages" / f"lm-{layer}"


def _pyproject(layer: str) -> dict:
    return tomllib.loads((_package(layer) / "pyproject.toml").read_text(encoding="utf-8"))


def _module_assignments(init: Path) -> dict[str, ast.expr]:
    """Top-level `name = value` / `name: T = value` assignments of a module, by name."""
    found: dict[str, ast.expr] = {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            found[node.target.id] = node.value
    return found


def test_the_six_libraries_and_nothing_else() -> None:
    assert sorted(p.name for p in (ROOT / "packages").iterdir() if p.is_dir()) == sorted(
        f"lm-{x}" for x in LAYERS
    )


@pytest.mark.parametrize("layer", LAYERS)
def test_package_is_complete(layer: str) -> None:
    package = _package(layer)
    source = package / "src" / "lmstack" / layer
    for required in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        assert (package / required).is_file(), f"{package.name} has no {required}"
    assert (source / "py.typed").is_file(), f"{package.name} does not ship py.typed"
    assert (package / "tests").is_dir(), f"{package.name} has no tests/ folder"
    assigned = _module_assignments(source / "__init__.py")
    assert "__all__" in assigned, f"lmstack.{layer} does not declare __all__"
    assert "__version__" in assigned, f"lmstack.{layer} does not declare __version__"


@pytest.mark.parametrize("layer", LAYERS)
def test_no_package_owns_the_namespace(layer: str) -> None:
    assert not (_package(layer) / "src" / "lmstack" / "__init__.py").exists()
    assert sorted(p.name for p in (_package(layer) / "src").iterdir() if not p.name.startswith(".")) == [
        "lmstack"
    ]


def test_installed_namespace_is_pep420() -> None:
    spec = importlib.util.find_spec("lmstack")
    assert spec is not None
    assert spec.origin in (None, "namespace")  # "namespace" before Python 3.11's cleanup
    for location in spec.submodule_search_locations or []:
        assert not (Path(location) / "__init__.py").exists(), location


@pytest.mark.parametrize("layer", LAYERS)
def test_installed_version_is_the_source_version(layer: str) -> None:
    project = _pyproject(layer)
    assert project["project"]["name"] == f"lmstack-{layer}"
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"]["path"] == f"src/lmstack/{layer}/__init__.py"

    source_version = ast.literal_eval(
        _module_assignments(_package(layer) / "src" / "lmstack" / layer / "__init__.py")["__version__"]
    )
    module = importlib.import_module(f"lmstack.{layer}")
    assert module.__version__ == source_version, f"the installed lmstack.{layer} is not this checkout's"
    assert importlib.metadata.version(f"lmstack-{layer}") == module.__version__


@pytest.mark.parametrize("layer", LAYERS)
def test_lmstack_requirements_follow_the_stack_and_admit_the_sibling_version(layer: str) -> None:
    requirements = [Requirement(r) for r in _pyproject(layer)["project"].get("dependencies", [])]
    lmstack = {r.name.removeprefix("lmstack-"): r for r in requirements if r.name.startswith("lmstack-")}
    assert set(lmstack) == STANDS_ON[layer]
    for lower, requirement in lmstack.items():
        assert str(requirement.specifier), f"{requirement.name} must be pinned to a compatible range"
        version = importlib.metadata.version(f"lmstack-{lower}")
        assert requirement.specifier.contains(version, prereleases=True), (
            f"lmstack-{layer} requires {requirement}; the in-tree lmstack-{lower} is {version}"
        )
