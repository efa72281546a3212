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


def load_models(config, checkpoint: str, image_shape, device: str):
  """(our model_fn, the authors'-layout torch network on `device` returning main logits) with
  the same weights, from a workdir (its latest checkpoint) or an authors'-layout .pth."""
  import torch  # pylint: disable=g-import-not-at-top
  from cas_jax import models  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from cas_jax.models import interop, loading  # pylint: disable=g-import-not-at-top
  from tests.test_interop import build_torch_network  # pylint: disable=g-import-not-at-top
  if str(config.model.cas_stages) != "default" or config.get("baseline", "none") != "none":
    raise ValueError("the torch reference networks have the authors' CAS placement and no "
                     "baseline: use model.cas_stages=default and baseline=none")
  loaded = loading.load(config, checkpoint, config.data.num_classes, image_shape)
  net = build_torch_network(config.model.name, models.options_from_config(config.model))
  state = {k: torch.from_numpy(v) for k, v in
           interop.to_torch_state_dict(config.model.name, loaded.variables).items()}
  missing, unexpected = net.load_state_dict(state, strict=False)
  if unexpected or not all(interop.is_ignored_key(config.model.name, k) for k in missing):
    raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")

  class MainLogits(torch.nn.Module):
    """The authors' CAS network as the PyTorch attacks see it: main-head logits only."""

    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, images):
      return self.inner(images)[0]

  model_fn = evaluate.bind_model(loaded.model, loaded.variables)
  return model_fn, MainLogits(net).eval().to(device)


def checked_logit_gap(model_fn, net, x_nhwc, device: str):
  """(max |logit difference|, our logits) of the two networks on x; RuntimeError if they differ
  by more than 1e-3 or in any prediction (every comparison after would be meaningless)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  ours = np.asarray(model_fn(x_nhwc)[0])
  with torch.no_grad():
    theirs = net(torch.tensor(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)),
                              device=device)).cpu().numpy()
  gap = float(np.max(np.abs(ours - theirs)))
  if gap > 1e-3 or np.any(ours.argmax(1) != theirs.argmax(1)):
    raise RuntimeError(f"the exported torch network disagrees with ours (max logit gap "
                       f"{gap:.2e}): the comparison would be meaningless")
  return gap, ours


def official_robust(net, x_nchw, y, *, norm: str, eps: float, seed: int, apgd_steps: int,
                    fab_steps: int, square_queries: int, target_classes: int):
  """(robust flags per image, seconds) of the official AutoAttack standard (pyautoattack) at
  these budgets; under L1 it keeps its own 5 targets, as its standard version does."""
  import time  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top
  official_norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}[norm]
  adversary = AutoAttack(net, norm=official_norm, eps=eps, version="standard", seed=seed)
  adversary.verbose = False
  adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = apgd_steps
  adversary.fab.n_iter = fab_steps
  adversary.square.n_queries = square_queries
  if norm != "l1":
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = target_classes
  images, labels = torch.as_tensor(x_nchw), torch.as_tensor(np.asarray(y), dtype=torch.long)
  start = time.perf_counter()
  result = adversary.run_standard_evaluation(images, labels, batch_size=256)
  seconds = time.perf_counter() - start
  x_adv = result[0] if isinstance(result, tuple) else result
  with torch.no_grad():
    return (net(x_adv).argmax(1) == labels).numpy(), seconds


def as_nchw(images):
  """uint8 NHWC images -> a float torch tensor, NCHW in [0, 1]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return torch.tensor(np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
                      dtype=torch.float32) / 255


def train_briefly(net, x, y, steps: int):
  """`steps` SGD steps (lr 0.01, momentum 0.9, batches of 64 drawn by step) in train mode on
  uint8 NHWC images; the network in eval mode after."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
  net.train()
  for step in range(steps):
    batch = np.random.RandomState(step).choice(len(y), 64, replace=False)
    loss = torch.nn.functional.cross_entropy(net(as_nchw(x[batch])),
                                             torch.tensor(y[batch], dtype=torch.long))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  return net.eval()


def save_as_robustbench(net, path: str) -> None:
  """The network's state dict with the `module.` prefix RobustBench's checkpoints carry."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)


def counting_network(torch, net):
  """net wrapped so that it counts the rows of every forward call (and of gradient ones)."""

  class Counting(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.net, self.rows, self.gradient_rows = net, 0, 0

    def forward(self, x):
      self.rows += x.shape[0]
      if torch.is_grad_enabled() and x.requires_grad:
        self.gradient_rows += x.shape[0]
      return self.net(x)
  return Counting()
