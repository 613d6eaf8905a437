"""Shared helpers of the Triton kernels: lazy import, lazy JIT, launch checks.

Triton is an optional extra (``lmstack-infer[kernels]``), and importing it costs time, so nothing here
imports it until a kernel is first launched. Kernels are written as plain module-level functions whose
bodies name ``tl``; a kernel module imports the placeholder ``tl`` from here (None) so the name
exists, and :func:`jit_kernel` binds it to ``triton.language`` in the kernel's module and wraps the
function with ``triton.jit`` on first launch. The wrapping is cached per value of
``TRITON_INTERPRET``, read at launch time.

One constraint comes from triton itself: its standard library (``tl.sum``, ``tl.max``, ``tl.zeros``
...) is wrapped for the interpreter or the compiler when triton is *imported*, so
``TRITON_INTERPRET=1`` must be set before anything imports triton (tests: at the top of the test module
or in a conftest). Because importing these modules does not import triton, setting it anywhere before
the first launch is enough; :func:`jit_kernel` raises a clear error when the two disagree.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lmstack.infer._errors import InferError

# Placeholder for kernel modules (``from ._triton_utils import tl``); jit_kernel rebinds the name in
# each kernel's module to ``triton.language`` before wrapping it.
tl: Any = None

__all__ = [
    "KernelUnavailableError",
    "check_device",
    "interpret_mode",
    "jit_kernel",
    "next_power_of_2",
    "tl",
    "triton_available",
]

logger = logging.getLogger(__name__)


class KernelUnavailableError(InferError):
    """A Triton kernel was asked for where it cannot run (triton missing, or CPU tensors uncompiled)."""


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (the ``kernels`` extra); does not import it."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _import_triton() -> Any:
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def interpret_mode() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set, so kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _jit(fn: Callable[..., None], interpret: bool) -> Any:
    triton = _import_triton()
    fn.__globals__["tl"] = triton.language  # the name the kernel body uses
    logger.debug("wrapping %s with triton.jit (interpreter: %s)", fn.__name__, interpret)
    return triton.jit(fn)


def jit_kernel(fn: Callable[..., None]) -> Any:
    """The ``triton.jit`` wrapper of a kernel function, made on first use for the current mode.

    Raises:
        KernelUnavailableError: If triton is not installed, or was imported under the other value
            of ``TRITON_INTERPRET`` than the one set now.
    """
    triton = _import_triton()
    if triton is None:
        raise KernelUnavailableError(
            "the Triton kernels need triton: install lmstack-infer[kernels] "
            "or use the torch implementation (kernels='torch')."
        )
    interpret = interpret_mode()
    if (type(triton.language.sum).__name__ == "InterpretedFunction") != interpret:
        raise KernelUnavailableError(
            f"triton was imported with TRITON_INTERPRET {'unset' if interpret else 'set'} but it is "
            f"{'set' if interpret else 'unset'} now; triton reads it at import, so set "
            "TRITON_INTERPRET=1 before anything imports triton (tests: a conftest or the top of the module)."
        )
    return _jit(fn, interpret)


def check_device(*tensors: Tensor) -> None:
    """Raise unless every tensor can be handed to a Triton kernel in the current mode.

    Raises:
        KernelUnavailableError: CPU tensors without ``TRITON_INTERPRET=1``, or CUDA tensors with it.
    """
    interpret = interpret_mode()
    for t in tensors:
        if t.is_cuda == interpret:
            where = "CUDA" if t.is_cuda else "CPU"
            raise KernelUnavailableError(
                f"a Triton kernel got {where} tensors while TRITON_INTERPRET is "
                f"{'set' if interpret else 'unset'}: run kernels on CUDA tensors, set "
                "TRITON_INTERPRET=1 to run them on CPU (tests), or use the torch implementation."
            )


def next_power_of_2(n: int) -> int:
    """The smallest power of two that is at least ``n`` (and at least 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
