"""Test-session settings: compile fast. Tests run tiny models, so XLA's compile time dominates."""
import os

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()
