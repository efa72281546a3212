r"""One call that evaluates a robust CIFAR model and writes a RobustBench-format entry.

    import cas_jax
    entry, report = cas_jax.benchmark("Carmon2019Unlabeled.pt", arch="wrn",
                                      arch_options={"depth": 28, "widen_factor": 10, "cas_stages": ()},
                                      n_examples=10000, threat_model="Linf", eps="8/255",
                                      out_dir="runs/carmon", cifar_dir="data/cifar-10-batches-py")
    entry["autoattack_acc"], entry["worst_case_acc"]      # '59.53', '58.91' (percent strings)
    entry, report = cas_jax.benchmark(apply_fn, n_examples=1000, eps=8/255)  # a model function

    cas-jax-benchmark --torch-checkpoint model.pt --arch wrn --arch-option depth=28 \
        --threat-model Linf --eps 8/255 --n-examples 10000 --out runs/carmon

The model is a PyTorch checkpoint (a path, loaded by `interop.load_torch_checkpoint` for one of
`models.NAMES`) or a function of NHWC images in [0, 1] returning logits or (logits, cas_logits),
in evaluation mode. It is judged by the robustness report (`evaluate.robustness_report`: the
default attacks, the per-image worst case, the sanity report, every local device, resumable in
out_dir/state) on the first n_examples images of the test split, in order. The entry follows
RobustBench's `model_info/<dataset>/<threat_model>/<model>.json`: accuracies as percent strings
rounded to 2 decimals, eps as RobustBench writes it ("8/255", "0.5"), `number_forward_passes` the
forward passes one prediction takes (1; RobustBench's >1 marks ensembles and randomized models);
then ours: `worst_case_acc`, the sanity warnings, the budget and the evaluation's cost in model
rows from the report's cost table (docs/benchmark.md).
"""
import ast
import dataclasses
import json
import os
from typing import Any, Dict, NamedTuple, Optional, Union

import jax
import numpy as np

from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax import models
from cas_jax import provenance
from cas_jax.attacks import engine
from cas_jax.evaluation import attack_registry
from cas_jax.evaluation import evaluate
from cas_jax.evaluation import report as report_lib
from cas_jax.evaluation.attack_registry import AttackBudget
from cas_jax.models import interop

# RobustBench's threat-model names -> our norms; its corruptions boards have no adversary.
THREAT_MODELS = {"Linf": "linf", "L2": "l2"}
UNSUPPORTED_THREAT_MODELS = ("corruptions", "corruptions_3d")
DATASETS = ("cifar10", "cifar100")
IMAGE_SHAPE = (32, 32, 3)
# The AutoAttack budget a RobustBench figure is computed with (AttackBudget's defaults).
AUTOATTACK_BUDGET = ("apgd_steps", "fab_steps", "square_queries", "target_classes")
# RobustBench's architecture names (its `architecture` field); {field} reads the built module.
ARCHITECTURES = {
    "resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
    "preact_resnet18": "PreActResNet-18", "preact_resnet34": "PreActResNet-34",
    "dm_preact_resnet": "PreActResNet-{depth}",
    "wrn34_10": "WideResNet-34-10", "wrn": "WideResNet-{depth}-{widen_factor}",
    "wide_resnet": "WideResNet-{depth}-{widen_factor}",
    "dm_wide_resnet": "WideResNet-{depth}-{widen_factor}", "vgg16": "VGG16-BN",
}
ENTRY_FILE, REPORT_FILE = "robustbench.json", "report"


class Benchmark(NamedTuple):
  """The RobustBench-format entry (a JSON-ready dict) and the full robustness report."""
  entry: Dict[str, Any]
  report: report_lib.Report


def threat_norm(threat_model: Optional[str], eps) -> str:
  """Our norm for RobustBench's threat-model name (Linf, L2; any case), or one UserError line."""
  if threat_model is None:
    if eps is not None:
      raise errors.UserError(f"eps={eps} given without a threat model; add threat_model='Linf' "
                             "or 'L2' (--threat-model Linf)")
    raise errors.UserError("no threat model; choose threat_model='Linf' or 'L2' and its eps")
  names = {name.lower(): name for name in THREAT_MODELS}
  name = names.get(str(threat_model).lower())
  if name is None:
    unsupported = str(threat_model).lower() in UNSUPPORTED_THREAT_MODELS
    why = ("has no adversary to attack (common corruptions): not supported" if unsupported
           else "is unknown")
    raise errors.UserError(f"threat model {threat_model!r} {why}; choose one of "
                           f"{', '.join(THREAT_MODELS)}")
  return THREAT_MODELS[name]


def parse_eps(eps, norm: str) -> float:
  """eps as a float from a number or a string such as '8/255' or '0.0313725', range-checked."""
  if eps is None:
    raise errors.UserError("no eps; give the threat model's radius, e.g. eps=8/255 for Linf or "
                           "0.5 for L2 (RobustBench's CIFAR boards)")
  value = eps
  if isinstance(eps, str):
    numerator, slash, denominator = eps.strip().partition("/")
    try:
      value = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
      raise errors.UserError(f"eps={eps!r} is not a number; write e.g. 8/255 or 0.0313725"
                             ) from None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise errors.UserError(f"eps={eps!r} is not a number; write e.g. 8/255 or 0.0313725")
  value = float(value)
  attack_registry.check_eps(value, norm, dim=int(np.prod(IMAGE_SHAPE)))
  return value


def parse_arch_options(pairs) -> Dict[str, Any]:
  """{'depth': 28, 'activation': 'swish', 'cas_stages': ()} from ['depth=28', ...]: Python
  literals where they parse (numbers, True, tuples), plain strings otherwise."""
  options = {}
  for pair in pairs or ():
    key, equals, text = str(pair).partition("=")
    if not equals or not key.strip():
      raise errors.UserError(f"architecture option {pair!r} is not KEY=VALUE; e.g. depth=28")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    options[key.strip()] = value
  return options


def architecture_name(arch: str, num_classes: int, **options) -> str:
  """RobustBench's name of models.create(arch, ...) ('WideResNet-28-10'), else arch(options)."""
  model = models.create(arch, num_classes=num_classes, **options)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
  if "stage_sizes" in fields and "depth" not in fields:  # a pre-activation ResNet: 2 convs a block
    fields["depth"] = 2 * sum(fields["stage_sizes"]) + 2
  try:
    name = ARCHITECTURES[arch].format(**fields)
  except (KeyError, IndexError):
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{arch}({shown})" if shown else arch
  if arch.startswith(("resnet", "vgg")) and fields.get("width", 64) != 64:
    name += f" (width {fields['width']})"
  return name


def _percent(fraction: float) -> str:
  """RobustBench's accuracy string: percent rounded to 2 decimals (`str(round(100 a, 2))`)."""
  return str(round(100 * fraction, 2))


def _eps_string(eps: float, norm: str) -> str:
  """eps as RobustBench's entries write it: '8/255' under Linf, '0.5' under L2."""
  return attack_registry.eps_text(eps, "linf") if norm == "linf" else f"{eps:g}"


def _checkpoint_model(path, arch: Optional[str], options: Dict[str, Any], num_classes: int):
  """(apply_fn, architecture name) of a PyTorch checkpoint of `arch`."""
  if not arch:
    raise errors.UserError(f"a checkpoint needs its architecture: arch= (--arch) one of "
                           f"{', '.join(models.NAMES)}")
  if arch not in models.NAMES:
    raise errors.UserError(f"unknown architecture {arch!r}; valid: {', '.join(models.NAMES)}")
  name = architecture_name(arch, num_classes, **options)  # checks the options before loading
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist; pass the .pt/.pth file's path")
  variables = interop.load_torch_checkpoint(arch, path, num_classes=num_classes, **options)
  model = models.create(arch, num_classes=num_classes, **options)
  return evaluate.bind_model(model, variables), name


def _check_model(apply_fn, x: np.ndarray, num_classes: int, dataset: str) -> str:
  """The logits' dtype; one UserError line for a model function that does not fit the benchmark:
  the wrong class count, updated variables returned, logits that are not finite, rows that
  depend on their batch (training mode)."""
  apply_fn = engine.as_partial(apply_fn)  # one compiled forward pass, not one op at a time
  outputs = jax.eval_shape(apply_fn, x[:2])
  if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and isinstance(outputs[1], dict):
    raise errors.UserError("the model function returns (outputs, updated variables): it runs in "
                           "training mode; apply with train=False and without mutable=")
  logits = engine.split_outputs(outputs)[0]
  if logits.shape[-1] != num_classes:
    raise errors.UserError(f"the model has {logits.shape[-1]} outputs but {dataset} has "
                           f"{num_classes} classes; pass the {dataset} model or the right dataset")
  # The same first image beside two different images: a model in evaluation mode gives it the
  # same logits; BatchNorm on batch statistics (training mode) does not.
  partner = x[1:2] if len(x) > 1 else 1 - x[:1]
  first, second = (np.asarray(engine.main_logits(apply_fn, np.concatenate([x[:1], p])))[0]
                   for p in (partner, 1 - partner))
  if not (np.all(np.isfinite(first)) and np.all(np.isfinite(second))):
    raise errors.UserError("the model's logits are not finite (NaN or inf): its weights diverged "
                           "or do not fit its architecture; check the checkpoint in PyTorch")
  if not np.allclose(first, second, rtol=1e-4, atol=1e-4 * (1 + np.abs(first).max())):
    raise errors.UserError("the model's logits for an image depend on the other images of its "
                           "batch: it runs in training mode (BatchNorm on batch statistics); "
                           "pass a function in evaluation mode, e.g. apply(..., train=False)")
  return str(logits.dtype)


def _entry(report: report_lib.Report, *, dataset: str, threat_model: str, eps: float,
           norm: str, architecture: Optional[str], budget: AttackBudget) -> Dict[str, Any]:
  """The RobustBench-format entry of a finished report (docs/benchmark.md lists the fields)."""
  autoattack = [name for name, info in report.attacks.items()
                if info["method"] == "aa" and not info["joint"] and info["in_worst_case"]]
  total = report.costs["total"]
  return {
      "dataset": dataset, "threat_model": threat_model, "eps": _eps_string(eps, norm),
      "architecture": architecture, "number_forward_passes": max(report.draws, 1),
      "n_examples": report.num_images,
      "clean_acc": _percent(report.accuracy(report_lib.NATURAL)),
      "autoattack_acc": _percent(report.accuracy(autoattack[0])),
      "worst_case_acc": _percent(report.accuracy(report_lib.WORST_CASE)),
      "autoattack_exact": report.is_exact(autoattack[0]),
      "sanity_warnings": list(report.sanity),
      "attacks": [name for name, info in report.attacks.items() if info["in_worst_case"]],
      "budget": {name: getattr(budget, name) for name in AUTOATTACK_BUDGET},
      "standard_budget": all(getattr(budget, n) == getattr(AttackBudget(), n)
                             for n in AUTOATTACK_BUDGET),
      "evaluation_forward_passes": int(total["rows"]),
      "evaluation_backward_passes": int(total["gradient_rows"]),
  }


def benchmark(model: Union[str, os.PathLike, Any], n_examples: int = 10000,
              dataset: str = "cifar10", threat_model: Optional[str] = "Linf", eps=None, *,
              arch: Optional[str] = None, arch_options: Optional[Dict[str, Any]] = None,
              architecture: Optional[str] = None, out_dir: Optional[str] = None,
              cifar_dir: Optional[str] = None, tfds_data_dir: Optional[str] = None,
              attacks="default", budget: Optional[AttackBudget] = None, batch_size: int = 256,
              seed: int = 0, progress: bool = False) -> Benchmark:
  """The worst-case report and RobustBench entry of a checkpoint or model function (see above)."""
  norm = threat_norm(threat_model, eps)
  threat_model = next(name for name, ours in THREAT_MODELS.items() if ours == norm)
  eps = parse_eps(eps, norm)
  if dataset not in DATASETS:
    raise errors.UserError(f"dataset {dataset!r} is not supported; choose one of "
                           f"{', '.join(DATASETS)}")
  if isinstance(n_examples, bool) or not isinstance(n_examples, (int, np.integer)) or (
      n_examples < 1):
    raise errors.UserError(f"n_examples={n_examples!r} must be a positive integer, e.g. 10000")
  budget = budget or AttackBudget()
  # Every name that could parse (has_cas: cas-head too); AutoAttack on the logits among them.
  specs, _ = attack_registry.parse_attacks(attacks, eps=eps, has_cas=True, norm=norm)
  if not any(s.method == "aa" and not s.joint and s.in_threat(norm, eps) for s in specs):
    raise errors.UserError(f"attacks={attacks!r} lack AutoAttack at the threat model's eps, "
                           "which the entry's autoattack_acc needs; add 'aa'")
  num_classes = input_pipeline.NUM_CLASSES[dataset]
  checkpoint = isinstance(model, (str, os.PathLike))
  if checkpoint:
    apply_fn, name = _checkpoint_model(os.fspath(model), arch, dict(arch_options or {}),
                                       num_classes)
    architecture = architecture or name
  elif callable(model):
    if arch or arch_options:
      raise errors.UserError("arch and arch_options describe a checkpoint; a model function "
                             "needs neither (name it with architecture=)")
    apply_fn = model
  else:
    raise errors.UserError(f"model is a {type(model).__name__}; pass a checkpoint path or a "
                           "model function of images in [0, 1]")
  images, labels = input_pipeline.load_test_split(dataset, int(n_examples), cifar_dir,
                                                  tfds_data_dir)
  x = images.astype(np.float32) / np.float32(255)
  dtype = _check_model(apply_fn, x, num_classes, dataset)
  title = (f"{architecture or 'Model'}: the first {len(labels)} {dataset} test images, "
           f"{threat_model} eps {_eps_string(eps, norm)}")
  report = evaluate.robustness_report(
      apply_fn, x, labels, key=jax.random.key(seed), eps=eps, norm=norm, attacks=attacks,
      budget=budget, batch_size=batch_size, title=title, progress=progress,
      state_dir=os.path.join(out_dir, "state") if out_dir else None)
  function = getattr(model, "func", model)  # a Partial's function
  record = {**provenance.provenance(), "dtype": dtype, "benchmark": {
      "model": os.fspath(model) if checkpoint else getattr(function, "__qualname__", "?"),
      "arch": arch, "arch_options": arch_options, "dataset": dataset,
      "data": cifar_dir or f"tfds {tfds_data_dir or ''}".strip(), "seed": seed}}
  report.provenance = json.loads(json.dumps(record, default=str))
  report.provenance_line = provenance.summary_line(report.provenance)
  entry = _entry(report, dataset=dataset, threat_model=threat_model, eps=eps, norm=norm,
                 architecture=architecture, budget=budget)
  if out_dir and jax.process_index() == 0:
    write(Benchmark(entry, report), out_dir)
  return Benchmark(entry, report)


def write(result: Benchmark, out_dir: str) -> Dict[str, str]:
  """Write out_dir/report.md, report.json and robustbench.json; their paths by kind."""
  os.makedirs(out_dir, exist_ok=True)
  markdown, report = result.report.write(os.path.join(out_dir, REPORT_FILE))
  entry = os.path.join(out_dir, ENTRY_FILE)
  with open(entry, "w") as f:
    f.write(json.dumps(result.entry, indent=2) + "\n")
  return {"markdown": markdown, "report": report, "entry": entry}
