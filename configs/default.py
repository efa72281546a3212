"""The base config, cas_jax/configs/default.py: a setting of your own here can start with
`from configs import default` and `config = default.setting(...)`."""
from cas_jax.configs.default import get_config, setting  # pylint: disable=unused-import
