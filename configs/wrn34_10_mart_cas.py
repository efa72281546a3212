"""The packaged config cas_jax/configs/wrn34_10_mart_cas.py; its docstring has the run command.

To change this setting, put that file's code here in place of the import and edit it.
"""
from cas_jax.configs.wrn34_10_mart_cas import get_config  # pylint: disable=unused-import
