"""A small real run: ResNet-18-CAS at width 16, AT+CAS on local CIFAR-10 files, on a CPU.

Run: python main.py --config=configs/cifar_subset.py --workdir=runs/cifar_subset \
       --config.data.cifar_dir=../shared/data/cifar-10-batches-py
"""
from cas_jax.configs import default


def get_config():
  """AT+CAS, width-16 ResNet-18, the official python-layout CIFAR-10 files of `data.cifar_dir`."""
  config = default.setting(objective="at", cas=True)
  config.data.source = "cifar_dir"
  config.model.width = 16
  config.batch_size = 64
  config.schedule.num_epochs = 5
  config.schedule.milestones = (5,)
  config.optim.lr = 0.05
  config.eval.num_images = 500
  config.log_every_steps = 20
  return config
