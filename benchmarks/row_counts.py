"""Model rows and seconds of our scheduled AutoAttack against the official one (pyautoattack,
the reference) and torchattacks' (a second reference), on the same weights and images.

  python -m benchmarks.row_counts --images=128 --out=benchmarks/results/row_counts.json
  python -m benchmarks.row_counts --images=128 --norm=l2   # or l1: the official and ours

A row is one image through one forward pass of the model; a gradient row also took a backward
pass. The PyTorch sides' rows are counted by a wrapper around their network (every forward
call, and the ones that built a graph for an input gradient); ours are the report's own cost
accounting (`report.costs`), which tests/test_cascade.py checks against a model that counts
its calls. All run AutoAttack standard (APGD-CE, APGD-T, FAB-T multi-targeted, Square, each
stage on the images the ones before left standing) at the same budgets. Seconds: one run of
each, on the same cores, from the call to its result (ours includes its compilations; the
process start-up, imports and training are outside every figure). Also measured: the extra rows of
running AutoAttack on every clean-correct image (exact_autoattack=True, the default) instead
of on the survivors of PGD and CW, on a plain and a CAS network.
"""
import importlib.metadata
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.attack_registry import AttackBudget

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 128, "Test images (8x8 CIFAR-10, or synthetic without the data).")
flags.DEFINE_integer("steps", 25, "APGD and FAB iterations on both sides.")
flags.DEFINE_integer("queries", 500, "Square queries on both sides.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_enum("norm", "linf", ["linf", "l2", "l1"],
                  "The threat model (torchattacks: L-inf only).")
# eps per norm on the 8x8x3 images: L-inf 4/255, and the L2 / L1 radii of about the same ball
# size (4/255 sqrt(192) = 0.22, 4/255 x 192 = 3.0), rounded.
EPS = {"linf": 4 / 255, "l2": 0.25, "l1": 2.0}


def torchattacks_rows(torch, torchattacks, net, x, y, eps, steps, queries, seed=0) -> dict:
  """torchattacks' AutoAttack standard at these budgets: rows, robust accuracy, images broken."""
  counted = common.counting_network(torch, net)
  reference = torchattacks.AutoAttack(counted, eps=eps, version="standard", seed=seed)
  for attack in reference._autoattack.attacks:
    if hasattr(attack, "steps"):
      attack.steps = steps
    if hasattr(attack, "n_queries"):
      attack.n_queries, attack.rescale_schedule = queries, False
  x_adv = reference(torch.tensor(x), torch.tensor(y))
  rows, gradient_rows = counted.rows, counted.gradient_rows
  with torch.no_grad():
    correct = net(torch.tensor(x)).argmax(1).numpy() == y
    robust = net(x_adv).argmax(1).numpy() == y
  return {"rows": rows, "gradient_rows": gradient_rows, "robust": float(np.mean(robust)),
          **_images(correct, robust)}


def official_rows(torch, auto_attack, net, x, y, eps, steps, queries, seed=0,
                  norm="linf") -> dict:
  """The official AutoAttack standard at these budgets: rows, seconds, robust accuracy."""
  counted = common.counting_network(torch, net)
  start = time.perf_counter()
  adversary = auto_attack(counted, eps=eps, norm={"linf": "Linf"}.get(norm, norm.upper()),
                          version="standard", seed=seed)
  adversary.verbose = False
  adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = steps
  adversary.square.n_queries = queries
  result = adversary.run_standard_evaluation(torch.tensor(x), torch.tensor(y), batch_size=len(y))
  seconds = time.perf_counter() - start
  x_adv = result[0] if isinstance(result, tuple) else result
  rows, gradient_rows = counted.rows, counted.gradient_rows
  with torch.no_grad():
    correct = net(torch.tensor(x)).argmax(1).numpy() == y
    robust = net(x_adv).argmax(1).numpy() == y
  return {"rows": rows, "gradient_rows": gradient_rows, "seconds": seconds,
          "robust": float(np.mean(robust)), **_images(correct, robust)}


def _images(correct, robust) -> dict:
  """The images (indices) classified correctly, and those of them an attack broke."""
  return {"correct": np.flatnonzero(correct).tolist(),
          "broken": np.flatnonzero(correct & ~robust).tolist()}


def our_rows(model_fn, x_nchw, y, eps, steps, queries, attacks="aa", **options) -> dict:
  """Our report's rows (natural included), figures and images broken, `attacks` at these budgets."""
  budget = AttackBudget(apgd_steps=steps, fab_steps=steps, square_queries=queries)
  x = np.transpose(x_nchw, (0, 2, 3, 1))
  start = time.perf_counter()
  report = evaluate.robustness_report(model_fn, x, y, key=jax.random.key(0), eps=eps,
                                      attacks=attacks, budget=budget, **options)
  seconds = time.perf_counter() - start
  total = report.costs["total"]
  return {"rows": int(total["rows"]), "gradient_rows": int(total["gradient_rows"]),
          "robust": report.accuracy("worst_case"), "aa_exact": report.is_exact("aa"),
          "seconds": seconds, "attack_seconds": total["seconds"],
          **_images(report.verdicts["natural"], report.verdicts["worst_case"])}


def compare(torch, torchattacks, auto_attack, net, model_fn, x, y, eps, steps, queries,
            norm="linf") -> dict:
  """Rows and seconds of the official AutoAttack, ours and torchattacks', and of our default
  report with and without exact AutoAttack (under L2 / L1: the official and ours only)."""
  ours = our_rows(model_fn, x, y, eps, steps, queries, norm=norm)
  official = official_rows(torch, auto_attack, net, x, y, eps, steps, queries, norm=norm)
  if norm != "linf":
    return {"official": official, "ours": ours, "ratio": ours["rows"] / official["rows"],
            "seconds_ratio": ours["seconds"] / official["seconds"],
            "missed_by_ours": sorted(set(official["broken"]) - set(ours["broken"]))}
  theirs = torchattacks_rows(torch, torchattacks, net, x, y, eps, steps, queries)
  exact = our_rows(model_fn, x, y, eps, steps, queries, attacks="pgd20,cw,aa")
  bound = our_rows(model_fn, x, y, eps, steps, queries, attacks="pgd20,cw,aa",
                   exact_autoattack=False)
  return {"official": official, "ours": ours, "ratio": ours["rows"] / official["rows"],
          "seconds_ratio": ours["seconds"] / official["seconds"],
          "missed_by_ours": sorted(set(official["broken"]) - set(ours["broken"])),
          "torchattacks": theirs, "ratio_torchattacks": ours["rows"] / theirs["rows"],
          "report_exact_aa": exact, "report_aa_on_survivors": bound,
          "exact_aa_extra": exact["rows"] / bound["rows"]}


def main(_):
  """Train the plain and CAS 8x8 networks, then compare rows on --images test images."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  import pyautoattack  # pylint: disable=g-import-not-at-top
  from tests import test_autoattack_torchattacks as parity  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  images, labels, source = parity._parity_data()  # pylint: disable=protected-access
  results = {"source": source, "images": FLAGS.images, "steps": FLAGS.steps,
             "norm": FLAGS.norm, "eps": EPS[FLAGS.norm],
             "queries": FLAGS.queries, "jax": jax.__version__, "torch": torch.__version__,
             "torchattacks": torchattacks.__version__,
             "pyautoattack": importlib.metadata.version("pyautoattack"),
             "devices": jax.device_count()}
  for name in ("plain", "cas"):
    net, model_fn = parity.trained_pair(torch, images, labels, cas=name == "cas")
    x, y = images[5000:5000 + FLAGS.images], labels[5000:5000 + FLAGS.images]
    eps = EPS[FLAGS.norm] * (1 if source == "cifar" else 6)
    results[name] = compare(torch, torchattacks, pyautoattack.AutoAttack, net, model_fn, x, y,
                            eps, FLAGS.steps, FLAGS.queries, FLAGS.norm)
    print(name, json.dumps(results[name]), flush=True)
  print(json.dumps(results, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
