"""The packaged config cas_jax/configs/cifar10_at_cas_l2.py; its docstring has the run command.

To change this setting, put that file's code here in place of the import and edit it.
"""
from cas_jax.configs.cifar10_at_cas_l2 import get_config  # pylint: disable=unused-import
