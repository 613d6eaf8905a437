"""What ``/ingest`` may read: uploads saved under the index, or server-side paths under the ingest roots."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from lmstack.rag.ingest import discover
from lmstack.rag.server._http import APIError

__all__ = ["UPLOADS", "allowed_paths", "safe_name", "save_upload"]

UPLOADS = "uploads"
"""The folder under the index directory where uploads are kept (and ingested from)."""

_UNSAFE = re.compile(r"[^\w.\- ]+")
_MAX_NAME = 200


def safe_name(filename: str | None) -> str:
    """A plain file name from a client's: no folders, no leading dots, no control or shell characters.

    Raises:
        APIError: 400 when nothing usable is left.
    """
    base = re.split(r"[/\\]", filename or "")[-1]
    name = _UNSAFE.sub("_", base).strip(" ._")
    stem, dot, suffix = name.rpartition(".")
    if len(name) > _MAX_NAME:  # keep the suffix: it decides which reader opens the file
        name = (stem[: _MAX_NAME - len(suffix) - 1] + dot + suffix) if dot else name[:_MAX_NAME]
    if not name:
        raise APIError(
            400,
            f"the upload's file name {filename!r} has no usable characters; name the file",
            param="files",
            code="bad_filename",
        )
    return name


def save_upload(source: IO[bytes], folder: Path, name: str, limit: int) -> int:
    """Copy an upload to ``folder/name`` (written beside it, then renamed, so no reader sees half a file).

    Returns:
        The bytes written.

    Raises:
        APIError: 413 when the file has more than ``limit`` bytes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.part"  # hidden: an ingest running meanwhile skips it
    written = 0
    try:
        with partial.open("wb") as out:
            while block := source.read(1 << 20):
                written += len(block)
                if written > limit:
                    raise APIError(
                        413,
                        f"the upload {name} is larger than {limit} bytes",
                        param="files",
                        code="too_large",
                    )
                out.write(block)
        os.replace(partial, folder / name)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def allowed_paths(paths: Sequence[str], roots: Sequence[str | Path]) -> list[Path]:
    """The given paths, resolved, once each has been checked to lie under one of ``roots``.

    Symlinks are resolved before the check, both of the paths given and of every file in a given folder, so
    no link leads out of the roots.

    Raises:
        APIError: 403 naming the first path outside the roots (or when no roots are configured), 404 for a
            path that does not exist.
    """
    if not roots:
        raise APIError(
            403,
            "ingesting server-side paths is off: start the server with --ingest-root DIR "
            "(or upload the files)",
            param="paths",
            code="no_ingest_roots",
        )
    resolved_roots = [Path(root).resolve() for root in roots]
    allowed: list[Path] = []
    for given in paths:
        path = Path(given).expanduser().resolve()
        if not _inside(path, resolved_roots):
            raise APIError(
                403,
                f"{given} is outside the ingest roots ({', '.join(map(str, resolved_roots))})",
                param="paths",
                code="outside_roots",
            )
        if not path.exists():
            raise APIError(404, f"{given} does not exist", param="paths", code="not_found")
        for file, _ in discover([path]) if path.is_dir() else []:
            if not _inside(file.resolve(), resolved_roots):
                raise APIError(
                    403,
                    f"{file} links to {file.resolve()}, outside the ingest roots",
                    param="paths",
                    code="outside_roots",
                )
        allowed.append(path)
    return allowed
