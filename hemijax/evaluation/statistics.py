"""Paired statistics for comparing methods case by case: Wilcoxon, effect size, Holm correction.

Pairing: two methods are compared on the cases *both* were scored on (`paired_values`); a case one
method lacks is left out, never filled in.

Test: the two-sided Wilcoxon signed-rank test of the differences d = method - reference, zero
differences dropped (`zero_method="wilcox"`, scipy's default). `scipy.stats.wilcoxon` computes the
p-value, except in the one case where scipy would run an exhaustive permutation test (tied or zero
differences and at most 13 non-zero ones): that takes seconds a call, and a study runs thousands.
There `exact_signed_rank_pvalue` computes the same exact p-value from the null distribution of the
rank sum (every sign pattern equally likely, mid-ranks for ties), by counting, in microseconds;
tests/test_study.py checks it against scipy. No pairs -> p is None; every difference zero -> p = 1.0
(no evidence of a difference; scipy has no statistic there).

Effect size: the matched-pairs rank-biserial correlation r = (R+ - R-) / (R+ + R-) (Kerby 2014,
"The simple difference formula"), R+ / R- the sums of the ranks of |d| over the positive / negative
differences, zeros dropped as in the test. It is the effect size that belongs to the signed-rank
test: r = 1 when the method is better on every (non-tied) case, -1 when worse on every one, 0 when
the ranks balance. Unlike Cohen's d_z it does not assume normal differences (Dice is bounded and
skewed). Its sign follows d = method - reference, so for distances (lower is better) a negative r
favours the method.

Multiple comparisons: Holm's step-down correction (Holm 1979), which controls the family-wise error
rate without assuming independence; a study applies it within each table (one metric x region).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

SIGNIFICANCE = 0.05  # Holm-adjusted p-values below it count as significant
PERMUTATION_LIMIT = 13  # scipy's "auto" runs exhaustive permutations up to this many pairs


def holm(pvalues) -> list:
  """Holm-adjusted p-values, in the input order; None entries are kept and not counted.

  Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
  """
  indexed = [(p, i) for i, p in enumerate(pvalues) if p is not None]
  m = len(indexed)
  adjusted = [None] * len(pvalues)
  running = 0.0
  for rank, (p, i) in enumerate(sorted(indexed)):
    running = max(running, min(1.0, (m - rank) * float(p)))
    adjusted[i] = running
  return adjusted


def paired_values(values: dict, reference: dict) -> tuple[list, np.ndarray, np.ndarray]:
  """(case ids, method values, reference values) over the cases both dicts have, sorted by id."""
  common = sorted(set(values) & set(reference))
  return (common, np.array([values[c] for c in common], float),
          np.array([reference[c] for c in common], float))


def _signed_ranks(differences):
  nonzero = differences[differences != 0]
  return nonzero, stats.rankdata(np.abs(nonzero))


def rank_biserial(values, reference) -> float | None:
  """Matched-pairs rank-biserial correlation of values - reference (zeros dropped); 0.0 when every
  difference is zero, None without pairs."""
  differences = np.asarray(values, float) - np.asarray(reference, float)
  if differences.size == 0:
    return None
  nonzero, ranks = _signed_ranks(differences)
  if nonzero.size == 0:
    return 0.0
  return float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())


def exact_signed_rank_pvalue(differences) -> float:
  """Exact two-sided p-value of the signed-rank statistic (zeros dropped, mid-ranks for ties)."""
  nonzero, ranks = _signed_ranks(np.asarray(differences, float))
  if nonzero.size == 0:
    return 1.0
  doubled = np.rint(2 * ranks).astype(int)  # mid-ranks are multiples of 1/2
  counts = np.zeros(int(doubled.sum()) + 1)
  counts[0] = 1.0
  for rank in doubled:  # number of sign patterns reaching each rank sum
    counts[rank:] = counts[rank:] + counts[:-rank]
  observed = int(doubled[nonzero > 0].sum())
  total = counts.sum()
  lower, upper = counts[:observed + 1].sum() / total, counts[observed:].sum() / total
  return float(min(1.0, 2 * min(lower, upper)))


def wilcoxon_pvalue(values, reference) -> float | None:
  """Two-sided paired Wilcoxon signed-rank p-value (see the module docstring)."""
  differences = np.asarray(values, float) - np.asarray(reference, float)
  if differences.size == 0:
    return None
  nonzero = differences[differences != 0]
  if nonzero.size == 0:
    return 1.0
  tied = nonzero.size < differences.size or np.unique(np.abs(nonzero)).size < nonzero.size
  if tied and nonzero.size <= PERMUTATION_LIMIT:
    return exact_signed_rank_pvalue(differences)
  return float(stats.wilcoxon(values, reference, zero_method="wilcox", method="auto").pvalue)


def paired_comparison(values: dict, reference: dict) -> dict:
  """Wilcoxon p-value, rank-biserial r and mean difference over the cases both were scored on.

  `values`, `reference`: case id -> value. Returns {"n", "p", "effect", "mean_difference"}; p,
  effect and mean_difference are None without common cases.
  """
  cases, method_values, reference_values = paired_values(values, reference)
  return {
      "n": len(cases),
      "p": wilcoxon_pvalue(method_values, reference_values),
      "effect": rank_biserial(method_values, reference_values),
      "mean_difference": float(np.mean(method_values - reference_values)) if cases else None,
  }
