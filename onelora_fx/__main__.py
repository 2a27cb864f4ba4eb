"""``python -m onelora_fx``: the ``onelora-fx`` command line."""

import sys

from .cli import main

sys.exit(main())
