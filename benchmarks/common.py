"""What both benchmarks record about the run, and how they report it."""
import json

import jax


def setup(config, batch_size: int) -> dict:
  """The model, precision, batch and devices a timing belongs to."""
  return {"model": config.model.name, "width": config.model.width or "full",
          "cas_stages": str(config.model.cas_stages), "dtype": config.model.dtype,
          "batch_size": batch_size, "devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind}


def report(result: dict, out: str) -> None:
  """Print `result` as JSON and, if `out` is set, write it there."""
  print(json.dumps(result, indent=2))
  if out:
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
