"""Run a test script in a process with N fake CPU devices; it hands back arrays as an .npz."""
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(devices: int) -> dict:
  """os.environ for a subprocess with `devices` fake CPU devices that imports cas_jax and tests."""
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def run_script(name: str, devices: int, *args: str):
  """Run tests/<name> [args] under --xla_force_host_platform_device_count; the arrays it
  saved."""
  env = environment(devices)
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", name), *args], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  arrays = np.load(result.stdout.strip().splitlines()[-1])
  assert int(arrays["devices"]) == devices
  return arrays


def save_arrays(arrays) -> None:
  """In the script: save `arrays` and the device count to an .npz and print its path."""
  path = tempfile.mktemp(suffix=".npz")
  np.savez(path, devices=np.asarray(jax.device_count()), **arrays)
  print(path)
