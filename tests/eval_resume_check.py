"""Run by test_cascade_resume.py: one report of its counted CAS-like model with a state folder.

    python tests/eval_resume_check.py STATE_DIR OUT.npz

Saves the per-image verdicts, the images each stage attacked and the model rows this
process evaluated to OUT.npz; the state is
written after every batch, so that the test can kill it anywhere and start it again.
"""
import sys

from absl import logging
import jax
import numpy as np

import test_cascade
import test_cascade_resume


def main():
  """The report, resumed from STATE_DIR if a run there was interrupted."""
  state_dir, out = sys.argv[1:3]
  logging.set_verbosity(logging.INFO)  # "Resuming the evaluation ..." to stderr
  report = test_cascade_resume.resume_report(state_dir)
  jax.effects_barrier()
  np.savez(out, images=np.asarray(report.costs["total"]["images"]),
           rows=np.asarray(sum(test_cascade.ROWS)),  # model rows this process evaluated
           **{name: np.asarray(v) for name, v in report.verdicts.items()})


if __name__ == "__main__":
  main()
