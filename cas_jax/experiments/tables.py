"""The outputs of an experiment (cas_jax/experiments/driver.py): W/NAME.md, W/NAME.json and the beta plot.

    write_outputs(result, workdir, plot_beta=True)   # result: experiments.run_experiment's dict
    python -m cas_jax.experiments.tables --rewrite W/NAME.json   # new statistics, no retraining

A result holds one row per (setting, checkpoint) with every attack's accuracy (the mean over
seeds, each seed kept in row["per_seed"]), the per-image verdicts of every seed, the worst
case, the paper's figures where known and the setting's training and evaluation times.
Each row with a twin is compared with it by cas_jax/experiments/statistics.py (hierarchical
bootstrap CI, seed-level t-test, exact McNemar per seed) under every attack and the worst case,
with Holm's correction over the table's comparisons. --rewrite recomputes them from a stored
JSON (its per-image verdicts) and rewrites it and the .md beside it, every other field kept.
"""
import argparse
import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from cas_jax import errors
from cas_jax.evaluation import report as report_lib
from cas_jax.experiments import statistics

PAPER_ATTACKS = ("fgsm", "pgd20", "cw")  # the paper's white-box columns, in its order
WORST = report_lib.WORST_CASE


def attack_columns(rows: List[dict]) -> List[str]:
  """natural, the paper's attacks, every other attack (first seen first), then the worst case."""
  seen = []
  for row in rows:
    seen += [n for n in row["accuracy"] if n not in seen and n not in (report_lib.NATURAL, WORST)]
  ordered = [n for n in PAPER_ATTACKS if n in seen] + [n for n in seen if n not in PAPER_ATTACKS]
  return [report_lib.NATURAL, *ordered, WORST]


def _points(row: dict, name: str) -> float:
  return 100 * row["accuracy"][name]


def twin_pairs(rows: List[dict]) -> Iterator[Tuple[dict, dict, List[str]]]:
  """(row, its twin at the same checkpoint, the columns both have) of every row with a twin."""
  by_key = {(r["setting"], r["checkpoint"]): r for r in rows}
  for row in rows:
    twin = by_key.get((row["twin"], row["checkpoint"]))
    if twin is not None:
      yield row, twin, [n for n in attack_columns([row]) if n in twin["accuracy"]]


def twin_comparisons(rows: List[dict]) -> List[str]:
  """One line per row with a twin (a CAS row's: the row without CAS): its gain per attack."""
  lines = []
  for row, twin, shared in twin_pairs(rows):
    gains = {n: _points(row, n) - _points(twin, n) for n in shared}
    paper = [n for n in PAPER_ATTACKS if n in gains]
    better = [n for n in paper if gains[n] > 0]
    verdict = ("all" if len(better) == len(paper) else "none" if not better
               else ", ".join(better) + " only")
    words = ", ".join(f"{n.replace('_', ' ')} {gains[n]:+.1f}" for n in shared)
    paper_words = (f"Better under the paper's attacks ({', '.join(paper)}): {verdict}; "
                   if paper else "")
    lines.append(
        f"{row['label']} vs {twin['label']} ({row['checkpoint']} checkpoint): {words} points. "
        f"{paper_words}{'under' if paper else 'Better under'} the worst case: "
        f"{'yes' if gains[WORST] > 0 else 'no'}.")
  return lines


def twin_statistics(rows: List[dict], resamples: int = statistics.RESAMPLES) -> List[dict]:
  """Each row against its twin per shared column, Holm-corrected over the table (JSON-ready)."""
  results = []
  for row, twin, names in twin_pairs(rows):
    for result in statistics.compare_rows(row, twin, names, resamples=resamples):
      results.append({"setting": row["setting"], "label": row["label"], "twin": twin["setting"],
                      "twin_label": twin["label"], "checkpoint": row["checkpoint"], **result})
  return statistics.holm_verdicts(results)


def _current(stats: Optional[List[dict]]) -> bool:
  """Whether stored statistics have today's fields (older JSON: recompute, never reuse)."""
  return stats is not None and all("holm_p" in s and "t_p" in s for s in stats)


def statistics_lines(results: List[dict]) -> List[str]:
  """The markdown section of the paired statistics: one sentence per row, twin and attack."""
  if not results:
    return []
  first = results[0]
  seeds, images, tests = first["seeds"], first["images"], first["holm_tests"]
  resampling = (f"{first['resamples']:,} resamples of the {seeds} seeds with replacement, then "
                f"of the {images} images with replacement within each resampled seed, the same "
                "images for both models" if seeds > 1 else
                f"{first['resamples']:,} paired resamples of the {images} images")
  verdict = (f"the larger of two p-values, the paired t-test's over the {seeds} per-seed "
             "differences (shown with its 95% t interval) and the bootstrap's two-sided tail, "
             "Holm-adjusted" if seeds > 1 else
             "one seed, so no seed-level test: the bootstrap's two-sided tail, Holm-adjusted")
  lines = ["## Is the difference significant? (hierarchical bootstrap, seed-level t-test, Holm)",
           "",
           f"Difference of accuracy, row minus twin, on the same images. Interval: 95% "
           f"bootstrap, {resampling}. Verdict: {verdict} over the {tests} comparisons of this "
           "table that get one; significant at 5% = adjusted p <= 0.05. An attack shown as "
           "`<= x` ran only on the images earlier attacks left standing: upper bounds, no "
           "verdict, not counted. McNemar: exact binomial test per seed on the images only "
           "one of the two gets right (one trained pair each).", "",
           f"Scope: conditional on these {images} evaluation images and the {seeds} "
           f"seed{'s' * (seeds > 1)} trained. The population is retraining the same settings "
           "(data, width, epochs, attack budgets) with another seed and evaluating on these "
           "images"
           + (f"; {seeds} seeds say little about the seed-to-seed spread, and the bootstrap, "
              "which takes them for all the seeds there are, understates it." if seeds > 1 else
              "; one seed says nothing about another."), ""]
  for result in results:
    lines.append(f"- ({result['checkpoint']} checkpoint) " + statistics.sentence(
        result["label"], result["twin_label"], result["name"], result))
  return lines + [""]


def provenance_lines(rows: List[dict]) -> List[str]:
  """Where the reports were made: one line if every report shares its provenance, else each
  distinct provenance with the rows (and seeds) it made."""
  made_by: Dict[str, List[str]] = {}
  for row in rows:
    for seed in row.get("per_seed", []):
      if seed.get("evaluated_by"):
        where = f"{row['label']} ({row['checkpoint']}, seed {seed['seed']})"
        made_by.setdefault(seed["evaluated_by"], []).append(where)
  if not made_by:
    return []
  if len(made_by) == 1:
    return ["## Provenance of the reports", "", f"Every report: {next(iter(made_by))}", ""]
  lines = ["## Provenance of the reports", "",
           "The reports were not all made by the same code, libraries or devices:", ""]
  return lines + [f"- {line} {', '.join(where)}." for line, where in made_by.items()] + [""]


def markdown(result: dict) -> str:
  """The experiment's table, its CAS-vs-twin lines, the paper's figures and the sanity reports."""
  rows = result["rows"]
  columns = attack_columns(rows)
  first = rows[0]
  lines = [f"# {result['experiment']}: {result['title']}", ""]
  if result.get("command"):
    lines += [f"`{result['command']}` on {result['devices']}.", ""]
  source = result.get("source")
  if source:
    accuracy = ("natural accuracy not recorded" if source["natural_accuracy"] is None else
                f"{100 * source['natural_accuracy']:.1f}% natural accuracy on the first "
                f"{source['accuracy_images'] or 'all'} test images")
    lines += [f"Transfer source: {source['label']}, `{source['model']}` width "
              f"{source['width'] or 'full'}, {source['epochs']} epochs in `{source['workdir']}` "
              f"({accuracy}); the transfer examples are crafted on it, then shown to each row.",
              ""]
  lines += [
      f"{first['num_images']} test images, eps "
      f"{report_lib.format_eps(first['eps'], first.get('norm', 'linf'))}; white-box "
      "attacks on CAS models are adaptive (joint loss of the main and CAS heads). The worst "
      "case counts an image as robust only if it is correct and every attack at that eps "
      "failed on it. `<= x`: an upper bound (the attack ran only on the images that earlier "
      "attacks left standing). Accuracy in %"
      + (f", mean ± standard deviation over {result['seeds']} seeds (every seed in the JSON)"
         if result.get("seeds", 1) > 1 else "")
      + "; train: summed epoch times of metrics.jsonl (all seeds).", "",
      "| setting | checkpoint | " + " | ".join(c.replace("_", " ") for c in columns)
      + " | epochs | train (s) | eval (s) |",
      "|---|---|" + "---|" * (len(columns) + 3)]
  for row in rows:
    cells = [row["figure"].get(c, "-") for c in columns]
    cells[-1] = f"**{cells[-1]}**"
    lines.append(f"| {row['label']} | {row['checkpoint']} | " + " | ".join(cells)
                 + f" | {row['epochs']} | {row['train_seconds']:.0f} | {row['eval_seconds']:.0f} |")
  descriptions = {}
  for row in rows:
    descriptions.update(row["descriptions"])
  lines += ["", "Attacks: " + "; ".join(f"{n}: {d}" for n, d in descriptions.items()) + "."]
  if any("aa-joint" not in r["accuracy"] for r in rows) and "aa-joint" in columns:
    lines.append("A model without CAS heads has no joint loss: its adaptive attacks are the "
                 "plain ones, and its `aa-joint` is its `aa` (shown as -).")
  lines.append("")
  comparisons = twin_comparisons(rows)
  if comparisons:
    lines += ["## Each row against its twin (CAS or a baseline against plain training; "
              "bfloat16 against float32)", ""] + [f"- {c}" for c in comparisons] + [""]
  stats = result.get("statistics")
  lines += statistics_lines(stats if _current(stats) else twin_statistics(rows))
  with_paper = [r for r in rows if r["paper"]]
  if with_paper:
    names = list(with_paper[0]["paper"])
    lines += ["## The paper's figures (last checkpoint, %)", "",
              "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {r['label']} | " + " | ".join(f"{r['paper'][n]:.2f}" for n in names) + " |"
              for r in with_paper]
    lines += ["", "The paper reports no worst case; settings without figures lost them in the "
              "paper text.", ""]
  lines += provenance_lines(rows)
  lines += ["## Sanity reports", ""]
  warnings = [f"- {r['label']} ({r['checkpoint']}): {w}" for r in rows for w in r["sanity"]]
  lines += warnings or ["- No warnings."]
  return "\n".join(lines) + "\n"


def plot_beta(result: dict, path: str) -> None:
  """Accuracy of every attack and of the worst case against beta (one panel per checkpoint)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result["rows"]
  labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
  figure, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
  for ax, label in zip(axes[0], labels):
    panel = sorted((r for r in rows if r["checkpoint"] == label), key=lambda r: r["beta"])
    positions = range(len(panel))  # betas 0..20: evenly spaced, labelled with their values
    for name in attack_columns(panel):
      style = {report_lib.NATURAL: dict(color="gray", linestyle=":"),
               WORST: dict(color="black", linewidth=2.5)}.get(name, {})
      # An upper bound ("<= x": the attack ran on the survivors of others) is not its accuracy.
      values = [_points(r, name) if name in r["accuracy"]
                and not r["figure"].get(name, "").startswith("<=") else float("nan")
                for r in panel]
      ax.plot(positions, values, marker="o", label=name.replace("_", " "), **style)
    ax.set_xticks(list(positions), [f"{r['beta']:g}" for r in panel])
    ax.set_xlabel("beta (CAS loss weight; 0 = AT without CAS)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result['experiment']}, {label} checkpoint, {panel[0]['num_images']} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _write(result: dict, base: str) -> Dict[str, str]:
  """BASE.md and BASE.json of the result, its statistics recomputed from the rows."""
  result["statistics"] = twin_statistics(result["rows"])  # never an older run's or format's
  paths = {"md": base + ".md", "json": base + ".json"}
  with open(paths["md"], "w") as f:
    f.write(markdown(result))
  with open(paths["json"], "w") as f:
    json.dump(result, f, indent=1)
  for path in paths.values():
    print(f"Wrote {path}", flush=True)
  return paths


def write_outputs(result: dict, workdir: str, plot_beta_png: bool = False) -> Dict[str, str]:
  """Write W/NAME.md and W/NAME.json (and W/NAME.png); return their paths by extension."""
  os.makedirs(workdir, exist_ok=True)
  base = os.path.join(workdir, result["experiment"])
  paths = _write(result, base)
  if plot_beta_png:
    paths["png"] = base + ".png"
    plot_beta(result, paths["png"])
    print(f"Wrote {paths['png']}", flush=True)
  return paths


def rewrite(json_path: str) -> Dict[str, str]:
  """Recompute the statistics of a stored W/NAME.json; rewrite it and the .md beside it."""
  if not json_path.endswith(".json"):
    raise errors.UserError(f"--rewrite takes a result's .json, got {json_path!r}")
  with open(json_path) as f:
    try:
      result = json.load(f)
    except json.JSONDecodeError as error:
      raise errors.UserError(f"{json_path} is not JSON ({error}); give a W/NAME.json that "
                             "cas-jax-experiments wrote") from None
  if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
    raise errors.UserError(f"{json_path} holds no experiment result (no 'rows'); give a "
                           "W/NAME.json that cas-jax-experiments wrote")
  return _write(result, json_path[:-len(".json")])


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`python -m cas_jax.experiments.tables --rewrite A.json [B.json ...]`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rewrite", nargs="+", required=True, metavar="PATH.json",
                      help="recompute the statistics of these results, rewrite .json and .md")
  args = parser.parse_args(argv)
  with errors.exit_on_user_error():
    for path in args.rewrite:
      rewrite(path)


if __name__ == "__main__":
  main(sys.argv[1:])
