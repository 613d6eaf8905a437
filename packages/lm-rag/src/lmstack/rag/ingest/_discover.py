"""Finding the documents to ingest: files and folders expanded into (path, source) pairs."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from lmstack.rag._errors import RAGConfigError

__all__ = ["SUPPORTED_SUFFIXES", "discover", "kind_of"]

SUPPORTED_SUFFIXES: Mapping[str, str] = MappingProxyType(
    {
        ".md": "markdown",
        ".markdown": "markdown",
        ".txt": "text",
        ".rst": "text",
        ".html": "html",
        ".htm": "html",
        ".pdf": "pdf",
        ".docx": "docx",
        ".xlsx": "xlsx",
        ".csv": "csv",
        ".py": "python",
    }
)
"""File suffix (lower case) to the document kind its reader produces."""

# Folders that hold tooling, caches or dependencies, never a project's documents.
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "__pypackages__"})


def kind_of(path: str | Path) -> str | None:
    """The document kind of a file by its suffix (case-insensitive), None when unsupported."""
    return SUPPORTED_SUFFIXES.get(Path(path).suffix.lower())


def _skipped_dir(path: Path) -> bool:
    # A virtual environment under any name is recognised by its pyvenv.cfg.
    return path.name.startswith(".") or path.name in _SKIPPED_DIRS or (path / "pyvenv.cfg").is_file()


def _matches(source: str, patterns: Sequence[str]) -> bool:
    # A glob matches the whole source or any trailing part that starts at a folder boundary, so
    # "drafts/*" excludes docs/drafts/x.md and "*.md" matches at any depth.
    parts = source.split("/")
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(tail, pattern) for pattern in patterns for tail in tails)


def _file_source(path: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def discover(
    paths: Sequence[str | Path], *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[tuple[Path, str]]:
    """Expands files and folders into the documents to ingest.

    A folder is walked recursively; hidden files and folders (``.git``, ``.venv``), ``__pycache__``,
    ``node_modules`` and virtual environments are skipped, and so are files whose suffix is not in
    :data:`SUPPORTED_SUFFIXES`. A file named explicitly is always returned (an unsupported one too:
    the reader then reports it as skipped).

    Each document's source is its path relative to the folder given, starting with the folder's own
    name so that two folders cannot collide (``docs/a/b.md`` for ``docs/``); for a file given directly,
    its path relative to the working directory when it is under it, else its absolute path. Sources
    use ``/`` separators.

    Args:
        paths: Files and folders.
        include: Globs (``fnmatch``) a source must match one of, when any are given. A glob matches the
            whole source or any trailing part of it that starts at a folder boundary.
        exclude: Globs that leave a source out (matched the same way).

    Returns:
        ``(path, source)`` pairs sorted by source, each file once.

    Raises:
        RAGConfigError: A path does not exist.
    """
    found: dict[str, Path] = {}
    seen: set[Path] = set()

    def add(path: Path, source: str) -> None:
        resolved = path.resolve()
        if resolved in seen or source in found:
            return
        if include and not _matches(source, include):
            return
        if exclude and _matches(source, exclude):
            return
        seen.add(resolved)
        found[source] = path

    for given in paths:
        root = Path(given)
        if not root.exists():
            raise RAGConfigError(
                f"{given} does not exist; give existing files or folders to ingest", field="paths"
            )
        if not root.is_dir():
            add(root, _file_source(root))
            continue
        prefix = root.resolve().name
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not _skipped_dir(folder / d))
            for name in sorted(filenames):
                if name.startswith(".") or kind_of(name) is None:
                    continue
                path = folder / name
                relative = path.relative_to(root).as_posix()
                add(path, f"{prefix}/{relative}" if prefix else relative)
    return [(found[source], source) for source in sorted(found)]
