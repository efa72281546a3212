"""Run by test_cascade.py and test_evaluate.py under
XLA_FLAGS=--xla_force_host_platform_device_count=N.

Builds a robustness report of test_evaluate's CAS-like model (PGD, CW and both AutoAttack
variants, small budgets) and saves every per-image verdict, the model rows the report says it
evaluated (padding apart) and the rows a debug callback inside the model saw, to an .npz whose
path it prints. With the argument `uncounted`, the model has no callback (its programs then come
from the persistent compilation cache) and `seen` is 0.
"""
import sys
import threading

import jax
import numpy as np

from cas_jax.evaluation import evaluate
import fake_devices
import test_evaluate

_seen = {"rows": 0}
_lock = threading.Lock()


def _add_rows(x):
  with _lock:
    _seen["rows"] += x.shape[0]


def counted_model(x):
  """test_evaluate's CAS-like model; every call adds its rows (each device's shard) to _seen."""
  jax.debug.callback(_add_rows, x, partitioned=True)
  return test_evaluate.main_masked_cas(x)


def main():
  """One report on all local devices; write its verdicts and its two row counts."""
  # 15 images: the natural pass and the attacks pad their last batch on 2 devices
  model = test_evaluate.main_masked_cas if "uncounted" in sys.argv[1:] else counted_model
  report = evaluate.robustness_report(
      model, test_evaluate.X[:15], test_evaluate.Y[:15], key=test_evaluate.KEY,
      eps=test_evaluate.EPS, attacks="pgd5,cw5,aa,aa-joint", batch_size=8,
      budget=test_evaluate.BUDGET)
  jax.effects_barrier()
  # A model whose verdicts follow each image's random stream, not a construction.
  x = test_evaluate.X[:15]
  rugged = evaluate.robustness_report(
      test_evaluate.rugged, x, np.asarray(np.argmax(test_evaluate.rugged(x), -1), np.int32),
      key=test_evaluate.KEY, eps=0.001, attacks="pgd5,square", batch_size=8,
      budget=test_evaluate.BUDGET)
  verdicts = {name: np.asarray(v) for name, v in report.verdicts.items()}
  verdicts.update({f"rugged:{name}": np.asarray(v) for name, v in rugged.verdicts.items()})
  total = report.costs["total"]
  fake_devices.save_arrays({
      **verdicts, "rows": np.asarray(total["rows"]), "padding": np.asarray(total["padding_rows"]),
      "natural_rows": np.asarray(total["natural_rows"]), "seen": np.asarray(_seen["rows"])})


if __name__ == "__main__":
  main()
