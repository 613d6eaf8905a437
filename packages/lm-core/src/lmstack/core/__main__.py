"""``python -m lmstack.core``: the ``lmstack`` command line."""

import sys

from lmstack.core._cli import main

sys.exit(main())
