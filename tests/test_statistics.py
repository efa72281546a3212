"""Paired statistics against cases computed by hand (and scipy's McNemar where it has one)."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cas_jax import errors
from cas_jax.experiments import statistics


def exact_mcnemar_by_hand(a_only, b_only):
  """Two-sided exact binomial p: twice the smaller tail of Binomial(n, 1/2), at most 1."""
  n = a_only + b_only
  tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


def test_mcnemar_counts_the_discordant_images_and_matches_the_binomial_by_hand():
  a = np.array([1, 1, 1, 0, 1, 0], bool)
  b = np.array([0, 0, 0, 0, 1, 0], bool)  # A right alone on 3 images, B right alone on none
  result = statistics.mcnemar_exact(a, b)
  assert (result["a_only"], result["b_only"]) == (3, 0)
  assert result["p"] == pytest.approx(0.25)  # 2 * (1/2)^3
  assert statistics.mcnemar_exact(b, a)["p"] == pytest.approx(0.25)  # symmetric
  assert statistics.mcnemar_exact(a, a)["p"] == 1.0  # no discordant image
  rng = np.random.default_rng(0)
  for _ in range(5):
    a, b = rng.random(60) < 0.5, rng.random(60) < 0.4
    result = statistics.mcnemar_exact(a, b)
    assert result["p"] == pytest.approx(exact_mcnemar_by_hand(result["a_only"],
                                                              result["b_only"]))
  # The same test as scipy's own binomial test of 10 against 2 discordant images: p = 0.0386.
  a = np.array([1] * 10 + [0] * 2 + [1] * 5, bool)
  b = np.array([0] * 10 + [1] * 2 + [1] * 5, bool)
  assert statistics.mcnemar_exact(a, b)["p"] == pytest.approx(
      scipy_stats.binomtest(10, 12, 0.5).pvalue) == pytest.approx(79 / 2048)


def test_bootstrap_interval_of_two_images_is_the_hand_computed_one():
  # Differences per image [1, 0]: resampled means 0 (1/4), 0.5 (1/2), 1 (1/4) -> [0, 1].
  difference, low, high = statistics.bootstrap_ci([1, 1], [0, 1], resamples=4000)
  assert (difference, low, high) == (0.5, 0.0, 1.0)
  # Every image better by one verdict: no spread at all.
  assert statistics.bootstrap_ci([1, 1, 1], [0, 0, 0]) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_matches_the_normal_approximation_on_many_images():
  rng = np.random.default_rng(1)
  a, b = rng.random(4000) < 0.45, rng.random(4000) < 0.40
  difference, low, high = statistics.bootstrap_ci(a, b, resamples=4000)
  d = a.astype(float) - b
  half = 1.96 * d.std() / math.sqrt(d.size)
  assert difference == pytest.approx(d.mean())
  assert low == pytest.approx(d.mean() - half, abs=0.004)
  assert high == pytest.approx(d.mean() + half, abs=0.004)


def test_seeds_are_pooled_with_images_paired_by_index():
  a = np.array([[1, 0, 1, 1], [1, 1, 1, 0]], bool)  # two seeds of model A
  b = np.array([[0, 0, 1, 1], [1, 0, 0, 0]], bool)
  result = statistics.compare(a, b, resamples=2000)
  assert result["difference"] == pytest.approx(3 / 8)  # (1 + 2) images better of 8
  assert result["seeds"] == 2 and result["images"] == 4
  assert [t["a_only"] for t in result["mcnemar"]] == [1, 2]
  assert result["mcnemar_p"] == [pytest.approx(1.0), pytest.approx(0.5)]
  # Per image the seeds average to [0, .5, .5, 0]: no resample can make the mean negative.
  assert result["ci_low"] >= 0.0 and result["ci_high"] <= 0.5
  with pytest.raises(errors.UserError, match="same .seeds, images. shape"):
    statistics.compare(a, b[:, :3])


def test_the_sentence_says_whether_the_difference_is_significant():
  rng = np.random.default_rng(2)
  better = rng.random(500) < 0.6
  worse = better & (rng.random(500) < 0.7)  # B loses 30% of A's correct images
  result = statistics.compare(better, worse)
  text = statistics.sentence("AT+CAS", "AT", "worst_case", result)
  assert result["significant"] and result["ci_low"] > 0
  assert text.startswith("AT+CAS vs AT, worst case: +")
  assert "**significant at 5%**: AT+CAS is higher than AT" in text and "1 of 1 below 0.05" in text
  same = statistics.compare(better, better ^ (rng.random(500) < 0.02))
  text = statistics.sentence("AT+CAS", "AT", "pgd20", same)
  assert not same["significant"] and same["ci_low"] <= 0 <= same["ci_high"]
  assert "**not significant at 5%** (the interval contains 0)" in text
