"""Smoke test: a tiny ResNet-18-CAS, AT+CAS on synthetic data; under a minute on 2 CPU cores.

Run: python main.py --config=configs/smoke.py --workdir=/tmp/cas_smoke
"""
from cas_jax.configs import default


def get_config():
  """Tiny AT+CAS run on synthetic data."""
  config = default.setting(objective="at", cas=True)
  config.data.source = "synthetic"
  config.data.synthetic_num_train = 256
  config.data.synthetic_num_test = 64
  config.model.width = 8
  config.batch_size = 32
  config.eval_batch_size = 64
  config.attack.steps = 3
  config.schedule.num_epochs = 2
  config.schedule.milestones = (2,)
  config.eval.num_images = 64
  config.eval.steps = 5
  # --mode=eval: the default attacks with small AutoAttack budgets (full ones take ~15 min on CPU).
  config.eval.apgd_steps = 10
  config.eval.fab_steps = 10
  config.eval.square_queries = 100
  config.eval.target_classes = 3
  config.log_every_steps = 4
  config.loss.pcl_warmup_epochs = 1  # --config.baseline=pcl: the PCL term from epoch 2 on
  return config
