"""Paired statistics against cases computed by hand, by scipy, or by an independent resampling."""
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


def index_bootstrap(a, b, *, resamples, seed, paired=True, seeds_resampled=True):
  """Resampled mean(A) - mean(B) from explicit (resamples, seeds, images) index draws."""
  a, b = np.atleast_2d(a).astype(float), np.atleast_2d(b).astype(float)
  seeds, images = a.shape
  rng = np.random.default_rng(seed)
  if seeds_resampled:
    drawn = rng.integers(0, seeds, (resamples, seeds))[..., None]
  else:
    drawn = np.arange(seeds)[None, :, None]
  images_a = rng.integers(0, images, (resamples, seeds, images))
  images_b = images_a if paired else rng.integers(0, images, (resamples, seeds, images))
  return a[drawn, images_a].mean(axis=(1, 2)) - b[drawn, images_b].mean(axis=(1, 2))


def interval(resampled):
  return tuple(np.quantile(resampled, [0.025, 0.975]))


def correlated(rng, images, lost, seeds=1):
  """(seeds, images) verdicts of A, and of B: A's with lost (per seed: a list) set wrong."""
  a = rng.random((seeds, images)) < 0.5
  b = a.copy()
  for s, count in enumerate(np.broadcast_to(lost, seeds)):
    b[s, rng.choice(np.flatnonzero(a[s]), count, replace=False)] = False
  return a, b


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


def test_bootstrap_of_two_images_is_the_hand_computed_one():
  # Differences per image [1, 0]: resampled means 0 (1/4), 0.5 (1/2), 1 (1/4) -> [0, 1].
  result = statistics.hierarchical_bootstrap([1, 1], [0, 1], resamples=4000)
  assert (result["difference"], result["ci_low"], result["ci_high"]) == (0.5, 0.0, 1.0)
  # Every image better by one verdict: no spread, and no resample at or below 0.
  result = statistics.hierarchical_bootstrap([1, 1, 1], [0, 0, 0], resamples=999)
  assert (result["ci_low"], result["ci_high"], result["bootstrap_p"]) == (1.0, 1.0, 2 / 1000)
  assert statistics.hierarchical_bootstrap([1, 0, 1], [1, 0, 1])["bootstrap_p"] == 1.0


def test_bootstrap_matches_the_normal_approximation_on_many_images():
  rng = np.random.default_rng(1)
  a, b = rng.random(4000) < 0.45, rng.random(4000) < 0.40
  result = statistics.hierarchical_bootstrap(a, b, resamples=4000)
  d = a.astype(float) - b
  half = 1.96 * d.std() / math.sqrt(d.size)
  assert result["difference"] == pytest.approx(d.mean())
  assert result["ci_low"] == pytest.approx(d.mean() - half, abs=0.004)
  assert result["ci_high"] == pytest.approx(d.mean() + half, abs=0.004)


def test_the_interval_is_the_paired_one_narrow_where_an_unpaired_one_is_wide():
  a, b = correlated(np.random.default_rng(3), 500, lost=10, seeds=3)  # B = A less 2%, per seed
  result = statistics.compare(a, b)
  paired = interval(index_bootstrap(a, b, resamples=2000, seed=1))
  unpaired = interval(index_bootstrap(a, b, resamples=2000, seed=1, paired=False))
  assert result["difference"] == pytest.approx(0.02)
  assert unpaired[0] < 0 < unpaired[1] and unpaired[1] - unpaired[0] > 0.06  # wide
  assert 0 < result["ci_low"] and result["ci_high"] - result["ci_low"] < 0.02  # narrow
  assert (result["ci_low"], result["ci_high"]) == pytest.approx(paired, abs=0.003)


def test_seeds_that_disagree_widen_the_interval_and_the_t_test_is_scipys():
  rng = np.random.default_rng(4)
  a = rng.random((3, 500)) < 0.4
  b = a.copy()
  for s, shift in enumerate([-40, 10, -20]):  # -8, +2, -4 points: B right on 40 more images...
    pool = np.flatnonzero(~a[s] if shift < 0 else a[s])
    b[s, rng.choice(pool, abs(shift), replace=False)] = shift < 0
  result = statistics.compare(a, b)
  assert result["seed_differences"] == pytest.approx([-0.08, 0.02, -0.04])
  images_only = interval(index_bootstrap(a.mean(0, keepdims=True), b.mean(0, keepdims=True),
                                         resamples=4000, seed=1))  # seeds pooled per image
  assert images_only[1] < 0  # the images alone would call B better
  width = result["ci_high"] - result["ci_low"]
  assert result["ci_low"] < 0 < result["ci_high"] and width > 2.5 * (images_only[1] - images_only[0])
  by_hand = scipy_stats.ttest_rel(a.mean(1), b.mean(1))  # accuracies per seed
  assert result["t_p"] == pytest.approx(by_hand.pvalue)
  t_interval = by_hand.confidence_interval(0.95)
  assert (result["t_low"], result["t_high"]) == pytest.approx((t_interval.low, t_interval.high))
  assert result["verdict_test"] == statistics.BOTH_TESTS
  assert result["verdict_p"] == max(result["t_p"], result["bootstrap_p"]) == result["t_p"]


def test_one_seed_reduces_to_the_image_bootstrap_and_has_no_seed_level_test():
  a, b = correlated(np.random.default_rng(5), 400, lost=40)
  result = statistics.compare(a, b)
  by_index = index_bootstrap(a, b, resamples=10_000, seed=7)
  ours = statistics.bootstrap_differences(a, b)
  assert (result["ci_low"], result["ci_high"]) == pytest.approx(interval(by_index), abs=0.003)
  assert ours.std() == pytest.approx(by_index.std(), rel=0.03)
  assert result["t_p"] is None and result["t_low"] is None
  assert result["verdict_test"] == statistics.ONE_SEED_TEST
  assert result["verdict_p"] == result["bootstrap_p"]
  (result,) = statistics.holm_verdicts([result])
  assert "seed-level test not available with one seed" in statistics.sentence(
      "A", "B", "pgd20", result)
  # Seeded: the same numbers on every run, other numbers from another seed.
  assert np.array_equal(ours, statistics.bootstrap_differences(a, b))
  assert not np.array_equal(ours, statistics.bootstrap_differences(a, b, seed=1))


def test_per_seed_differences_equal_seeds_and_shape_errors():
  a = np.array([[1, 0, 1, 1], [1, 1, 1, 0]], bool)  # two seeds of model A
  b = np.array([[0, 0, 1, 1], [1, 0, 0, 0]], bool)
  result = statistics.compare(a, b, resamples=2000)
  assert result["difference"] == pytest.approx(3 / 8)  # (1 + 2) images better of 8
  assert result["seeds"] == 2 and result["images"] == 4
  assert result["seed_differences"] == [0.25, 0.5]
  assert [t["a_only"] for t in result["mcnemar"]] == [1, 2]
  assert result["mcnemar_p"] == [pytest.approx(1.0), pytest.approx(0.5)]
  same = statistics.compare(a, a)  # no spread at all: p 1, not scipy's nan
  assert (same["t_p"], same["t_low"], same["t_high"]) == (1.0, 0.0, 0.0)
  # One image better in every seed: t's p is 0, the bootstrap's (the verdict's) is not.
  one = statistics.compare(a, a & [0, 1, 1, 1])  # A alone right on the first image, each seed
  assert one["seed_differences"] == [0.25, 0.25] and one["t_p"] == 0.0
  assert one["verdict_p"] == one["bootstrap_p"] > 0.1
  with pytest.raises(errors.UserError, match="same .seeds, images. shape"):
    statistics.compare(a, b[:, :3])


def test_holm_by_hand():
  assert statistics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  family = [{"verdict_p": p, "upper_bound": False, "difference": 0.1}
            for p in (0.01, 0.04, 0.03)]
  assert [r["significant"] for r in statistics.holm_verdicts(family)] == [True, False, False]
  rng = np.random.default_rng(6)
  for _ in range(20):
    p = rng.random(8) ** 3
    adjusted = np.array(statistics.holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p)
    assert np.all(adjusted <= 1)
    m = p.size  # each adjusted p: the largest (m - k) p_(k) among the k-th smallest up to it
    by_hand = [min(1, max((m - k) * p[order[k]] for k in range(i + 1))) for i in range(m)]
    assert adjusted[order] == pytest.approx(by_hand)
  with pytest.raises(errors.UserError, match=r"p-values must lie in \[0, 1\]"):
    statistics.holm([0.2, 1.5])


def test_an_upper_bound_gets_no_verdict_and_is_not_counted():
  rng = np.random.default_rng(7)
  a, b = correlated(rng, 300, lost=30, seeds=3)
  verdicts = {"pgd20": (a, b), "aa": (a, b), "worst_case": (b, a)}
  row = {"figure": {"pgd20": "30.0", "aa": "<= 30.0", "worst_case": "20.0"},
         "verdicts": {n: v[0].tolist() for n, v in verdicts.items()}}
  twin = {"figure": {"pgd20": "25.0", "aa": "25.0", "worst_case": "25.0"},
          "verdicts": {n: v[1].tolist() for n, v in verdicts.items()}}
  results = statistics.holm_verdicts(statistics.compare_rows(row, twin, list(verdicts)))
  pgd, aa, worst = results
  assert aa["upper_bound"] and aa["significant"] is None and aa["holm_p"] is None
  assert all(r["holm_tests"] == 2 for r in results)
  assert [pgd["holm_p"], worst["holm_p"]] == pytest.approx(
      statistics.holm([pgd["verdict_p"], worst["verdict_p"]]))
  text = statistics.sentence("AT+CAS", "AT", "aa", aa)
  assert "upper bounds, no verdict" in text and "significant" not in text
  row["figure"]["aa"], twin["figure"]["aa"] = "30.0", "<= 25.0"  # the twin's bound is enough
  assert statistics.compare_rows(row, twin, ["aa"])[0]["upper_bound"]


def test_the_sentence_says_what_the_interval_is_and_the_holm_verdict():
  a, b = correlated(np.random.default_rng(2), 500, lost=[55, 60, 65], seeds=3)
  (result,) = statistics.holm_verdicts([statistics.compare(a, b)])
  text = statistics.sentence("AT+CAS", "AT", "worst_case", result)
  assert result["significant"] and result["ci_low"] > 0
  p = scipy_stats.ttest_1samp([11, 12, 13], 0).pvalue
  assert result["t_p"] == pytest.approx(p) == pytest.approx(result["holm_p"])
  assert result["bootstrap_p"] < p  # the t-test's p is the larger: it is the verdict's
  assert text.startswith("AT+CAS vs AT, worst case: +12.0 points (95% CI +")
  assert "hierarchical bootstrap, 3 seeds then 500 images" in text
  assert f"per seed +11.0, +12.0, +13.0, paired t-test over seeds p = {p:.2g}" in text
  assert (f"**significant at 5% after Holm over 1 test** (adjusted p {p:.2g}): AT+CAS is "
          "higher than AT") in text
  assert "3 of 3 below 0.05" in text
  b = a ^ (np.random.default_rng(3).random(a.shape) < 0.04)  # 4% flipped either way
  noise = [statistics.compare(a, b), statistics.compare(b, a), statistics.compare(a, a)]
  for result in statistics.holm_verdicts(noise):
    assert result["holm_tests"] == 3 and not result["significant"]
    assert "**not significant at 5% after Holm over 3 tests**" in statistics.sentence(
        "AT+CAS", "AT", "pgd20", result)
