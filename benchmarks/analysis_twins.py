"""The paper's channel analyses of a CAS row beside its twin without CAS, for every seed.

    python -m benchmarks.analysis_twins --workdir=runs/table3 --setting=at_cas --twin=at \
        --seeds=3 --out=benchmarks/results/analysis_table3_at

For each seed k it runs what `cas-jax --mode=analyze` runs on W/<setting>/seed<k> with
`--config.analysis.compare=W/<twin>/seed<k> --config.analysis.compare_cas_stages=none` (the
config is the one the setting was trained with, its config.json), then writes OUT/summary.md:
per model and kind (natural, PGD) the accuracy, mean channel magnitude, mean activation
frequency and its natural/adversarial gap, and the class separation, as mean ± std over the
seeds, with every seed's analysis folder (figures included) copied under OUT/seed<k>/.
"""
import argparse
import json
import os
import shutil

import ml_collections
import numpy as np

from cas_jax.analysis import channels as analysis
from cas_jax import provenance
from cas_jax.configs import default


def analyze_seed(workdir: str, setting: str, twin: str, folder: str, num_images: int,
                 perplexity: float = 30.0) -> dict:
  """analysis.analyze_workdir of the setting's seed folder with its twin compared."""
  config = ml_collections.ConfigDict(provenance.read_config(os.path.join(workdir, setting,
                                                                         folder)))
  if "analysis" not in config:  # a config without the section (e.g. smoke): the defaults
    config.analysis = default.get_config().analysis
  config.analysis.compare = os.path.join(workdir, twin, folder)
  config.analysis.compare_cas_stages = "none"
  config.analysis.num_images = num_images
  config.analysis.tsne_perplexity = min(config.analysis.tsne_perplexity, perplexity)
  target = os.path.join(workdir, setting, folder)
  analysis.analyze_workdir(config, target)
  with open(os.path.join(target, "analysis", "summary.json")) as f:
    return json.load(f)


def _cell(values, digits: int = 3) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.{digits}f}" if len(values) == 1 else (
      f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}")


def summary_markdown(summaries: list, setting: str, twin: str, command: str) -> str:
  """One table over seeds: each statistic of each model, natural and adversarial."""
  threshold = "0.01"
  rows = []
  for name in (setting, twin):
    per_seed = [next(v for k, v in s["models"].items() if k.split("/")[0] == name)
                for s in summaries]
    for kind in ("natural", "adversarial"):
      rows.append([name, kind,
                   _cell([100 * m[kind]["accuracy"] for m in per_seed], 1),
                   _cell([m[kind]["mean_magnitude"] for m in per_seed], 4),
                   _cell([m[kind]["mean_frequency"][threshold] for m in per_seed]),
                   _cell([m[kind]["separation"] for m in per_seed])])
    rows.append([name, "gap", "", _cell([m["adversarial"]["mean_magnitude"]
                                         - m["natural"]["mean_magnitude"] for m in per_seed], 4),
                 _cell([m["frequency_gap"][threshold] for m in per_seed]), ""])
  lines = [f"# Channel analyses: {setting} beside {twin}, {len(summaries)} seeds", "",
           f"`{command}`", "",
           f"{summaries[0]['images']} test images and their adaptive PGD-20 adversaries; "
           f"class {summaries[0]['class_index']} for the activation frequency (threshold "
           f"{threshold}: the fraction of the class's images whose feature exceeds 1% of the "
           "image's largest channel, averaged over channels). Gap rows: adversarial minus "
           "natural magnitude, and mean |adversarial - natural| frequency. Separation: "
           "silhouette of the features by true class. Mean ± std over seeds.", "",
           "| model | images | accuracy (%) | mean magnitude | mean frequency | separation |",
           "|---|---|---|---|---|---|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def main() -> None:
  """Analyze every seed of a setting and its twin; write OUT/summary.md and the seed folders."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--setting", default="at_cas")
  parser.add_argument("--twin", default="at")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--num_images", type=int, default=0, help="0 = the whole test set")
  parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE's (at most)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  folders = [f"seed{k}" for k in range(args.seeds)] if args.seeds > 1 else ["."]
  summaries = []
  for folder in folders:
    summaries.append(analyze_seed(args.workdir, args.setting, args.twin, folder, args.num_images,
                                  args.perplexity))
    target = os.path.join(args.out, folder)
    shutil.copytree(os.path.join(args.workdir, args.setting, folder, "analysis"), target,
                    dirs_exist_ok=True, ignore=shutil.ignore_patterns("features.npz"))
  command = (f"python -m benchmarks.analysis_twins --workdir={args.workdir} --setting="
             f"{args.setting} --twin={args.twin} --seeds={args.seeds} --out={args.out}")
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary_markdown(summaries, args.setting, args.twin, command))
  print(f"Wrote {os.path.join(args.out, 'summary.md')}")


if __name__ == "__main__":
  main()
