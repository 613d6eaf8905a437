"""atomic_directory: the old directory stays complete until the new one is, whatever stops the writer."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmstack.core import LMStackError, atomic_directory, atomic_write_file
from lmstack.core._atomic import recover_directory

OLD = {"a.txt": "old a", "b.txt": "old b", "sub/deep.txt": "old deep"}
NEW = {"a.txt": "new a", "c.txt": "new c"}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _read(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


@pytest.fixture
def old_dir(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    _write(target, OLD)
    return target


def test_creates_a_new_directory(tmp_path: Path) -> None:
    target = tmp_path / "deeper" / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".ckpt.tmp-") and not any(tmp.iterdir())
        _write(tmp, NEW)
    assert _read(target) == NEW
    assert _siblings(target) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask


def test_replaces_exactly_by_default(old_dir: Path) -> None:
    with atomic_directory(old_dir) as tmp:
        _write(tmp, NEW)
    assert _read(old_dir) == NEW
    assert _siblings(old_dir) == []


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (True, {**OLD, **NEW}),
        (lambda name: name != "b.txt", {**NEW, "sub/deep.txt": "old deep"}),
    ],
)
def test_keep_carries_over_what_the_block_did_not_write(old_dir: Path, keep: object, expected: dict) -> None:
    with atomic_directory(old_dir, keep=keep) as tmp:  # type: ignore[arg-type]
        _write(tmp, NEW)
    assert _read(old_dir) == expected
    assert _siblings(old_dir) == []


def test_an_error_in_the_block_leaves_the_old_directory(old_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(old_dir, keep=True) as tmp:
        _write(tmp, NEW)
        raise RuntimeError("disk full")
    assert _read(old_dir) == OLD
    assert _siblings(old_dir) == []


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    with pytest.raises(LMStackError, match="not a directory"), atomic_directory(target):
        pass
    assert target.read_text() == "not a directory"


def test_the_rename_fallback_gives_the_same_result(old_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmstack.core._atomic._renameat2", None)
    with atomic_directory(old_dir, keep=True) as tmp:
        _write(tmp, NEW)
    assert _read(old_dir) == {**OLD, **NEW}
    assert _siblings(old_dir) == []


# Each step of a write at which the writer process is killed (os._exit, no cleanup runs), and how.
# "before"/"after" kill just before or just after the named internal function runs.
_KILL_POINTS = [
    ("block", "exchange"),  # while the block is still writing
    ("_carry_over:before", "exchange"),
    ("_carry_over:after", "exchange"),
    ("_fsync_tree:after", "exchange"),
    ("_exchange:before", "exchange"),
    ("_exchange:after", "exchange"),  # swapped; the old contents not yet deleted
    ("os.replace:after", "renames"),  # fallback: old moved aside, new not yet in place
    ("os.rename:after", "renames"),  # fallback: new in place, old aside not yet deleted
]

_CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from lmstack.core import _atomic

    target, point, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "renames":
        _atomic._renameat2 = None

    def killing(fn, when):
        def wrapper(*args, **kwargs):
            if when == "before":
                os._exit(9)
            result = fn(*args, **kwargs)
            os._exit(9)
        return wrapper

    if point != "block":
        name, when = point.split(":")
        if name.startswith("os."):
            # patch os.* only as the module sees it, only once the swap starts
            class _Os:
                def __getattr__(self, attr):
                    return getattr(os, attr)
            proxy = _Os()
            setattr(proxy, name[3:], killing(getattr(os, name[3:]), when))
            real_swap = _atomic._swap_by_renames
            def swap(*args):
                _atomic.os = proxy
                return real_swap(*args)
            _atomic._swap_by_renames = swap
        else:
            setattr(_atomic, name, killing(getattr(_atomic, name), when))

    with _atomic.atomic_directory(target, keep=lambda name: name != "b.txt") as tmp:
        (tmp / "a.txt").write_text("new a")
        if point == "block":
            os._exit(9)
        (tmp / "c.txt").write_text("new c")
    os._exit(0)
    """
)


@pytest.mark.parametrize(("point", "mode"), _KILL_POINTS)
def test_a_writer_killed_at_any_step_leaves_a_complete_directory(
    old_dir: Path, point: str, mode: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(old_dir), point, mode], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    new = {**NEW, "sub/deep.txt": "old deep"}
    if mode == "exchange":
        # With an atomic exchange the path itself is never empty nor partial.
        assert _read(old_dir) in (OLD, new)
    recover_directory(old_dir)  # what the next writer does first (and what a reader may do)
    assert _read(old_dir) in (OLD, new)
    assert _siblings(old_dir) == []  # a dead writer's staging and aside directories are gone
    with atomic_directory(old_dir) as tmp:  # and the next write just works
        _write(tmp, {"z.txt": "z"})
    assert _read(old_dir) == {"z.txt": "z"}
    assert _siblings(old_dir) == []


def test_a_live_writers_staging_is_not_touched(old_dir: Path) -> None:
    with atomic_directory(old_dir) as tmp:
        _write(tmp, NEW)
        recover_directory(old_dir)  # a reader or a second writer looking at the target meanwhile
        assert tmp.is_dir() and _read(tmp) == NEW
    assert _read(old_dir) == NEW


# -- single files -----------------------------------------------------------------------------------------


def test_atomic_write_file_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "run" / "config.yaml"
    assert atomic_write_file(target, "a: 1\n") == target
    atomic_write_file(target, b"a: 2\n")
    assert target.read_bytes() == b"a: 2\n"
    assert _siblings(target) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_file_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(LMStackError, match="is a directory"):
        atomic_write_file(tmp_path, "x")


_FILE_CHILD = textwrap.dedent(
    """
    import os, sys
    from lmstack.core import _atomic

    real = getattr(os, sys.argv[2])
    def killing(*args, **kwargs):
        os._exit(9)
    class _Os:
        def __getattr__(self, attr):
            return getattr(os, attr)
    proxy = _Os()
    setattr(proxy, sys.argv[2], killing)
    _atomic.os = proxy
    _atomic.atomic_write_file(sys.argv[1], "new contents " * 10_000)
    os._exit(0)
    """
)


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_atomic_write_file_killed_leaves_the_old_file(tmp_path: Path, step: str) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("old contents")
    args = [sys.executable, "-c", _FILE_CHILD, str(target), step]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 9, proc.stderr
    assert target.read_text() == "old contents"
    atomic_write_file(target, "next")  # the next write works and clears the dead writer's sibling
    assert target.read_text() == "next"
    assert _siblings(target) == []
