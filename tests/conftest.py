"""Test configuration: deterministic hypothesis runs by default, so CI is reproducible.

``HYPOTHESIS_PROFILE=explore pytest`` draws fresh random examples instead (and keeps a
database of failures), for looking for new counterexamples locally.

Inductor's on-disk cache is keyed without ``ATEN_CPU_CAPABILITY``: a kernel generated
with vector instructions (the CPU's own capability) is reused, and fails to compile,
under ``ATEN_CPU_CAPABILITY=default`` (measured with torch 2.13). Each capability gets a
cache folder of its own here, unless ``TORCHINDUCTOR_CACHE_DIR`` is set.
"""

import getpass
import os
import tempfile

from hypothesis import settings

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    capability = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_onelora_{capability}")

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
