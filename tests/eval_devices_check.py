"""Run by test_evaluate.py under XLA_FLAGS=--xla_force_host_platform_device_count=N.

Builds a robustness report of test_evaluate's CAS-like model (PGD, CW and both AutoAttack
variants, small budgets) and saves every per-image verdict and the model rows it evaluated to
an .npz whose path it prints.
"""
import numpy as np

import fake_devices
import test_evaluate


def main():
  """One report on all local devices; write its verdicts."""
  report = test_evaluate.report_of(test_evaluate.main_masked_cas, "pgd5,cw5,aa,aa-joint")
  verdicts = {name: np.asarray(v) for name, v in report.verdicts.items()}
  total = report.costs["total"]
  fake_devices.save_arrays({**verdicts, "rows": np.asarray(total["forward_rows"]
                                                           + total["gradient_rows"])})


if __name__ == "__main__":
  main()
