"""Test-session settings: compile fast, cache compiled programs on disk, and free them from
memory between test modules."""
import gc
import os

import pytest

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()

# One persistent compilation cache for the whole suite: its xdist workers and the processes
# its tests start (main.py, the experiment driver, the multi-device checks) fetch what another
# one compiled, and a rerun of the suite starts warm. Kept apart from the users' cache;
# CAS_JAX_COMPILATION_CACHE=off (or another folder) overrides it.
TEST_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cas_jax", "tests")
if os.environ.get("CAS_JAX_COMPILATION_CACHE", "").lower() != "off":
  os.environ.setdefault("CAS_JAX_COMPILATION_CACHE", TEST_CACHE)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["CAS_JAX_COMPILATION_CACHE"])
  # Programs that took 0.2 s or more: the attacks' and training steps', not every small op.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drop every compiled program after each test module.

  Each XLA:CPU executable keeps memory mappings of its own: one test file of this suite left
  11,124 mappings in its process, and a pytest-xdist worker that had compiled the programs of
  a few hundred tests passed the kernel's vm.max_map_count (65,530), after which XLA crashed in
  its next compilation (a segmentation fault in backend_compile_and_load). With this fixture,
  two files leave 1,195.
  """
  yield
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS is set)
  jax.clear_caches()
  gc.collect()
