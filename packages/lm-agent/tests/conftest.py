"""Test helpers of lmstack-agent (the scripted LLM, loopback HTTP servers) importable by name.

pytest's importlib mode puts no test folder on sys.path; these helpers are plain modules beside the
tests, so this folder is added once here.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
