"""Paired statistics of two models' per-image verdicts: is a difference of robust accuracy noise?

    a, b = ...  # (seeds, images) bool: image i correct under the attack, model A / model B
    compare(a, b)  # {'difference', 'ci_low', 'ci_high', 'mcnemar_p', 'significant', ...}
    sentence("AT+CAS", "AT", "pgd20", compare(a, b))   # the markdown's words

Both arrays hold the same test images in the same order (image i of A is image i of B), one
row per seed (seed s of A against seed s of B). The difference is mean(A) - mean(B) over all
seeds and images. Its 95% confidence interval is a paired bootstrap over images: resample
the image indices with replacement, the same indices in every seed (seeds pooled), and take
the 2.5% and 97.5% percentiles of the resampled differences. The exact McNemar test of each
seed is a two-sided binomial test (p = 1/2) on the discordant images: those right for A only
against those right for B only. A difference is called significant at 5% when its interval
excludes 0.
"""
from typing import Any, Dict, List, Sequence

import numpy as np
from scipy import stats as scipy_stats

from cas_jax import errors

CONFIDENCE = 0.95
RESAMPLES = 10_000


def _paired(a, b) -> tuple:
  """a, b as (seeds, images) bool arrays of one shape; UserError naming the mismatch."""
  a, b = np.atleast_2d(np.asarray(a, bool)), np.atleast_2d(np.asarray(b, bool))
  if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
    raise errors.UserError(f"paired verdicts need the same (seeds, images) shape, got {a.shape} "
                           f"and {b.shape}; evaluate both models on the same images and seeds")
  return a, b


def bootstrap_ci(a, b, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0) -> tuple:
  """(difference, low, high): mean(a) - mean(b) and its paired-bootstrap percentile interval."""
  a, b = _paired(a, b)
  per_image = (a.astype(np.float64) - b).mean(axis=0)  # seeds pooled, images kept paired
  rng = np.random.default_rng(seed)
  n = per_image.size
  means = np.empty(resamples)
  for start in range(0, resamples, 1000):  # in chunks: (1000, n) indices at a time
    size = min(1000, resamples - start)
    means[start:start + size] = per_image[rng.integers(0, n, (size, n))].mean(axis=1)
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return float(per_image.mean()), float(low), float(high)


def mcnemar_exact(a, b) -> Dict[str, Any]:
  """Exact two-sided McNemar test of one seed: {'a_only', 'b_only', 'p'} (p = 1 without discord)."""
  a, b = _paired(a, b)
  if a.shape[0] != 1:
    raise errors.UserError(f"mcnemar_exact takes one seed, got {a.shape[0]}; call it per seed")
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = a_only + b_only
  p = 1.0 if n == 0 else float(scipy_stats.binomtest(a_only, n, 0.5).pvalue)
  return {"a_only": a_only, "b_only": b_only, "p": p}


def compare(a, b, *, resamples: int = RESAMPLES, seed: int = 0) -> Dict[str, Any]:
  """Difference of accuracy (A - B), its 95% bootstrap CI, McNemar per seed, the 5% verdict."""
  a, b = _paired(a, b)
  difference, low, high = bootstrap_ci(a, b, resamples=resamples, seed=seed)
  tests = [mcnemar_exact(a[s], b[s]) for s in range(a.shape[0])]
  return {"difference": difference, "ci_low": low, "ci_high": high,
          "confidence": CONFIDENCE, "seeds": a.shape[0], "images": a.shape[1],
          "mcnemar": tests, "mcnemar_p": [t["p"] for t in tests],
          "significant": bool(low > 0 or high < 0)}


def _p(value: float) -> str:
  return f"{value:.2g}" if value >= 1e-4 else "< 1e-4"


def sentence(label_a: str, label_b: str, attack: str, result: Dict[str, Any]) -> str:
  """One markdown sentence: the difference in points, its CI, McNemar, significant or not."""
  points = {k: 100 * result[k] for k in ("difference", "ci_low", "ci_high")}
  direction = "higher" if points["difference"] > 0 else "lower"
  below = sum(p < 0.05 for p in result["mcnemar_p"])
  seeds = result["seeds"]
  tests = ", ".join(_p(p) for p in result["mcnemar_p"])
  if result["significant"]:
    verdict = (f"**significant at 5%**: {label_a} is {direction} than {label_b} "
               f"(the interval excludes 0)")
  else:
    verdict = "**not significant at 5%** (the interval contains 0)"
  return (f"{label_a} vs {label_b}, {attack.replace('_', ' ')}: {points['difference']:+.1f} "
          f"points (95% CI {points['ci_low']:+.1f} to {points['ci_high']:+.1f}, paired "
          f"bootstrap over {result['images']} images x {seeds} seed{'s' * (seeds > 1)}); "
          f"{verdict}. Exact McNemar p per seed: {tests} ({below} of {seeds} below 0.05).")


def compare_rows(row: Dict[str, Any], twin: Dict[str, Any], names: Sequence[str],
                 resamples: int = RESAMPLES) -> List[Dict[str, Any]]:
  """compare() for each name both rows have per-image verdicts of ({'name', **result})."""
  results = []
  for name in names:
    if name in row.get("verdicts", {}) and name in twin.get("verdicts", {}):
      result = compare(row["verdicts"][name], twin["verdicts"][name], resamples=resamples)
      results.append({"name": name, **result})
  return results
