"""Build, lint and test sessions for the lmstack monorepo.

`nox` runs the default sessions (what CI runs); `nox -l` lists them all. Every session starts from a
fresh virtualenv and installs through ci/constraints.txt, which pins torch to the 2.13.0 CPU build.
A library session installs that library and only the lmstack layers below it, from local paths,
and proves that the other layers cannot be imported before it runs the library's tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = ROOT / "ci" / "constraints.txt"
LAYERS = ("core", "train", "infer", "eval", "agent", "rag")

nox.needs_version = ">=2024.4.15"  # nox.project.load_toml, reuse_venv
nox.options.sessions = ["lint", "layers", "typecheck", *LAYERS, "gguf", "tests", "quickstart"]
nox.options.reuse_venv = "no"
# uv cannot see the local CPU torch wheel: keep nox on virtualenv + pip.
nox.options.default_venv_backend = "virtualenv"
nox.options.error_on_external_run = True


def _package_dir(layer: str) -> Path:
    return ROOT / "packages" / f"lm-{layer}"


def _lmstack_requirements(layer: str) -> list[str]:
    """The lmstack layers that `layer` names in its pyproject's dependencies, without versions."""
    project = nox.project.load_toml(_package_dir(layer) / "pyproject.toml")["project"]
    names = (re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0] for req in project.get("dependencies", []))
    return [name.removeprefix("lmstack-") for name in names if name.startswith("lmstack-")]


def _lower_layers(layer: str) -> list[str]:
    """Every lmstack layer that `layer` depends on, directly or not, bottom of the stack first."""
    found: set[str] = set()
    todo = _lmstack_requirements(layer)
    while todo:
        lower = todo.pop()
        if lower not in found:
            found.add(lower)
            todo.extend(_lmstack_requirements(lower))
    return [name for name in LAYERS if name in found]


def _install(session: nox.Session, *args: str) -> None:
    """Pip-install through the constraints file, so that torch is always the pinned CPU build."""
    session.install("-c", str(CONSTRAINTS), *args)


def _local(layer: str, extra: str = "") -> str:
    return f"{_package_dir(layer)}{f'[{extra}]' if extra else ''}"


def _check_installed(session: nox.Session, present: list[str]) -> None:
    absent = [layer for layer in LAYERS if layer not in present]
    session.run("python", str(ROOT / "ci" / "check_layers_installed.py"), ",".join(present), ",".join(absent))


def _library_session(session: nox.Session, layer: str) -> None:
    lower = _lower_layers(layer)
    _install(session, *(_local(name) for name in lower), _local(layer, "test"))
    _check_installed(session, [*lower, layer])
    session.run("pytest", f"packages/lm-{layer}/tests", *session.posargs)


def _make_library_session(layer: str) -> None:
    def run(session: nox.Session) -> None:
        _library_session(session, layer)

    run.__doc__ = f"Test lmstack-{layer} alone, on top of only the layers below it."
    nox.session(name=layer)(run)


for _layer in LAYERS:
    _make_library_session(_layer)


@nox.session
def gguf(session: nox.Session) -> None:
    """GGUF export checked against llama.cpp itself (llama-cpp-python builds llama.cpp from source)."""
    _install(session, _local("core", "test"), "llama-cpp-python")
    _check_installed(session, ["core"])
    session.run("pytest", "packages/lm-core/tests/test_gguf.py", "-m", "llamacpp", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Cross-package tests (tests/) with every library installed."""
    _install(session, "pytest>=8", *(_local(layer) for layer in LAYERS))
    _check_installed(session, list(LAYERS))
    session.run("pytest", "tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    _install(session, "ruff")
    # Folders that hold nothing yet are not in a git checkout at all.
    paths = [
        p for p in ("packages", "tests", "benchmarks", "examples", "ci", "noxfile.py") if (ROOT / p).exists()
    ]
    session.run("ruff", "check", *paths, *session.posargs)
    session.run("ruff", "format", "--check", "--diff", *paths)


@nox.session
def layers(session: nox.Session) -> None:
    """Import-linter: imports only point down the stack (contracts in pyproject.toml)."""
    # import-linter reads the source statically: the libraries' own dependencies (torch...) are not needed.
    _install(session, "--no-deps", *(_local(layer) for layer in LAYERS))
    _install(session, "import-linter")
    session.run("lint-imports", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Mypy over the libraries' sources that have landed (settings in pyproject.toml)."""
    landed = ("core", "infer", "train", "eval", "rag", "agent")
    _install(session, "mypy", "types-PyYAML", *(_local(layer) for layer in landed))
    sources = [f"packages/lm-{layer}/src" for layer in landed]
    session.run("mypy", *sources, *session.posargs)


@nox.session
def quickstart(session: nox.Session) -> None:
    """Run examples/quickstart.py (train, evaluate, answer from documents, serve, search) on a fresh venv."""
    # lmstack-eval evaluates it (matplotlib, its plots extra, draws the needle heatmap); lmstack-rag answers
    # from the world's articles; transformers only for the check that it loads the trained model with the
    # same logits.
    _install(
        session,
        _local("core", "gguf"),
        _local("train"),
        _local("infer", "server"),
        _local("eval", "plots"),
        _local("rag"),
        _local("agent"),
        "transformers",
    )
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The pytest-benchmark suites in benchmarks/ (not run by default)."""
    # The baselines the benchmarks measure against, in the same run: transformers (generation, loading, the
    # SFT Trainer), TRL's SFTTrainer (with accelerate and datasets, which it trains through) and
    # lm-evaluation-harness (`--model hf`, against lmstack-eval, which the libraries below install).
    extras = (
        "pytest>=8", "pytest-benchmark", "transformers", "trl", "accelerate", "datasets", "psutil",
        "lm-eval[hf]>=0.4.9", "xgrammar", "llama-cpp-python", "gguf",
    )  # fmt: skip
    # The serving benchmark runs `transformers serve` (its serving extra: FastAPI, uvicorn, openai) against
    # `lmstack serve` (lmstack-infer's server extra).
    serving = ("transformers[serving]",)
    libraries = (_local(layer, "server" if layer == "infer" else "") for layer in LAYERS)
    _install(session, *extras, *serving, *libraries)
    session.run("pytest", "benchmarks", "-m", "benchmark", "--benchmark-only", *session.posargs)
