"""Atomic directory writes: the one way every lmstack layer replaces a directory on disk.

Checkpoints, training state, tokenizers, data caches and adapters are directories of several files that
must change together. :func:`atomic_directory` yields an empty hidden sibling of the target; the caller
fills it, and on a clean exit it is flushed to disk and swapped with the target in one step. The
guarantee: at every instant the target path holds either the complete old directory or the complete new
one, whatever kills the writer (an exception, SIGKILL, power loss after the flush).

A single file (a run's ``config.yaml`` beside its checkpoints) gets the same guarantee from
:func:`atomic_write_file`: written to a hidden sibling, flushed, and renamed over the target.

The swap is ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem offer it (Linux 3.15+: ext4,
xfs, btrfs, tmpfs). Elsewhere it is two renames (target aside, new into place); a writer killed between
them leaves the old directory complete beside the empty path, and the next write to that target, or
:func:`recover_directory`, puts it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lmstack.core._errors import LMStackError

__all__ = ["atomic_directory", "atomic_file", "atomic_write_file", "recover_directory"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Writers tag their hidden siblings with host and pid, so a later writer can tell a dead one's leftovers.
_HOST = "".join(c for c in socket.gethostname() if c.isalnum()) or "host"


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn: Callable[..., int] = libc.renameat2
    except (OSError, AttributeError):  # musl before 1.2.5, old glibc: no wrapper
        return None
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot (then nothing changed)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this filesystem or kernel has no exchange: fall back to two renames
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


def _swap_by_renames(staging: Path, target: Path, tag: str) -> None:
    """The fallback swap: old directory aside, new one in, old one deleted.

    A writer killed between the two renames leaves the target path empty for a moment, with the old
    directory complete at ``.NAME.old-...``; :func:`recover_directory` puts it back.
    """
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{tag}", dir=target.parent))
    os.replace(target, aside)  # renaming onto an empty directory replaces it
    try:
        os.rename(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link is free and safe: nothing writes carried-over files in place, and the old directory
    # is deleted (its link dropped) only after the swap.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, keep: bool | Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        if (new / entry.name).exists() or (new / entry.name).is_symlink():
            continue
        if keep is not True and not (callable(keep) and keep(entry.name)):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(sibling: Path) -> bool:
    """Whether a staging or aside directory was left by a writer on this host that has died."""
    parts = sibling.name.rsplit(".", 1)[-1].split("-")  # "tmp-HOST-PID-RANDOM" / "old-HOST-PID-RANDOM"
    if len(parts) < 4 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    return not _pid_alive(int(parts[2]))


def recover_directory(target: str | os.PathLike[str]) -> Path:
    """Undo what a killed writer left next to ``target`` and return its path.

    Where the two-rename fallback was interrupted, the old directory is put back at ``target``; hidden
    staging and aside directories of dead writers on this host are removed. :func:`atomic_directory`
    calls it before every write; readers may call it too (it never touches a live writer's files).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return target
    asides = sorted(p for p in target.parent.glob(f".{target.name}.old-*") if p.is_dir() and _stale(p))
    if asides and not target.exists():
        os.replace(asides.pop(), target)
        _fsync_dir(target.parent)
        logger.warning("restored %s from an interrupted write", target)
    for leftover in [*asides, *target.parent.glob(f".{target.name}.tmp-*")]:
        if leftover.is_dir() and _stale(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str], *, keep: bool | Callable[[str], bool] = False
) -> Iterator[Path]:
    """Replace the directory ``target`` all at once with what the block writes.

    Yields an empty staging directory, a hidden sibling of ``target`` on the same filesystem. On a clean
    exit from the block every file in it is flushed to disk, the entries of the old ``target`` that the
    block did not write are carried over when ``keep`` says so, and staging and ``target`` are swapped in
    one atomic step; the old contents are then deleted. If the block raises (or the process dies), the
    staging directory is discarded and ``target`` stays exactly as it was. One writer per target at a
    time: concurrent writers each produce a complete directory, and the last swap wins.

    Args:
        target: The directory to create or replace. Its parent is created if missing.
        keep: Which entries of the old directory to keep when the block does not write them: ``False``
            (none: the new directory is exactly what the block wrote), ``True`` (all), or a predicate on
            the entry's name (for example "everything but stale weight shards").

    Yields:
        The staging directory to write into.

    Raises:
        LMStackError: ``target`` exists and is not a directory.

    Example:
        >>> with atomic_directory("run/checkpoint-100") as tmp:  # doctest: +SKIP
        ...     (tmp / "state.json").write_text("{}")
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LMStackError(f"{target} exists and is not a directory; remove it or choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tag = f"{_HOST}-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{tag}", dir=target.parent))
    try:
        yield staging
        if keep and target.is_dir():
            _carry_over(target, staging, keep)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; give the mode a mkdir would
        _fsync_tree(staging)
        if not target.exists():
            os.rename(staging, target)
        elif _exchange(staging, target):
            shutil.rmtree(staging)  # staging now holds the old contents
        else:
            _swap_by_renames(staging, target, tag)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_file(path: str | os.PathLike[str], data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Replace the file ``path`` all at once with ``data``: it holds the old bytes or the new, never part.

    The data goes to a hidden sibling, is flushed to disk, and is renamed over ``path`` (one atomic
    step on POSIX); the parent directory is then flushed too. On any failure the sibling is removed and
    ``path`` is untouched; a sibling left by a killed writer is removed by the next write. Parent
    directories are created.

    Args:
        path: The file to create or replace.
        data: Its new contents; ``str`` is encoded with ``encoding``.
        encoding: The text encoding for ``str`` data.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        LMStackError: ``path`` is a directory.
        OSError: The file could not be written (the old one is left as it was).
    """
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden sibling of ``path`` to write; on success it replaces ``path`` in one atomic step.

    For writers that need a file name rather than bytes (a GGUF writer, say): write the whole file to
    the yielded path; when the block ends it is flushed to disk, given the mode ``open()`` would, and
    renamed over ``path``, then the parent directory is flushed. If the block raises, the sibling is
    removed and ``path`` is untouched. A sibling left by a killed writer is removed by the next write.

    Raises:
        LMStackError: ``path`` is a directory.
    """
    target = Path(path)
    if target.is_dir():
        raise LMStackError(f"{target} is a directory; give the path of a file to write.")
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):  # a killed writer's
        if leftover.is_file() and _stale(leftover):
            leftover.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_HOST}-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the mode an open() would
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
