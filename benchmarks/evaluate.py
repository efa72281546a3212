"""Images per second of evaluation attacks (PGD-20, AutoAttack) for any config; prints JSON.

  python -m benchmarks.evaluate --config=configs/cifar10_at_cas.py --images=512 --out=bench.json
  python -m benchmarks.evaluate --config=configs/smoke.py --attacks=pgd20,aa --checkpoint=/tmp/smoke

Each attack runs twice over the same images through `evaluate.robustness_report` (with
exact_per_attack=True, so it attacks every clean-correct image; `default` is the default
report, scheduled as --mode=eval runs it): the first run includes compilation, the second is
the steady-state figure. Each run's XLA compilations are counted per program with their
seconds (cas_jax/compilation.py), beside every unit's seconds in both runs. Random weights (the default) give labels
from the model's own predictions, so every image is attacked; AutoAttack's cost still depends
on how many images survive each stage, so time it on trained weights (--checkpoint) for
numbers that mean something.
"""
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from benchmarks import common
from cas_jax import compilation
from cas_jax.evaluation import evaluate
from cas_jax.evaluation import report as report_lib
from cas_jax import input_pipeline
from cas_jax.models import loading
from cas_jax import models

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.")
flags.DEFINE_integer("images", 256, "Images to attack.")
flags.DEFINE_string("attacks", "pgd20,aa", "Comma-separated attack names, timed one by one.")
flags.DEFINE_string("checkpoint", "", "A workdir (its latest checkpoint) or a .pth; '' = random.")
flags.DEFINE_enum("data", "random", ["random", "config"], "Uniform random images, or the "
                  "config's test set (with its labels when --checkpoint is given).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.mark_flags_as_required(["config"])


def main(_):
  """Time each attack of --attacks on --images images, after one compiling run."""
  config = FLAGS.config
  size, num_classes = config.data.image_size, config.data.num_classes
  if FLAGS.data == "config":
    dataset = input_pipeline.create_dataset(config)
    x = dataset.test_images[:FLAGS.images].astype(np.float32) / 255
    labels, num_classes = dataset.test_labels[:FLAGS.images], dataset.num_classes
  else:
    x = np.random.default_rng(0).random((FLAGS.images, size, size, 3), dtype=np.float32)
  model, variables = models.from_config(config, num_classes), None
  if FLAGS.checkpoint:  # a workdir's latest checkpoint or a .pth
    variables = loading.load(config, FLAGS.checkpoint, num_classes, x.shape[1:]).variables
  if variables is None:
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *x.shape[1:])), train=False))(
        jax.random.key(0, impl="rbg"))
  apply_fn = evaluate.bind_model(model, variables)
  if FLAGS.data == "random" or not FLAGS.checkpoint:
    labels = np.asarray(jnp.argmax(apply_fn(jnp.asarray(x))[0], -1), np.int32)
  budget = evaluate.budget_from_config(config.eval)
  results = []
  for name in [a.strip() for a in FLAGS.attacks.split(",") if a.strip()]:
    runs, compiled, stage_seconds = [], [], []
    for _ in range(2):
      start = time.perf_counter()
      with compilation.counted() as stats:
        report = evaluate.robustness_report(
            apply_fn, x, labels, key=jax.random.key(0), eps=config.eval.eps, attacks=name,
            beta=config.loss.beta, batch_size=config.eval_batch_size, budget=budget,
            exact_per_attack=name != "default")
      runs.append(time.perf_counter() - start)
      compiled.append(stats.as_dict())
      stage_seconds.append({n: c["seconds"] for n, c in report.costs["stages"].items()})
    # A unit's first-run seconds include its compilations; the second run's are the attack's.
    print(f"{name}: {compiled[0]['compilations']} compilations, {compiled[0]['compile_seconds']:.1f}"
          f" s compiling of {runs[0]:.1f} s; then {runs[1]:.1f} s with "
          f"{compiled[1]['compilations']} compilations", flush=True)
    for unit in stage_seconds[0]:
      print(f"  {unit}: {stage_seconds[0][unit]:.2f} s first, {stage_seconds[1][unit]:.2f} s "
            "steady", flush=True)
    spec_name = next(n for n in report.attacks)
    attacked = int(report.ran_on[spec_name].sum())
    results.append({
        "attack": name, "description": report.attacks[spec_name]["description"],
        "images": len(labels), "attacked": attacked,
        "natural_acc": report.accuracy("natural"), "robust_acc": report.accuracy(spec_name),
        "first_run_s": runs[0], "steady_s": runs[1],
        "images_per_s": len(labels) / runs[1], "attacked_per_s": attacked / runs[1],
        "rows": report.costs["total"]["rows"],
        "gradient_rows": report.costs["total"]["gradient_rows"],
        "first_run_compilations": compiled[0], "steady_run_compilations": compiled[1],
        "unit_seconds": {"first": stage_seconds[0], "steady": stage_seconds[1]},
        "stages": {name: {k: v for k, v in c.items() if k != "attacks"}
                   for name, c in report.costs["stages"].items()}})
    print("\n".join(report_lib.cost_table(report.costs)), flush=True)
    print(json.dumps(results[-1]), flush=True)
  summary = {**common.setup(config, config.eval_batch_size),
             "weights": FLAGS.checkpoint or "random", "budget": vars(budget), "results": results}
  common.report(summary, FLAGS.out)

if __name__ == "__main__":
  app.run(main)
