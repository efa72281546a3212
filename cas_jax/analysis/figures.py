"""Files of `analysis.analyze_workdir`: the figures (matplotlib, Agg), their numbers, summary.md."""
import json
import os
from typing import Any, Dict

import numpy as np

from cas_jax.evaluation import report as report_lib

Results = Dict[str, Dict[str, Any]]  # model label -> analysis.analyze_model's result
KINDS = ("natural", "adversarial")
COLORS = {"natural": "tab:blue", "adversarial": "tab:red"}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _grid(rows: int, cols: int, width: float = 4.5, height: float = 3.2):
  plt = _pyplot()
  figure, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  return plt, figure, axes


def _sorted_bars(axis, natural: np.ndarray, adversarial: np.ndarray, ylabel: str) -> None:
  """Both series as bars over the channels, sorted by the natural values (descending)."""
  order = np.argsort(-natural, kind="stable")
  channels = np.arange(natural.size)
  axis.bar(channels, natural[order], width=1.0, color=COLORS["natural"], alpha=0.6,
           label="natural")
  axis.bar(channels, adversarial[order], width=1.0, color=COLORS["adversarial"], alpha=0.45,
           label="adversarial (PGD)")
  axis.set_xlabel("channel (sorted by the natural value)")
  axis.set_ylabel(ylabel)
  axis.set_xlim(-0.5, natural.size - 0.5)
  axis.legend(fontsize=7)


def _save(plt, figure, path: str) -> None:
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1)


def write_magnitude(out_dir: str, results: Results) -> None:
  """Fig. 1: mean |activation| per channel, natural vs adversarial, one panel per model."""
  plt, figure, axes = _grid(1, len(results))
  for axis, (label, result) in zip(axes[0], results.items()):
    _sorted_bars(axis, result["natural"]["magnitude"], result["adversarial"]["magnitude"],
                 "mean |activation|")
    axis.set_title(f"{label}: channel magnitude", fontsize=9)
  _save(plt, figure, os.path.join(out_dir, "magnitude.png"))
  _write_json(os.path.join(out_dir, "magnitude.json"), {
      "what": "mean over the images of |penultimate feature|, per channel (channel order)",
      "models": {label: {k: r[k]["magnitude"].tolist() for k in KINDS}
                 for label, r in results.items()}})


def write_frequency(out_dir: str, results: Results, class_index: int, thresholds) -> str:
  """Fig. 2 / 10: per-channel activation counts on one class, one panel per model x threshold."""
  plt, figure, axes = _grid(len(results), len(thresholds))
  for row, (label, result) in zip(axes, results.items()):
    for axis, threshold in zip(row, thresholds):
      _sorted_bars(axis, result["natural"]["frequency"][str(threshold)],
                   result["adversarial"]["frequency"][str(threshold)], "activation count")
      axis.set_title(f"{label}: class {class_index}, threshold {threshold:g}", fontsize=9)
  name = f"frequency_class{class_index}"
  _save(plt, figure, os.path.join(out_dir, f"{name}.png"))
  count = int(np.sum(next(iter(results.values()))["labels"] == class_index))
  _write_json(os.path.join(out_dir, f"{name}.json"), {
      "what": "per channel, the number of the class's images whose feature exceeds threshold x "
              "that image's largest channel value (channel order)",
      "class_index": class_index, "class_images": count, "thresholds": list(thresholds),
      "models": {label: {str(t): {k: r[k]["frequency"][str(t)].tolist() for k in KINDS}
                         for t in thresholds} for label, r in results.items()}})
  return name


def write_tsne(out_dir: str, results: Results) -> None:
  """Fig. 9: t-SNE of natural and of adversarial features, colored by true class."""
  plt, figure, axes = _grid(len(results), 2, width=4.6, height=4.0)
  arrays = {}
  for row, (label, result) in zip(axes, results.items()):
    for axis, kind in zip(row, KINDS):
      embedded = result[kind]["tsne"]
      classes = result["labels"][:len(embedded)]
      points = axis.scatter(embedded[:, 0], embedded[:, 1], c=classes, cmap="tab10", s=4,
                            vmin=0, vmax=9)
      if kind == KINDS[-1]:
        axis.legend(*points.legend_elements(), title="true class", fontsize=6,
                    title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
      axis.set_title(f"{label}: {kind}", fontsize=9)
      axis.set_xticks([])
      axis.set_yticks([])
      arrays[f"{label}/{kind}"] = embedded
      arrays["labels"] = classes
  _save(plt, figure, os.path.join(out_dir, "tsne.png"))
  np.savez(os.path.join(out_dir, "tsne.npz"), **arrays)


def _summary(results: Results, numbers: Dict[str, Any], config, count: int, dataset_name: str,
             frequency: str) -> str:
  evaluation, settings = config.eval, config.analysis
  steps = f"step {evaluation.step_size:.4g}" if evaluation.step_size else "step eps/10"
  lines = [
      "# Channel-wise activation analysis", "",
      *[f"- Model `{label}`: {r['where']}" for label, r in results.items()],
      f"- Images: the first {count} test images of {dataset_name} "
      f"({int(np.sum(next(iter(results.values()))['labels'] == settings.class_index))} of "
      f"class {settings.class_index})",
      f"- Attack: PGD-{evaluation.steps} on `{evaluation.loss}` (beta {config.loss.beta:g}; "
      f"adaptive for CAS models), eps {report_lib.format_eps(evaluation.eps)}, {steps}, "
      f"uniform random start, evaluation mode",
      "- Features: the input of the final classifier (after CAS suppression)", "",
      "| model | natural acc (%) | PGD acc (%) | mean magnitude, natural | adversarial | "
      "class separation, natural | adversarial |",
      "|---|---|---|---|---|---|---|"]
  for label, model in numbers["models"].items():
    nat, adv = model["natural"], model["adversarial"]
    lines.append(f"| {label} | {100 * nat['accuracy']:.1f} | {100 * adv['accuracy']:.1f} | "
                 f"{nat['mean_magnitude']:.4g} | {adv['mean_magnitude']:.4g} | "
                 f"{nat['separation']:.3f} | {adv['separation']:.3f} |")
  lines += ["", f"Activation frequency on class {settings.class_index} (mean over channels of "
            "the fraction of the class's images activating the channel; gap = mean |adversarial "
            "- natural|):", "", "| model | threshold | natural | adversarial | gap |",
            "|---|---|---|---|---|"]
  for label, model in numbers["models"].items():
    for t in settings.thresholds:
      nat, adv = (model[k]["mean_frequency"][str(t)] for k in KINDS)
      lines.append(f"| {label} | {t:g} | {nat:.3f} | {adv:.3f} | "
                   f"{model['frequency_gap'][str(t)]:.3f} |")
  lines += ["", "Class separation: the silhouette score of the features grouped by true class "
            "(-1..1, higher: classes more compact and further apart; Fig. 9's claim, measured "
            "on the features, not on the t-SNE embedding).",
            "", "Files: `magnitude.png`/`.json` (Fig. 1), "
            f"`{frequency}.png`/`.json` (Fig. 2 at the thresholds of Fig. 10), "
            "`tsne.png`/`.npz` (Fig. 9, first "
            f"{len(next(iter(results.values()))['natural']['tsne'])} images), `features.npz`.", ""]
  return "\n".join(lines)


def write_all(out_dir: str, results: Results, config, count: int, dataset_name: str) -> None:
  """Every figure, its numbers, the features and summary.md into out_dir."""
  settings = config.analysis
  write_magnitude(out_dir, results)
  frequency = write_frequency(out_dir, results, settings.class_index, tuple(settings.thresholds))
  write_tsne(out_dir, results)
  features = {f"{label}/{k}": r[k]["features"] for label, r in results.items() for k in KINDS}
  np.savez(os.path.join(out_dir, "features.npz"), labels=next(iter(results.values()))["labels"],
           **features)
  numbers = summary_numbers(results, config)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(_summary(results, numbers, config, count, dataset_name, frequency))
  _write_json(os.path.join(out_dir, "summary.json"), numbers)


def summary_numbers(results: Results, config) -> Dict[str, Any]:
  """summary.md's numbers per model and kind: accuracy, mean magnitude, frequency, separation."""
  settings = config.analysis
  models = {}
  for label, r in results.items():
    class_count = max(1, int(np.sum(r["labels"] == settings.class_index)))
    models[label] = {"where": r["where"], **{kind: {
        "accuracy": r[kind]["accuracy"], "mean_magnitude": float(r[kind]["magnitude"].mean()),
        "mean_frequency": {str(t): float(r[kind]["frequency"][str(t)].mean() / class_count)
                           for t in settings.thresholds},
        "separation": r[kind]["separation"]} for kind in KINDS}}
    for t in settings.thresholds:  # the natural/adversarial frequency gap of summary.md
      nat, adv = (r[k]["frequency"][str(t)] / class_count for k in KINDS)
      models[label].setdefault("frequency_gap", {})[str(t)] = float(np.abs(adv - nat).mean())
  images = len(next(iter(results.values()))["labels"])
  return {"class_index": settings.class_index, "images": images, "models": models}
