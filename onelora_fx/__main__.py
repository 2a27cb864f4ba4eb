"""``python -m onelora_fx``: the ``onelora-fx`` command line."""

import sys

from .tools.cli import main

sys.exit(main())
