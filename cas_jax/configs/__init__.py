"""The packaged configs: one module per paper setting, each with `get_config()`.

`default.py` holds every field and `default.setting(...)`; each setting module changes a few
fields. The repository's top-level `configs/` re-exports these files (copy one there to edit
it). Commands take a config by file path or by packaged name:

  cas-jax --config=smoke --workdir=/tmp/cas_smoke        # cas_jax/configs/smoke.py
  cas-jax --config=configs/cifar10_at_cas.py --workdir=runs/at_cas

  from cas_jax import configs
  config = configs.get_config("cifar10_at_cas")          # or a path to a .py file
"""
import glob
import importlib.util
import os
from typing import List

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> List[str]:
  """The packaged configs' names (file names without `.py`), `default` included."""
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if not os.path.basename(p).startswith("_"))


def path(name_or_path: str) -> str:
  """The config file of a packaged name (`smoke`) or of an existing path (`configs/smoke.py`)."""
  if os.path.isfile(name_or_path):
    return name_or_path
  if name_or_path in names():
    return os.path.join(CONFIG_DIR, f"{name_or_path}.py")
  raise ValueError(f"config file {name_or_path} does not exist and is no packaged config name; "
                   f"pass a .py file or one of: {', '.join(names())}")


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
  """The `get_config()` of a packaged config name or of a config file."""
  file = path(name_or_path)
  spec = importlib.util.spec_from_file_location("cas_jax_user_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
