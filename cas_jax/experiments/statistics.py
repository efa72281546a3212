"""Paired statistics of two models' per-image verdicts over seeds: is a difference noise?

    a, b = ...  # (seeds, images) bool: image i correct under the attack, seed s, model A / B
    result = compare(a, b)           # difference, hierarchical CI, seed-level t-test, McNemar
    (result,) = holm_verdicts([result])   # a table's comparisons: Holm-adjusted p and verdicts
    sentence("AT+CAS", "AT", "pgd20", result)   # the markdown's words

Both arrays hold the same test images in the same order (image i of A is image i of B), one
row per seed (seed s of A against seed s of B). The difference is mean(A) - mean(B) over all
seeds and images. Each comparison reports:

- a hierarchical bootstrap 95% interval: resample the seeds with replacement, then, within each
  resampled seed, the images with replacement, the same image indices for A and B (images stay
  paired); the 2.5% and 97.5% percentiles of 10,000 resampled differences (a seeded numpy
  Generator: the same numbers every run). With one seed it is the paired image bootstrap. Its
  p-value is the two-sided tail proportion, 2 min(#(d* <= 0) + 1, #(d* >= 0) + 1) / (R + 1).
- a seed-level paired t-test: the per-seed differences of accuracy, a t-test over seeds
  (scipy.stats.ttest_rel on the per-seed counts of correct images), its p and 95% t interval.
  With one seed there is none (None in the result, "not available" in the words).
- an exact McNemar test per seed (two-sided binomial, p = 1/2, on the images only one of the
  two gets right): supporting information about each trained pair; it ignores seed variation.

The verdict's p is the larger of the seed-level t-test p and the bootstrap p (with one seed:
the bootstrap p, and the words say it covers that one trained pair only); the larger of two
valid p-values is a valid p-value, so a difference must survive both. Either alone fails
somewhere. The bootstrap p is far too small with few seeds: it resamples them as if they were
the whole population (variance (S - 1) / S of the seed spread, 10 distinct draws of 3 seeds),
so when 3 per-seed differences share a sign, 1 time in 4 with no true difference, nearly every
resample does too and its p is near 0; the t-test pays for the few seeds with S - 1 degrees of
freedom. The t-test in turn sees no image noise when the seeds agree (3 equal per-seed
differences give p = 0); the bootstrap does.

holm_verdicts adjusts these p-values by Holm-Bonferroni over the table's comparisons
(scipy.stats.false_discovery_control has only Benjamini-Hochberg/Yekutieli, which control the
false discovery rate, not the family-wise error): significant at 5% = adjusted p <= 0.05.
A comparison where either row's figure is an upper bound (`<= x`: the attack ran only on the
survivors of earlier attacks) gets no verdict and is left out of the family.
"""
from typing import Any, Dict, List, Sequence

import numpy as np
from scipy import stats as scipy_stats

from cas_jax import errors

CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 10_000
BOTH_TESTS = "larger of seed-level t-test and bootstrap"
ONE_SEED_TEST = "image bootstrap (one seed)"


def _paired(a, b) -> tuple:
  """a, b as (seeds, images) bool arrays of one shape; UserError naming the mismatch."""
  a, b = np.atleast_2d(np.asarray(a, bool)), np.atleast_2d(np.asarray(b, bool))
  if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
    raise errors.UserError(f"paired verdicts need the same (seeds, images) shape, got {a.shape} "
                           f"and {b.shape}; evaluate both models on the same images and seeds")
  return a, b


def bootstrap_differences(a, b, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
  """Resampled mean(A) - mean(B): seeds with replacement, then paired images within each seed."""
  a, b = _paired(a, b)
  seeds, images = a.shape
  # Summing resampled per-image differences (+1, -1 or 0) needs only how many +1 and -1 were
  # drawn: multinomial with the seed's shares of A-only and B-only images. The same law as
  # drawing (resamples, seeds, images) indices, at a cost that does not grow with the images.
  shares = np.stack([(a & ~b).mean(1), (~a & b).mean(1), (a == b).mean(1)], axis=1)
  rng = np.random.default_rng(seed)
  drawn = rng.integers(0, seeds, (resamples, seeds))
  counts = rng.multinomial(images, shares[drawn])  # (resamples, seeds, 3)
  return (counts[..., 0] - counts[..., 1]).sum(axis=1) / (seeds * images)


def hierarchical_bootstrap(a, b, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                           seed: int = 0) -> Dict[str, float]:
  """{'difference', 'ci_low', 'ci_high', 'bootstrap_p'}: the hierarchical bootstrap's figures."""
  a, b = _paired(a, b)
  resampled = bootstrap_differences(a, b, resamples=resamples, seed=seed)
  tail = (1 - confidence) / 2
  low, high = np.quantile(resampled, [tail, 1 - tail])
  smaller = min(np.sum(resampled <= 0), np.sum(resampled >= 0)) + 1
  return {"difference": float(a.mean() - b.mean()), "ci_low": float(low), "ci_high": float(high),
          "bootstrap_p": float(min(1.0, 2 * smaller / (resamples + 1)))}


def seed_test(a, b, *, confidence: float = CONFIDENCE) -> Dict[str, Any]:
  """Per-seed differences and their paired t-test over seeds (t_p, t_low, t_high: None, 1 seed)."""
  a, b = _paired(a, b)
  right_a, right_b = a.sum(axis=1), b.sum(axis=1)  # integers: the differences are exact
  images = a.shape[1]
  result = {"seed_differences": ((right_a - right_b) / images).tolist(),
            "t_p": None, "t_low": None, "t_high": None}
  differences = right_a - right_b
  if differences.size < 2:
    return result
  if np.all(differences == differences[0]):  # no spread: t is 0/0 or infinite
    d = differences[0] / images
    return {**result, "t_p": 1.0 if d == 0 else 0.0, "t_low": d, "t_high": d}
  test = scipy_stats.ttest_rel(right_a, right_b)
  interval = test.confidence_interval(confidence)
  return {**result, "t_p": float(test.pvalue), "t_low": float(interval.low) / images,
          "t_high": float(interval.high) / images}


def mcnemar_exact(a, b) -> Dict[str, Any]:
  """Exact two-sided McNemar test of one seed: {'a_only', 'b_only', 'p'} (p = 1 without discord)."""
  a, b = _paired(a, b)
  if a.shape[0] != 1:
    raise errors.UserError(f"mcnemar_exact takes one seed, got {a.shape[0]}; call it per seed")
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = a_only + b_only
  p = 1.0 if n == 0 else float(scipy_stats.binomtest(a_only, n, 0.5).pvalue)
  return {"a_only": a_only, "b_only": b_only, "p": p}


def compare(a, b, *, upper_bound: bool = False, resamples: int = RESAMPLES,
            seed: int = 0) -> Dict[str, Any]:
  """Difference A - B, hierarchical CI, seed-level t-test, McNemar per seed, the p of the verdict."""
  a, b = _paired(a, b)
  bootstrap = hierarchical_bootstrap(a, b, resamples=resamples, seed=seed)
  seeds = seed_test(a, b)
  tests = [mcnemar_exact(a[s], b[s]) for s in range(a.shape[0])]
  one_seed = seeds["t_p"] is None
  return {**bootstrap, "confidence": CONFIDENCE, "resamples": resamples,
          "seeds": a.shape[0], "images": a.shape[1], **seeds,
          "mcnemar": tests, "mcnemar_p": [t["p"] for t in tests], "upper_bound": upper_bound,
          "verdict_test": ONE_SEED_TEST if one_seed else BOTH_TESTS,
          "verdict_p": max(bootstrap["bootstrap_p"], 0.0 if one_seed else seeds["t_p"])}


def holm(p_values: Sequence[float]) -> List[float]:
  """Holm-Bonferroni adjusted p-values, in the order given (never below the raw p, at most 1)."""
  p = np.asarray(p_values, float).reshape(-1)
  if np.any(~(p >= 0) | (p > 1)):
    raise errors.UserError(f"p-values must lie in [0, 1], got {p_values}")
  order = np.argsort(p, kind="stable")
  # The k-th smallest (k = 0, 1, ...) is multiplied by m - k, then kept monotone in k.
  stepped = np.maximum.accumulate(p[order] * (p.size - np.arange(p.size)))
  adjusted = np.empty_like(p)
  adjusted[order] = np.minimum(stepped, 1.0)
  return adjusted.tolist()


def holm_verdicts(results: List[Dict[str, Any]], alpha: float = ALPHA) -> List[Dict[str, Any]]:
  """A table's comparisons with 'holm_p', 'holm_tests' and 'significant' (None: upper bounds)."""
  family = [i for i, r in enumerate(results) if not r["upper_bound"]]
  adjusted = dict(zip(family, holm([results[i]["verdict_p"] for i in family])))
  return [{**r, "alpha": alpha, "holm_tests": len(family), "holm_p": adjusted.get(i),
           "significant": None if i not in adjusted else bool(adjusted[i] <= alpha)}
          for i, r in enumerate(results)]


def _p(value: float) -> str:
  return f"{value:.2g}" if value >= 1e-4 else "< 1e-4"


def _verdict(label_a: str, label_b: str, result: Dict[str, Any]) -> str:
  """The verdict's words: upper bounds, significant after Holm (and which way) or not."""
  if result["significant"] is None:
    return ("upper bounds, no verdict (an attack that ran only on the images earlier attacks "
            "left standing)")
  family = f"after Holm over {result['holm_tests']} test{'s' * (result['holm_tests'] > 1)}"
  adjusted = f"adjusted p {_p(result['holm_p'])}"
  if result["verdict_test"] == ONE_SEED_TEST:
    adjusted += ", from the image bootstrap: this one trained pair only"
  if not result["significant"]:
    return f"**not significant at {result['alpha']:.0%} {family}** ({adjusted})"
  direction = "higher" if result["difference"] > 0 else "lower"
  return (f"**significant at {result['alpha']:.0%} {family}** ({adjusted}): {label_a} is "
          f"{direction} than {label_b}")


def sentence(label_a: str, label_b: str, attack: str, result: Dict[str, Any]) -> str:
  """One markdown sentence: difference, hierarchical CI, seed-level test, Holm verdict, McNemar."""
  points = {k: 100 * result[k] for k in ("difference", "ci_low", "ci_high")}
  seeds, images = result["seeds"], result["images"]
  per_seed = ", ".join(f"{100 * d:+.1f}" for d in result["seed_differences"])
  if result["t_p"] is None:
    seed_level = "seed-level test not available with one seed"
  else:
    p = result["t_p"]
    seed_level = (f"per seed {per_seed}, paired t-test over seeds p {'= ' * (p >= 1e-4)}{_p(p)} "
                  f"(95% t interval {100 * result['t_low']:+.1f} to {100 * result['t_high']:+.1f})")
  below = sum(p < 0.05 for p in result["mcnemar_p"])
  tests = ", ".join(_p(p) for p in result["mcnemar_p"])
  scheme = (f"hierarchical bootstrap, {seeds} seeds then {images} images" if seeds > 1
            else f"paired bootstrap over {images} images, one seed")
  return (f"{label_a} vs {label_b}, {attack.replace('_', ' ')}: {points['difference']:+.1f} "
          f"points (95% CI {points['ci_low']:+.1f} to {points['ci_high']:+.1f}, {scheme}); "
          f"{seed_level}; {_verdict(label_a, label_b, result)}. Exact McNemar p per seed: "
          f"{tests} ({below} of {seeds} below 0.05).")


def compare_rows(row: Dict[str, Any], twin: Dict[str, Any], names: Sequence[str],
                 resamples: int = RESAMPLES) -> List[Dict[str, Any]]:
  """compare() for each name both rows have per-image verdicts of ({'name', **result})."""
  results = []
  for name in names:
    if name in row.get("verdicts", {}) and name in twin.get("verdicts", {}):
      bound = any(r.get("figure", {}).get(name, "").startswith("<=") for r in (row, twin))
      result = compare(row["verdicts"][name], twin["verdicts"][name], upper_bound=bound,
                       resamples=resamples)
      results.append({"name": name, **result})
  return results
