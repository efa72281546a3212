"""Run by test_evaluate.py in a fresh process: train test_train's tiny config for one epoch in
WORKDIR, then evaluate the workdir with the default attacks (small budgets).

    python tests/eval_workdir_check.py WORKDIR

(A fresh process: this test compiles a whole training step and every AutoAttack unit of a
network, many memory mappings that a long-lived pytest-xdist worker need not keep; see
docs/implementation.md, "Many compilations in one process".)
"""
import sys

from cas_jax.evaluation import evaluate
from cas_jax.training import train
from test_train import tiny_config


def main():
  """Train, then evaluate; the reports are printed and written under WORKDIR/eval."""
  workdir = sys.argv[1]
  config = tiny_config()
  config.schedule.num_epochs = 1
  train.train_and_evaluate(config, workdir)
  config.eval.report_images = 16
  config.eval.attacks = "default"
  config.eval.apgd_steps, config.eval.fab_steps = 3, 3
  config.eval.square_queries, config.eval.target_classes = 10, 2
  reports = evaluate.evaluate_workdir(config, workdir)
  print("labels:", ",".join(sorted(reports)))


if __name__ == "__main__":
  main()
