"""The papers' relative claims as computed checks over a study's results.

A claim is plain config data: `dict(kind=..., run=..., baseline=..., region=..., ...)`; the code
knows only the kinds. `check(claim, means)` evaluates one against

  means[run][metric][region][subset key] = the mean over seeds of each seed's mean over cases

and returns {"text", "kind", "status", "holds", "detail"}: status "holds" / "does not hold" with the
numbers behind it in `detail`, or "not run" (holds None) when a run it needs is not in `means` or
has no results for its region. Subset keys are modality names joined by "+" ("flair+t1ce").

Kinds (fields beyond `kind`; `region` may be one name or a list: every region must satisfy it;
`metric` defaults to "dice"; `missing` / `present`: only subsets lacking / having all of these
modalities; better means higher for Dice and lower for distances, `HIGHER_IS_BETTER`):
  beats_in_subsets    run, baseline, region, min_subsets; strict (default True: better, False:
                      at least as good). Holds when `run` is better than `baseline` in at least
                      `min_subsets` of the subsets both were evaluated on.
  better_on_average   run, baseline, region; margin (default 0). Holds when `run`'s mean over the
                      subsets is better than `baseline`'s by more than `margin`.
  within_points       run, baseline (a name or a list), region, points (Dice points, 1 = 0.01);
                      two_sided (default False). Holds when, for every baseline, `run`'s mean over
                      the subsets is at most `points` below the baseline's (two_sided: at most
                      `points` away on either side). For metrics in [0, 1] that are higher-better.
  measure_at_most     run, measure, value. A number the run's own evaluators report (the
                      study's "measures": a dotted key of an evaluation's extras, e.g.
                      "permutation_invariance.voxels_label_changed"); holds when every seed's
                      value is at most `value`. Checked with `check(..., measures=...)`.
An optional `text` replaces the generated sentence. `same_seeds=True` (applied by the study,
`hemijax.evaluation.study.check_claims`): every run's results at `run`'s seeds only, so that a
diagnosis run of one seed is compared with the other runs at that seed, not with their mean over
all of theirs.

Paired evidence (`check(..., cases=...)`, per-case values): the verdict is on the means, but a
count like "≥ in 7 of 15" cannot tell a real deficit from noise. So each check also reports the
paired Wilcoxon tests over the cases both runs were scored on (hemijax.evaluation.statistics):
`beats_in_subsets`, one test per subset, Holm-corrected over the claim's subsets: in how many the
run is significantly better and in how many significantly worse; the two averaging kinds, one test
of each case's mean over the claim's subsets (the cases scored on all of them): p, the
rank-biserial r and n. It goes into `detail` and, as data, into `evidence`.
"""
from __future__ import annotations

import numpy as np

from hemijax.evaluation import statistics
from hemijax.evaluation.metrics import HIGHER_IS_BETTER

HOLDS, DOES_NOT_HOLD, NOT_RUN = "holds", "does not hold", "not run"
_COMMON = ("kind", "text", "metric", "region", "missing", "present", "evaluation", "same_seeds")
FIELDS = {  # kind -> (required fields, optional fields)
    "beats_in_subsets": (("run", "baseline", "region", "min_subsets"), ("strict",)),
    "better_on_average": (("run", "baseline", "region"), ("margin",)),
    "within_points": (("run", "baseline", "region", "points"), ("two_sided",)),
    "measure_at_most": (("run", "measure", "value"), ()),
}
POINT_METRICS = ("dice", "sensitivity", "precision")


def _names(value) -> tuple:
  return (value,) if isinstance(value, str) else tuple(value)


def validate(claims, source="claims") -> list[dict]:
  """The claims as dicts, checked for known kinds and fields (ValueError naming the bad entry)."""
  out = []
  for i, claim in enumerate(claims or ()):
    claim = dict(claim)
    where = f"{source}[{i}]"
    kind = claim.get("kind")
    if kind not in FIELDS:
      raise ValueError(f"{where}: unknown kind {kind!r}; choose one of {sorted(FIELDS)}")
    required, optional = FIELDS[kind]
    missing = [f for f in required if f not in claim]
    unknown = [f for f in claim if f not in required + optional + _COMMON]
    if missing or unknown:
      problems = ([f"missing {missing}"] if missing else []) + (
          [f"unknown {unknown}"] if unknown else [])
      raise ValueError(f"{where} ({kind}): " + "; ".join(problems))
    metric = claim.get("metric", "dice")
    if metric not in HIGHER_IS_BETTER:
      raise ValueError(f"{where}: unknown metric {metric!r}; "
                       f"choose one of {sorted(HIGHER_IS_BETTER)}")
    if kind == "within_points" and metric not in POINT_METRICS:
      raise ValueError(f"{where}: within_points needs a metric in [0, 1] ({POINT_METRICS})")
    out.append(claim)
  return out


def runs_needed(claim) -> tuple[str, ...]:
  return (claim["run"],) + _names(claim.get("baseline", ()))


def describe(claim) -> str:
  """The claim as a sentence (its `text` when given)."""
  if claim.get("text"):
    return claim["text"]
  if claim["kind"] == "measure_at_most":
    return f"{claim['run']}: {claim['measure']} ≤ {claim['value']} in every seed"
  metric = claim.get("metric", "dice")
  regions = "/".join(_names(claim["region"]))
  where = _filter_words(claim)
  kind, run, baseline = claim["kind"], claim["run"], " and ".join(_names(claim["baseline"]))
  if kind == "beats_in_subsets":
    relation = "beats" if claim.get("strict", True) else "is at least as good as"
    return (f"{run} {relation} {baseline} on {regions} {metric} in ≥ {claim['min_subsets']} "
            f"subsets{where}")
  if kind == "better_on_average":
    margin = f" by more than {claim['margin']}" if claim.get("margin") else ""
    return f"{run} beats {baseline} on mean {regions} {metric}{where}{margin}"
  side = "of" if claim.get("two_sided") else "below at most"
  return f"{run} is within {claim['points']} {metric} points {side} {baseline} on {regions}{where}"


def _filter_words(claim) -> str:
  words = []
  if claim.get("missing"):
    words.append("without " + "+".join(_names(claim["missing"])))
  if claim.get("present"):
    words.append("with " + "+".join(_names(claim["present"])))
  return (" (subsets " + ", ".join(words) + ")") if words else ""


def _selected(subsets, claim) -> list[str]:
  missing, present = set(_names(claim.get("missing", ()))), set(_names(claim.get("present", ())))
  return [s for s in subsets
          if not (set(s.split("+")) & missing) and present <= set(s.split("+"))]


def _better(a, b, metric, strict=True) -> bool:
  if HIGHER_IS_BETTER[metric]:
    return a > b if strict else a >= b
  return a < b if strict else a <= b


def _paired_cells(means, claim, run, baseline, region):
  """(subsets, run values, baseline values) over the selected subsets both have, or None."""
  metric = claim.get("metric", "dice")
  try:
    ours, theirs = means[run][metric][region], means[baseline][metric][region]
  except KeyError:
    return None
  subsets = _selected([s for s in ours if s in theirs], claim)
  if not subsets:
    return None
  return subsets, np.array([ours[s] for s in subsets]), np.array([theirs[s] for s in subsets])


def check(claim, means, cases=None, measures=None) -> dict:
  """Evaluates one claim on `means`; with `cases` (run -> metric -> region -> subset -> {case id:
  value}, each case's mean over seeds) also the paired evidence (see the module docstring).
  `measures`: the study's run measures ({"run", "evaluation", "measure", "seeds": {seed: value}}
  entries), for `measure_at_most`."""
  claim = validate([claim])[0]
  result = {"text": describe(claim), "kind": claim["kind"], "claim": claim}
  if claim["kind"] == "measure_at_most":
    return dict(result, **_measure_at_most(claim, measures or ()))
  absent = [r for r in runs_needed(claim) if r not in means]
  if absent:
    return dict(result, status=NOT_RUN, holds=None, detail=f"not run: {', '.join(absent)}")
  metric = claim.get("metric", "dice")
  verdicts, details, evidence = [], [], []
  for baseline in _names(claim["baseline"]):
    for region in _names(claim["region"]):
      cells = _paired_cells(means, claim, claim["run"], baseline, region)
      if cells is None:
        return dict(result, status=NOT_RUN, holds=None,
                    detail=f"no {region} {metric} results shared by {claim['run']} and {baseline}"
                           f"{_filter_words(claim)}")
      holds, detail = _KINDS[claim["kind"]](claim, metric, *cells)
      verdicts.append(holds)
      if cases is not None:
        paired = paired_evidence(claim, cases, baseline, region, cells[0])
        if paired is not None:
          evidence.append(dict(paired, baseline=baseline, region=region))
          detail += f"; {paired['text']}"
      details.append(f"{region} vs {baseline}: {detail}")
  holds = all(verdicts)
  out = dict(result, status=HOLDS if holds else DOES_NOT_HOLD, holds=holds,
             detail="; ".join(details))
  return dict(out, evidence=evidence) if cases is not None else out


def paired_evidence(claim, cases, baseline, region, subsets) -> dict | None:
  """The paired tests behind one (baseline, region) of a claim (module docstring), or None when
  the per-case values are missing."""
  metric = claim.get("metric", "dice")
  try:
    ours = {s: cases[claim["run"]][metric][region][s] for s in subsets}
    theirs = {s: cases[baseline][metric][region][s] for s in subsets}
  except KeyError:
    return None
  sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
  if claim["kind"] == "beats_in_subsets":
    tests = [statistics.paired_comparison(ours[s], theirs[s]) for s in subsets]
    adjusted = statistics.holm([t["p"] for t in tests])
    significant = [(p is not None and p < statistics.SIGNIFICANCE, t["mean_difference"])
                   for p, t in zip(adjusted, tests)]
    better = sum(1 for hit, d in significant if hit and sign * d > 0)
    worse = sum(1 for hit, d in significant if hit and sign * d < 0)
    return {"kind": "per_subset", "subsets": len(subsets), "better": better, "worse": worse,
            "p_holm": dict(zip(subsets, adjusted)),
            "text": (f"paired over cases (Wilcoxon, Holm over the {len(subsets)} subsets, "
                     f"p < {statistics.SIGNIFICANCE}): significantly better in {better}, "
                     f"worse in {worse}")}
  # Each case's mean over the subsets, over the cases both runs were scored on in all of them.
  common = set.intersection(*(set(ours[s]) & set(theirs[s]) for s in subsets))
  per_case = lambda by_subset: {c: float(np.mean([by_subset[s][c] for s in subsets]))
                                for c in common}
  test = statistics.paired_comparison(per_case(ours), per_case(theirs))
  if test["p"] is None:
    return None
  return {"kind": "case_means", "n": test["n"], "p": test["p"], "effect": test["effect"],
          "mean_difference": test["mean_difference"],
          "text": (f"paired over the {test['n']} cases' means (Wilcoxon): p={test['p']:.3g}, "
                   f"r={test['effect']:+.2f}")}


def _measure_at_most(claim, measures) -> dict:
  found = [m for m in measures if m["run"] == claim["run"] and m["measure"] == claim["measure"]
           and m["evaluation"] == claim.get("evaluation", m["evaluation"])]
  if not found:
    return dict(status=NOT_RUN, holds=None,
                detail=f"{claim['run']} reported no {claim['measure']}")
  values = {f"{m['evaluation']} seed {seed}": value for m in found
            for seed, value in m["seeds"].items()}
  holds = all(value <= claim["value"] for value in values.values())
  detail = ", ".join(f"{where}: {value:g}" for where, value in values.items())
  return dict(status=HOLDS if holds else DOES_NOT_HOLD, holds=holds,
              detail=f"{detail} (at most {claim['value']:g})")


def _beats_in_subsets(claim, metric, subsets, ours, theirs):
  strict = claim.get("strict", True)
  wins = sum(_better(a, b, metric, strict) for a, b in zip(ours, theirs))
  need = int(claim["min_subsets"])
  sign = ">" if strict else "≥"
  return wins >= need, (f"{sign} in {wins} of {len(subsets)} subsets (needs {need}); mean "
                        f"{ours.mean():.3f} vs {theirs.mean():.3f}")


def _better_on_average(claim, metric, subsets, ours, theirs):
  margin = float(claim.get("margin", 0.0))
  a, b = float(ours.mean()), float(theirs.mean())
  gap = (a - b) if HIGHER_IS_BETTER[metric] else (b - a)
  return gap > margin, (f"mean over {len(subsets)} subsets {a:.3f} vs {b:.3f} "
                        f"(better by {gap:+.3f}, needs > {margin:g})")


def _within_points(claim, metric, subsets, ours, theirs):
  points = float(claim["points"])
  a, b = float(ours.mean()), float(theirs.mean())
  behind = 100 * (b - a)  # points the run is below the baseline
  distance = abs(behind) if claim.get("two_sided") else behind
  allowed = ("±" if claim.get("two_sided") else "-") + f"{points:g}"
  return distance <= points, (f"mean over {len(subsets)} subsets {a:.3f} vs {b:.3f} "
                              f"({-behind:+.1f} points, allowed {allowed})")


_KINDS = {"beats_in_subsets": _beats_in_subsets, "better_on_average": _better_on_average,
          "within_points": _within_points}
