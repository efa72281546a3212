"""What a resumed report must share with the run it continues (evaluate.robustness_report's
state): digests of the model (its arrays and its functions by qualified name, the same in every
process), the images, the key, the code and the settings."""
import functools
import hashlib
import json
import re

import jax
import numpy as np

from cas_jax import provenance
from cas_jax.attacks import engine

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(value) -> str:
  """A description of a pytree node's static data that is the same in every process.

  Functions by their qualified name, partials by their function and arguments, anything else
  (a flax Module: its config) by its repr without memory addresses.
  """
  value = engine.held_function(value)  # a Partial's shim, traced_once's jit: what they hold
  if isinstance(value, functools.partial):
    args = [_describe(a) for a in value.args]
    kwargs = {k: _describe(v) for k, v in sorted(value.keywords.items())}
    return f"partial({_describe(value.func)}, {args}, {kwargs})"
  if callable(value) and hasattr(value, "__qualname__") and not isinstance(value, type):
    return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(_describe(v) for v in value) + ")"
  return _ADDRESS.sub("", repr(value))


def _structure(treedef) -> str:
  """_describe of every node of a tree structure, depth first."""
  node = treedef.node_data()
  if node is None:  # a leaf
    return "*"
  kind, aux = node
  children = ", ".join(_structure(child) for child in treedef.children())
  return f"{kind.__module__}.{kind.__qualname__}<{_describe(aux)}>[{children}]"


def _tree_digest(tree) -> str:
  """A digest of a pytree's arrays and its structure (its functions by qualified name)."""
  digest = hashlib.sha256(_structure(jax.tree.structure(tree)).encode())
  for leaf in jax.tree.leaves(tree):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def fingerprint(model_fns, x, y, indices, key, natural, **settings) -> dict:
  """What a resumed report must share with the run it continues, each part as a digest."""
  digest = lambda *arrays: hashlib.sha256(b"".join(
      np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]
  return {"model": _tree_digest(model_fns) + digest(natural), "images": digest(x, y, indices),
          "key": digest(np.asarray(jax.random.key_data(key))),
          "code": provenance.code_digest(),  # the package's version and sources
          **{name: json.dumps(value, sort_keys=True, default=str)
             for name, value in settings.items()}}
