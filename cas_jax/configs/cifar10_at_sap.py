"""ResNet-18 on CIFAR-10, PGD-AT with the Table 1 baseline SAP (Dhillon et al. 2018):
stochastic activation pruning after every ReLU, a randomized defense.

Run: python main.py --config=configs/cifar10_at_sap.py --workdir=runs/cifar10_at_sap
Evaluate: python main.py --config=configs/cifar10_at_sap.py --workdir=runs/cifar10_at_sap --mode=eval
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, PGD-AT, no CAS, baseline sap (paper Table 1)."""
  config = default.setting(objective="at", cas=False, model="resnet18", dataset="cifar10")
  config.baseline = "sap"
  # A randomized defense: attack it with EOT (averaged gradients) as well as plain PGD.
  config.eval.attacks = "default,eot20,avg-pgd100,aa-rand"
  return config
