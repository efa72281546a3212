"""Ours vs torchattacks' AutoAttack (standard), image by image and stage by stage, over seeds.

  python -m benchmarks.autoattack_parity --config=configs/cifar_subset.py \
    --config.loss.objective=natural --config.data.cifar_dir=../shared/data/cifar-10-batches-py \
    --checkpoint=runs/natural_cas16 --images=128 --eps=1 --seeds=5 \
    --out=benchmarks/results/autoattack_parity_natural_cas16_eps1.json

The model is a workdir (its latest checkpoint) or an authors'-layout .pth: ResNet-18, WRN-34-10
(or any `wrn` depth/widen_factor) or VGG16, with the authors' CAS placement. Its weights are
exported (interop.to_torch_state_dict) to the PyTorch network of the authors' layout (the ones
tests/test_interop.py checks against models) and the two forward passes are compared before
anything runs; torchattacks runs on the GPU when torch sees one (--torch_device). Both
AutoAttacks then attack the first --images test images with --seeds seeds each (ours:
jax.random.key(seed); theirs: seed=seed, which torchattacks gives every stage), at the official budgets by default (100 APGD/FAB iterations, 9 targets,
5000 Square queries without rescaling its schedule; `--reference=shipped` keeps
torchattacks' own defaults: 10 iterations and a rescaled Square schedule). The reference's
stages run one after the other on the images still robust, as its MultiAttack does, so
each broken image is credited to the stage that broke it on both sides.

Prints a markdown report and writes every per-image verdict as JSON (--out).
"""
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import torch

from benchmarks import common
from cas_jax import attacks
from cas_jax import input_pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/ (model, data).")
flags.DEFINE_string("checkpoint", None, "A workdir (its latest checkpoint) or a .pth file.")
flags.DEFINE_integer("images", 128, "The first N test images.")
flags.DEFINE_float("eps", 8.0, "Radius in 1/255 units.")
flags.DEFINE_integer("seeds", 5, "Seeds per side (0..seeds-1).")
flags.DEFINE_list("sides", ["ours", "reference"], "Which AutoAttacks to run.")
flags.DEFINE_integer("first_seed", 0, "Seeds first_seed..seeds-1 (split one run over processes).")
flags.DEFINE_list("merge", [], "JSON files of this script to combine into --out (runs nothing).")
flags.DEFINE_enum("reference", "official", ["official", "shipped"],
                  "torchattacks at AutoAttack's official budgets, or at its own defaults.")
flags.DEFINE_integer("apgd_steps", 100, "APGD/FAB iterations on both sides (official budget).")
flags.DEFINE_integer("square_queries", 5000, "Square queries on both sides (official budget).")
flags.DEFINE_integer("torch_threads", 1, "torch.set_num_threads.")
flags.DEFINE_string("torch_device", "auto", "Where torchattacks runs: cpu, cuda or auto (cuda if "
                    "torch sees a GPU).")
flags.DEFINE_string("out", "", "Write the per-image verdicts and the summary as JSON here.")

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
ENVIRONMENT = {}  # versions and devices of this run (or of the merged runs)


def first_breaking_stage(flags_by_stage: dict) -> list:
  """Per image: the stage after which it is no longer robust, 'clean' if misclassified, or None."""
  verdict, robust = [], flags_by_stage["clean"]
  for i in range(len(robust)):
    if not robust[i]:
      verdict.append("clean")
      continue
    verdict.append(next((s for s in STAGES if not flags_by_stage[s][i]), None))
  return verdict


def run_ours(model_fn, x, y, eps, seed):
  """Our AutoAttack's per-image verdicts (first_breaking_stage) for one seed."""
  _, robust = attacks.autoattack(
      model_fn, jnp.asarray(x), jnp.asarray(y), eps=eps, key=jax.random.key(seed), version="standard",
      return_per_attack=True, apgd_steps=FLAGS.apgd_steps, fab_steps=FLAGS.apgd_steps,
      square_queries=FLAGS.square_queries)
  return first_breaking_stage({k: np.asarray(v) for k, v in robust.items()})


def run_reference(net, x, y, eps, seed, device):
  """torchattacks' AutoAttack stages in MultiAttack's order, each on the images still robust."""
  import torchattacks  # pylint: disable=g-import-not-at-top
  auto = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=10,
                                 seed=seed)
  stages = auto._autoattack.attacks  # pylint: disable=protected-access
  if FLAGS.reference == "official":
    for stage in stages:
      if hasattr(stage, "steps"):
        stage.steps = FLAGS.apgd_steps
      if hasattr(stage, "n_queries"):
        stage.n_queries = FLAGS.square_queries
        stage.rescale_schedule = False
  images = torch.tensor(x, device=device)
  labels = torch.tensor(y, dtype=torch.long, device=device)
  with torch.no_grad():
    robust = (net(images).argmax(1) == labels).cpu().numpy()
  flags_by_stage = {"clean": robust.copy()}
  for name, stage in zip(STAGES, stages):
    idx = np.flatnonzero(robust)
    if idx.size:
      adv = stage(images[idx], labels[idx])
      if float((adv.detach() - images[idx]).abs().max()) > eps + 1e-6:
        raise RuntimeError(f"reference {name} left the eps-ball")
      with torch.no_grad():
        robust[idx] = (net(adv).argmax(1) == labels[idx]).cpu().numpy()
    flags_by_stage[name] = robust.copy()
  return first_breaking_stage(flags_by_stage)


def summarize(ours: list, theirs: list, clean: np.ndarray) -> dict:
  """Robust accuracy per seed and stage, and the per-image agreement (any / every seed)."""
  ours, theirs = np.array(ours, object), np.array(theirs, object)  # (seeds, images)
  broken_ours, broken_theirs = ours != None, theirs != None  # noqa: E711 (elementwise)
  broken_ours &= clean
  broken_theirs &= clean
  side = lambda v: {"robust_acc_per_seed": [float(np.mean(clean & ~b)) for b in v]}
  summary = {"clean_acc": float(np.mean(clean)), "ours": side(broken_ours),
             "reference": side(broken_theirs)}
  for name, verdicts in (("ours", ours), ("reference", theirs)):
    summary[name]["broken_per_stage_per_seed"] = {
        s: [int(np.sum(row == s)) for row in verdicts] for s in STAGES}
  for rule, reduce in (("any_seed", np.any), ("every_seed", np.all)):
    a, b = reduce(broken_ours, 0), reduce(broken_theirs, 0)
    summary[rule] = {"both": int(np.sum(a & b)), "ours_only": int(np.sum(a & ~b)),
                     "reference_only": int(np.sum(~a & b)),
                     "ours_only_images": np.flatnonzero(a & ~b).tolist(),
                     "reference_only_images": np.flatnonzero(~a & b).tolist()}
  # Images the reference broke with some seed and ours with none: which stages broke them.
  never_ours = np.flatnonzero(~np.any(broken_ours, 0) & np.any(broken_theirs, 0))
  summary["reference_only_stages"] = {int(i): sorted({str(v) for v in theirs[:, i] if v})
                                      for i in never_ours}
  return summary


def speed(seconds: dict, images: int) -> dict:
  """Per side: the first seed's seconds (ours: with compilation), the later seeds' mean, images/s
  of the later seeds (of the first when it ran alone)."""
  result = {}
  for side, times in seconds.items():
    if times:
      later = float(np.mean(times[1:])) if len(times) > 1 else None
      result[side] = {"first_seed_s": times[0], "later_seeds_mean_s": later,
                      "images_per_s": images / (later or times[0])}
  return result


def environment(device: str) -> dict:
  """Versions and devices behind the numbers."""
  import torchattacks  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jax_device": jax.devices()[0].device_kind,
          "torch": torch.__version__, "torchattacks": torchattacks.__version__,
          "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "torch_threads": FLAGS.torch_threads, "cpu_count": os.cpu_count()}


def markdown(summary: dict, setting: str, timing: dict, env: dict) -> str:
  """The summary, the speed and the environment as markdown."""
  acc = lambda v: f"{100 * np.mean(v):.1f} ({100 * np.min(v):.1f}-{100 * np.max(v):.1f})"
  lines = [f"### {setting}", "",
           "| side | robust acc. %, mean (min-max over seeds) | "
           + " | ".join(f"{s} (mean per seed)" for s in STAGES) + " |",
           "|---|---|" + "---|" * len(STAGES)]
  for name in ("ours", "reference"):
    side = summary[name]
    per_stage = " | ".join(f"{np.mean(side['broken_per_stage_per_seed'][s]):.1f}" for s in STAGES)
    lines.append(f"| {name} | {acc(side['robust_acc_per_seed'])} | {per_stage} |")
  lines += ["", "| images broken | by both | ours only | reference only |", "|---|---|---|---|"]
  for rule in ("any_seed", "every_seed"):
    r = summary[rule]
    lines.append(f"| by {rule.replace('_', ' ')} | {r['both']} | {r['ours_only']} | "
                 f"{r['reference_only']} |")
  if summary["reference_only_stages"]:
    lines.append("\nBroken by the reference and never by ours (image: reference stages): "
                 + ", ".join(f"{i}: {'/'.join(s)}" for i, s in
                             summary["reference_only_stages"].items()))
  lines += ["", "| side | first seed (s) | later seeds, mean (s) | images/s |", "|---|---|---|---|"]
  for name, t in timing.items():
    later = "-" if t["later_seeds_mean_s"] is None else f"{t['later_seeds_mean_s']:.1f}"
    lines.append(f"| {name} | {t['first_seed_s']:.1f} | {later} | {t['images_per_s']:.2f} |")
  lines.append("\nOurs' first seed includes compilation. "
               + ", ".join(f"{k} {v}" for k, v in env.items()))
  return "\n".join(lines)


def merge(paths):
  """Combine the verdicts of runs of one setting split over processes; write and print them."""
  runs = []
  for path in paths:
    with open(path) as f:
      runs.append(json.load(f))
  verdicts = {side: [v for r in runs for v in r["verdicts"][side]] for side in ("ours", "reference")}
  seconds = {side: [t for r in runs for t in r["seconds"][side]] for side in ("ours", "reference")}
  first = runs[0]
  ENVIRONMENT.update(first.get("environment", {}))
  for name in ("eps", "images", "reference", "apgd_steps", "square_queries", "checkpoint"):
    setattr(FLAGS, name, first[name])
  clean = np.array([v != "clean" for v in (verdicts["ours"] or verdicts["reference"])[0]])
  print(write_result(verdicts, seconds, clean, np.array(first["labels"]),
                     max(r["max_logit_gap"] for r in runs))["markdown"])


def main(_):
  """Load, check the two forward passes agree, run both AutoAttacks over seeds, report."""
  if FLAGS.merge:
    return merge(FLAGS.merge)
  if not FLAGS.config or not FLAGS.checkpoint:
    raise app.UsageError("--config and --checkpoint are required (or --merge=a.json,b.json)")
  torch.set_num_threads(FLAGS.torch_threads)
  config = FLAGS.config
  _, (test_images, test_labels) = input_pipeline.load_cifar_dir(config.data.cifar_dir)
  x = test_images[:FLAGS.images].astype(np.float32) / 255
  y = test_labels[:FLAGS.images].astype(np.int32)
  device = FLAGS.torch_device
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  model_fn, net = common.load_models(config, FLAGS.checkpoint, x.shape[1:], device)
  ENVIRONMENT.update(environment(device))
  x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  logit_gap, ours_logits = common.checked_logit_gap(model_fn, net, x, device)
  clean = ours_logits.argmax(1) == y
  eps = FLAGS.eps / 255
  verdicts, seconds = {"ours": [], "reference": []}, {"ours": [], "reference": []}
  for seed in range(FLAGS.first_seed, FLAGS.seeds):
    for name, run in (("ours", lambda: run_ours(model_fn, x, y, eps, seed)),
                      ("reference", lambda: run_reference(net, x_nchw, y, eps, seed, device))):
      if name not in FLAGS.sides:
        continue
      start = time.perf_counter()
      verdicts[name].append(run())
      seconds[name].append(time.perf_counter() - start)
      robust = np.mean([v is None for v in verdicts[name][-1]])
      print(f"seed {seed} {name}: robust {100 * robust:.1f}% in {seconds[name][-1]:.0f} s",
            flush=True)
    write_result(verdicts, seconds, clean, y, logit_gap)  # after every seed: partial results
  print(write_result(verdicts, seconds, clean, y, logit_gap)["markdown"])


def write_result(verdicts, seconds, clean, y, logit_gap) -> dict:
  """The summary and every verdict so far, written to --out as JSON; returns them."""
  seeds = {side: len(v) for side, v in verdicts.items()}
  timing = speed(seconds, FLAGS.images)
  summary = (summarize(verdicts["ours"], verdicts["reference"], clean)
             if min(seeds.values()) else None)  # one side only: merge with the other's run
  setting = (f"{FLAGS.checkpoint}, eps {FLAGS.eps:g}/255, {FLAGS.images} test images, "
             f"{seeds['ours']} seeds ours, {seeds['reference']} reference, APGD/FAB {FLAGS.apgd_steps} iterations, Square "
             f"{FLAGS.square_queries} queries, reference budgets: {FLAGS.reference}")
  result = {"setting": setting, "checkpoint": FLAGS.checkpoint, "eps": FLAGS.eps,
            "images": FLAGS.images, "seeds": seeds, "reference": FLAGS.reference,
            "apgd_steps": FLAGS.apgd_steps, "square_queries": FLAGS.square_queries,
            "max_logit_gap": logit_gap, "seconds": seconds, "speed": timing,
            "environment": ENVIRONMENT, "summary": summary, "labels": y.tolist(),
            "verdicts": verdicts,
            "markdown": markdown(summary, setting, timing, ENVIRONMENT) if summary else ""}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  app.run(main)
