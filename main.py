"""Train, evaluate or analyze a CAS model from a checkout: the same as the `cas-jax` command.

  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas
  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=eval
  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=analyze
"""
from cas_jax import main

if __name__ == "__main__":
  main.run()
