r"""A JSON decoder in a process of its own, for request bodies too large to decode next to the event loop.

``json.loads`` holds the GIL for the whole of its one C call: 30-45 ms here on a 2 MiB body of token
ids, during which neither the event loop nor the engine thread runs. This module decodes such bodies
in a child process instead, so the server process only copies bytes:

* the child (this file run as a script with ``python -I``, so it imports nothing but the standard
  library: no torch, no lmstack) reads length-prefixed bodies on stdin and writes length-prefixed
  pickles on stdout;
* it runs at a lower priority (nice 10), so on a busy machine it never takes a core from the server's
  event loop or engine thread;
* it sends every long list of plain integers as an ``array('q')`` (a ``memcpy`` to unpickle, where a
  list of 350,000 ints takes 20 ms of GIL), and :func:`decode` turns them back into lists in the
  calling thread (one C call of a few milliseconds);
* anything it is not sure of (a body that is not valid UTF-8 or JSON, not an object, nested past the
  recursion limit, or with ``\u`` escapes, which the server checks for unpaired surrogates) comes back
  as "fall back", and the caller decodes it the usual way, which also words the error.

The server starts one child lazily, on the first large body, and restarts it if it dies.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import pickle
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

__all__ = ["IntList", "JSONWorker", "decode"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">Q")
# Shorter int lists stay lists: the array round trip pays off on long ones only.
_MIN_ARRAY = 256
_INT64 = (-(2**63), 2**63 - 1)


# -- the child -------------------------------------------------------------------------------------------
def _compact(value: Any) -> Any:
    """``value`` with every long list of plain ints (no bools) within int64 as an ``array('q')``."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) >= _MIN_ARRAY and all(type(v) is int for v in value):
            if _INT64[0] <= min(value) and max(value) <= _INT64[1]:
                return array.array("q", value)
            return value
        return [_compact(v) for v in value]
    return value


def _decode_in_child(raw: bytes) -> tuple[str, Any]:
    try:
        text = raw.decode("utf-8")
        if "\\u" in text:  # the server's surrogate check words that error itself
            return ("fallback", "escapes")
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ("fallback", "invalid")
    if not isinstance(value, dict):
        return ("fallback", "not an object")
    return ("ok", _compact(value))


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    while True:
        header = _read_exactly(stdin, _HEADER.size)
        if header is None:  # the server closed the pipe: exit
            return
        raw = _read_exactly(stdin, _HEADER.unpack(header)[0])
        if raw is None:
            return
        try:
            reply = pickle.dumps(_decode_in_child(raw), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # never die on a body: the server falls back
            reply = pickle.dumps(("fallback", f"{type(exc).__name__}: {exc}"))
        stdout.write(_HEADER.pack(len(reply)))
        stdout.write(reply)
        stdout.flush()


# -- the server's side ------------------------------------------------------------------------------------
class IntList(list[int]):
    """A list the child found to hold only plain ints (no bools), so validation need not look again."""


def decode(value: Any) -> Any:
    """The child's reply as ``json.loads`` would have given it: arrays back to lists (:class:`IntList`)."""
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, array.array):
        return IntList(value.tolist())
    return value


class JSONWorker:
    """One child process decoding JSON bodies, used from any thread (one body at a time).

    Args:
        python: The interpreter to run the child with (this one by default).
    """

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        # -I: isolated (standard library only, no user site or PYTHON* variables); the file runs as a
        # script, so its package (and torch) is never imported in the child.
        return subprocess.Popen(
            [self._python, "-I", str(Path(__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def loads(self, raw: bytes) -> dict[str, Any] | None:
        """The JSON object in ``raw``, decoded in the child; None where the caller should decode it.

        Blocking (call it from a worker thread): the pipe reads and writes release the GIL. A child
        that died is restarted once; if that fails too, None.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._proc is None or self._proc.poll() is not None:
                        self._proc = self._start()
                    proc = self._proc
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write(_HEADER.pack(len(raw)))
                    proc.stdin.write(raw)
                    proc.stdin.flush()
                    header = _read_exactly(proc.stdout, _HEADER.size)
                    payload = (
                        None if header is None else _read_exactly(proc.stdout, _HEADER.unpack(header)[0])
                    )
                    if payload is None:
                        raise EOFError("the JSON worker closed its output")
                    status, value = pickle.loads(payload)
                except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
                    logger.warning(
                        "JSON worker failed (%s: %s); attempt %d of 2", type(exc).__name__, exc, attempt
                    )
                    self._stop()
                    continue
                return decode(value) if status == "ok" else None
            return None

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the child (it exits when its input closes); a later :meth:`loads` starts a new one."""
        with self._lock:
            self._stop()


if __name__ == "__main__":
    import os

    # Background work: on a busy machine the server's event loop and engine thread go first. Measured
    # under load on the 2-core machine (a clean-clone CI run beside it), /health during a 2 MiB token-id
    # prompt: 11, 127 and 145 ms at the same priority; 31, 17 and 18 ms with the child at nice 10.
    if hasattr(os, "nice"):
        os.nice(10)
    _serve(sys.stdin.buffer, sys.stdout.buffer)
