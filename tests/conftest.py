"""Test-session settings: compile fast, and free compiled programs between test modules."""
import gc
import os

import pytest

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()


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
