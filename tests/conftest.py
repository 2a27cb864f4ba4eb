"""Test configuration: deterministic hypothesis runs by default, so CI is reproducible.

``HYPOTHESIS_PROFILE=explore pytest`` draws fresh random examples instead (and keeps a
database of failures), for looking for new counterexamples locally.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
