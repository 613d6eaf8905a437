"""Check which lmstack layers a nox session's virtualenv holds.

Usage: python ci/check_layers_installed.py PRESENT ABSENT, each a comma-separated list of layer
names (core, train, ...; may be empty). Every PRESENT layer must be installed as a distribution and
importable; no ABSENT layer may be either. That is what proves a library's tests ran against only
the layers below it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def _state(layer: str) -> tuple[bool, bool]:
    """(distribution installed, module importable) for one layer."""
    try:
        importlib.metadata.distribution(f"lmstack-{layer}")
    except importlib.metadata.PackageNotFoundError:
        installed = False
    else:
        installed = True
    return installed, importlib.util.find_spec(f"lmstack.{layer}") is not None


def main(argv: list[str]) -> int:
    present, absent = ([name for name in arg.split(",") if name] for arg in argv)
    wrong = [f"lmstack-{layer} is missing" for layer in present if _state(layer) != (True, True)]
    wrong += [f"lmstack-{layer} is installed or importable" for layer in absent if any(_state(layer))]
    if wrong:
        print("layer isolation broken: " + "; ".join(wrong), file=sys.stderr)
        return 1
    print(f"lmstack layers installed: {', '.join(present)}; not importable: {', '.join(absent) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:3]))
