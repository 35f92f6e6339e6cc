"""Evaluation tables: per-case rows (cases.csv), summaries, method comparisons and their Markdown.

A *row* is one case x subset x region: `{"case_id", "subset", "region", *METRIC_NAMES, "acquired"}`.
`subset` is a subset key ("flair+t1ce", see `hemijax.evaluation.subsets`) or `AS_ACQUIRED` for the
row that scores the case with every modality it has; `acquired` is the key of the modalities the
case has. A case is scored only on the subsets of the modalities it has, so subsets may have
different numbers of cases (`n_cases`, the `n` column).

Averages: a subset's mean/std are over its cases (population std, ddof=0, so one case gives 0);
the "mean" row / `overall` is the unweighted mean of the per-subset means (the papers' average;
the "as acquired" row is not one of the subsets and is not in it).

Comparisons (`compare`): for each subset x region cell, every method's mean over the cases that all
methods were scored on for that cell (a case one method lacks is left out of every method's mean
and of the pairs); the best mean wins the cell (ties count a win for every tied method; "best" is
the highest for dice/sensitivity/precision, the lowest for distances, the closest to 0 for
volume_diff_ml). The p-value is the two-sided Wilcoxon signed-rank test (scipy, zero differences
dropped) pairing each method's per-case values with the first method's on those shared cases. When
every paired difference is zero scipy has no statistic (it warns and returns NaN, or raises); we
report p = 1.0 there (no evidence of a difference), and also for any other degenerate sample scipy
cannot test.

Files are written to a temporary name in the target folder, then renamed (never half-written).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings

import numpy as np
from scipy import stats

from hemijax import atomic
from hemijax.evaluation.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from hemijax.evaluation.subsets import (AS_ACQUIRED, AS_ACQUIRED_DISPLAY, all_subsets,
                                        display_name, parse_subset, subset_key, subset_symbol)

METRIC_DISPLAY = {"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)",
                  "sensitivity": "Sensitivity", "precision": "Precision",
                  "volume_diff_ml": "Volume difference (mL, pred - truth)"}
METRIC_DECIMALS = {"dice": 3, "sensitivity": 3, "precision": 3, "hd95": 2, "assd": 2,
                   "volume_diff_ml": 2}
CSV_FIELDS = ("case_id", "subset", "region") + METRIC_NAMES


# ---------------------------------------------------------------------------------------------
# Rows and cases.csv


def row_key(subset, modalities) -> str:
  """The `subset` value of a row: a canonical subset key, or `AS_ACQUIRED`."""
  return AS_ACQUIRED if subset == AS_ACQUIRED else subset_key(subset, modalities)


def case_rows(case_id, subset, metrics_by_region, modalities, acquired=None) -> list[dict]:
  """Rows for one case and subset (or `AS_ACQUIRED`) from `metrics.case_metrics` output (region ->
  metric -> value); `acquired`: the modalities the case has (adds the "acquired" column)."""
  key = row_key(subset, modalities)
  extra = {} if acquired is None else {"acquired": subset_key(acquired, modalities)}
  return [{"case_id": str(case_id), "subset": key, "region": region, **values, **extra}
          for region, values in metrics_by_region.items()]


def json_text(obj) -> str:
  # allow_nan=False: a NaN would make invalid JSON; the summaries use None for "no value".
  return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_cases_csv(path, rows):
  """cases.csv: one row per case x subset x region; CSV_FIELDS first, then any extra keys."""
  fields = list(CSV_FIELDS)
  for row in rows:
    fields += [k for k in row if k not in fields]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_text(path, buffer.getvalue())


def read_cases_csv(path) -> list[dict]:
  """Rows of a cases.csv, metric values as floats (e.g. for `compare` across workdirs)."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for name in METRIC_NAMES:
      if row.get(name) not in (None, ""):
        row[name] = float(row[name])
  return rows


def _collect(rows, modalities, regions, metrics):
  """Row key -> region -> metric -> {case_id: value}; subsets in `all_subsets` order, then
  `AS_ACQUIRED`."""
  regions = list(regions)
  table, seen = {}, set()
  for row in rows:
    key = row_key(row["subset"], modalities)
    region, case_id = row["region"], str(row["case_id"])
    if region not in regions:
      continue  # a region this report does not show
    if (case_id, key, region) in seen:
      raise ValueError(f"duplicate row for case {case_id!r}, subset {key!r}, region {region!r}")
    seen.add((case_id, key, region))
    cell = table.setdefault(key, {}).setdefault(region, {m: {} for m in metrics})
    for metric in metrics:
      cell[metric][case_id] = float(row[metric])
  order = [subset_key(s, modalities) for s in all_subsets(modalities)] + [AS_ACQUIRED]
  return {key: table[key] for key in order if key in table}


# ---------------------------------------------------------------------------------------------
# Summary


def _mean(values):
  return float(np.mean(values)) if len(values) else None


def _std(values):
  return float(np.std(values)) if len(values) else None


def _summary_entry(by_region, regions, metrics):
  """n_cases, mean and std of one row key (region -> metric -> {case: value})."""
  cases = set()
  for cell in by_region.values():
    cases |= set(cell[metrics[0]]) if metrics else set()
  empty = {m: {} for m in metrics}
  return cases, {
      "n_cases": len(cases),
      "mean": {r: {m: _mean(list(by_region.get(r, empty)[m].values())) for m in metrics}
               for r in regions},
      "std": {r: {m: _std(list(by_region.get(r, empty)[m].values())) for m in metrics}
              for r in regions}}


def summarise(rows, modalities, regions, metrics=METRIC_NAMES) -> dict:
  """Per-subset mean/std over cases of every metric and region, and the mean over subsets.

  Returns {"modalities", "regions", "metrics", "subsets": {key: {"symbol", "modalities", "n_cases",
  "mean": {region: {metric: value}}, "std": ...}}, "overall": {"n_subsets", "n_cases", "mean"},
  "as_acquired": {"n_cases", "mean", "std", "acquired": {subset key: n cases}} or None}.
  Values are None where a subset has no rows for a region.
  """
  modalities, regions, metrics = list(modalities), list(regions), list(metrics)
  table = _collect(rows, modalities, regions, metrics)
  subsets, all_cases, as_acquired = {}, set(), None
  for key, by_region in table.items():
    cases, entry = _summary_entry(by_region, regions, metrics)
    all_cases |= cases
    if key == AS_ACQUIRED:
      acquired = {}
      for row in rows:  # how many cases had each set of modalities
        if row["subset"] == AS_ACQUIRED and row.get("acquired") and row["region"] == regions[0]:
          acquired[row["acquired"]] = acquired.get(row["acquired"], 0) + 1
      as_acquired = {**entry, "acquired": acquired}
      continue
    subsets[key] = {"symbol": subset_symbol(key, modalities),
                    "modalities": list(parse_subset(key, modalities)), **entry}
  overall = {r: {m: _mean([s["mean"][r][m] for s in subsets.values()
                           if s["mean"][r][m] is not None]) for m in metrics} for r in regions}
  return {"modalities": modalities, "regions": regions, "metrics": metrics, "subsets": subsets,
          "overall": {"n_subsets": len(subsets), "n_cases": len(all_cases), "mean": overall},
          "as_acquired": as_acquired}


def _fmt(value, metric):
  return "–" if value is None else f"{value:.{METRIC_DECIMALS.get(metric, 3)}f}"


def _md_row(cells):
  return "| " + " | ".join(cells) + " |"


def _modality_header(modalities):
  return [display_name(m) for m in modalities], [":-:"] * len(modalities)


def _symbol_cells(symbol):
  return list(symbol)


def _label_cells(label, modalities):
  """A row label spread over the modality columns ("**mean**", "as acquired")."""
  return [label] + [""] * (len(modalities) - 1)


def conventions_line(conventions, metric=None) -> str:
  """One Markdown line naming how the distances were computed (`metrics.metric_conventions`)."""
  if metric in ("hd95", "assd"):
    return (f"{METRIC_DISPLAY[metric]}: {conventions[metric]}; empty masks: "
            f"{conventions['empty_penalty']}.")
  return (f"Metric conventions: HD95 {conventions['hd95']}; ASSD {conventions['assd']}; empty "
          f"masks: {conventions['empty_penalty']}; both masks empty: {conventions['both_empty']}.")


def _order(key, modalities) -> int:
  return [subset_key(s, modalities) for s in all_subsets(modalities)].index(key)


def _notes(summary) -> list[str]:
  """Lines about what the evaluation left out or could not score, when the summary says so."""
  lines = []
  if summary.get("not_applicable"):
    lines.append("Not scored (no case has all of their modalities): "
                 + ", ".join(summary["not_applicable"]) + ".")
  acquired = (summary.get("as_acquired") or {}).get("acquired")
  if acquired and len(acquired) > 1:  # cases genuinely differ in what they have
    modalities = summary["modalities"]
    lines.append("Cases by modalities acquired: " + ", ".join(
        f"{subset_symbol(key, modalities)} {n}"
        for key, n in sorted(acquired.items(), key=lambda kv: _order(kv[0], modalities))) + ".")
  if summary.get("left_out"):
    lines.append("Left out: " + "; ".join(f"{case} ({why})"
                                          for case, why in summary["left_out"].items()) + ".")
  return lines


def summary_markdown(summary, title="Evaluation") -> str:
  """Markdown: a Dice table (rows = subsets in ● ○ notation, columns = regions) then the others."""
  modalities, regions = summary["modalities"], summary["regions"]
  names, aligns = _modality_header(modalities)
  step = summary.get("step")
  lines = [f"# {title}", ""]
  if step is not None:
    asked = summary.get("step_requested")
    lines += [f"Checkpoint step {step}" + (f" (--step {asked})" if asked is not None else "")
              + f" of {summary.get('workdir', 'the run')}"
              + (f"; data {summary['data']}" if summary.get("data") else "") + ".", ""]
  lines += [f"Mean over cases per subset of present modalities (● present, ○ missing; modality "
            f"order {' '.join(names)}). {summary['overall']['n_cases']} case(s), "
            f"{summary['overall']['n_subsets']} subset(s); n: the cases scored on the subset (a "
            "case is scored only on subsets of the modalities it has). The mean row averages the "
            "subsets; the as acquired row scores each case with all the modalities it has. "
            "Standard deviations are in summary.json.", ""]
  if summary.get("metric_conventions"):
    lines += [conventions_line(summary["metric_conventions"]), ""]
  notes = _notes(summary)
  if notes:
    lines += notes + [""]
  acquired = summary.get("as_acquired")
  for metric in summary["metrics"]:
    lines += [f"## {METRIC_DISPLAY.get(metric, metric)}", "",
              _md_row(names + ["n"] + regions), _md_row(aligns + ["-:"] * (1 + len(regions)))]
    for entry in summary["subsets"].values():
      lines.append(_md_row(_symbol_cells(entry["symbol"]) + [str(entry["n_cases"])]
                           + [_fmt(entry["mean"][r][metric], metric) for r in regions]))
    lines.append(_md_row(_label_cells("**mean**", modalities) + [""]
                         + [f"**{_fmt(summary['overall']['mean'][r][metric], metric)}**"
                            for r in regions]))
    if acquired:
      lines.append(_md_row(_label_cells(AS_ACQUIRED_DISPLAY, modalities)
                           + [str(acquired["n_cases"])]
                           + [_fmt(acquired["mean"][r][metric], metric) for r in regions]))
    lines.append("")
  return "\n".join(lines)


def write_summary(out_dir, summary, title="Evaluation") -> None:
  """summary.json and summary.md in `out_dir` (atomic writes)."""
  atomic.write_text(os.path.join(out_dir, "summary.json"), json_text(summary))
  atomic.write_text(os.path.join(out_dir, "summary.md"), summary_markdown(summary, title))


# ---------------------------------------------------------------------------------------------
# Comparison of methods


def paired_wilcoxon(values, reference, method="auto") -> float | None:
  """Two-sided Wilcoxon signed-rank p-value of paired samples; 1.0 when scipy cannot test them.

  All-zero differences (identical samples) have no statistic: scipy warns/returns NaN or raises,
  and we report 1.0. None when there are no pairs. `method` goes to `scipy.stats.wilcoxon`: "auto"
  is exact for <= 50 pairs, but with tied or zero differences and <= 13 pairs it runs an exhaustive
  permutation test (~1-2 s a call); "asymptotic" is the fast normal approximation.
  """
  values, reference = np.asarray(values, float), np.asarray(reference, float)
  if values.size == 0:
    return None
  if np.all(values == reference):
    return 1.0
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      p = float(stats.wilcoxon(values, reference, method=method).pvalue)
  except ValueError:
    return 1.0
  return p if math.isfinite(p) else 1.0


def _best(means, metric):
  """Names of the methods with the best mean (all tied ones)."""
  if not means:
    return []
  if metric == "volume_diff_ml":
    score = {k: -abs(v) for k, v in means.items()}
  elif HIGHER_IS_BETTER.get(metric, True):
    score = dict(means)
  else:
    score = {k: -v for k, v in means.items()}
  top = max(score.values())
  # Tolerance: equal results summed in another order may differ in the last bits.
  return [k for k, v in score.items() if v >= top - 1e-9 * max(1.0, abs(top))]


def _compare_key(key, tables, methods, regions, metric, wilcoxon_method) -> dict:
  """One row key's comparison: per region, the shared cases, each method's mean over them, the
  p-values against the first method (paired on them) and the best methods."""
  reference = methods[0]
  entry = {"n_cases": {}, "mean": {name: {} for name in methods},
           "p_value": {name: {} for name in methods[1:]}, "best": {}}
  for region in regions:
    cells = {name: t[key][region][metric] for name, t in tables.items()
             if region in t.get(key, {})}
    # Only the cases every method was scored on: a method without this cell shares none.
    common = (sorted(set.intersection(*(set(c) for c in cells.values())))
              if len(cells) == len(methods) else [])
    entry["n_cases"][region] = len(common)
    values = {name: [cells[name][c] for c in common] for name in cells}
    means = {name: _mean(values.get(name, [])) for name in methods}
    for name in methods:
      entry["mean"][name][region] = means[name]
      if name != reference:
        entry["p_value"][name][region] = (paired_wilcoxon(values[name], values[reference],
                                                          wilcoxon_method) if common else None)
    entry["best"][region] = _best({k: v for k, v in means.items() if v is not None}, metric)
  return entry


def compare(methods_rows, modalities, regions, metric="dice", wilcoxon_method="auto") -> dict:
  """Methods side by side per subset and region, wins per method, Wilcoxon p vs the first method.

  `methods_rows`: [(method name, rows), ...]; the first method is the reference. Each cell uses the
  cases every method was scored on for it (paired); where they share none, every mean is None.
  `wilcoxon_method` goes to `paired_wilcoxon`.
  Returns {"metric", "higher_is_better", "methods", "reference", "modalities", "regions",
  "subsets": {key: {"symbol", "modalities", "n_cases": {region: n}, "mean": {method: {region: v}},
  "p_value": {method: {region: p}} (methods after the first), "best": {region: [methods]}}},
  "as_acquired": the same without symbol and modalities (None without such rows; not counted in
  wins or the mean), "overall": {method: {region: mean over subsets}}, "wins": {method: n},
  "wins_by_region": {region: {method: n}}, "n_cells"}.
  """
  modalities, regions = list(modalities), list(regions)
  methods = [name for name, _ in methods_rows]
  if len(set(methods)) != len(methods) or not methods:
    raise ValueError(f"method names must be distinct and non-empty, got {methods}")
  tables = {name: _collect(rows, modalities, regions, [metric]) for name, rows in methods_rows}
  order = [subset_key(s, modalities) for s in all_subsets(modalities)]
  wins = {name: 0 for name in methods}
  wins_by_region = {r: {name: 0 for name in methods} for r in regions}
  subsets, n_cells = {}, 0
  for key in order:
    if not any(key in t for t in tables.values()):
      continue
    entry = {"symbol": subset_symbol(key, modalities),
             "modalities": list(parse_subset(key, modalities)),
             **_compare_key(key, tables, methods, regions, metric, wilcoxon_method)}
    for region in regions:
      n_cells += bool(entry["best"][region])
      for name in entry["best"][region]:
        wins[name] += 1
        wins_by_region[region][name] += 1
    subsets[key] = entry
  as_acquired = None
  if any(AS_ACQUIRED in t for t in tables.values()):
    as_acquired = _compare_key(AS_ACQUIRED, tables, methods, regions, metric, wilcoxon_method)
  overall = {name: {r: _mean([e["mean"][name][r] for e in subsets.values()
                              if e["mean"][name][r] is not None]) for r in regions}
             for name in methods}
  return {"metric": metric, "higher_is_better": HIGHER_IS_BETTER.get(metric, True),
          "methods": methods, "reference": methods[0], "modalities": modalities,
          "regions": regions, "subsets": subsets, "as_acquired": as_acquired, "overall": overall,
          "wins": wins, "wins_by_region": wins_by_region, "n_cells": n_cells}


def _fmt_p(p):
  if p is None:
    return "–"
  return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def comparison_markdown(comparison, title="Comparison") -> str:
  """Markdown: one table per region (methods as columns, best in bold, p vs the first), wins."""
  metric, methods, regions = comparison["metric"], comparison["methods"], comparison["regions"]
  modalities, reference = comparison["modalities"], comparison["reference"]
  names, aligns = _modality_header(modalities)
  others = methods[1:]
  lines = [f"# {title}: {METRIC_DISPLAY.get(metric, metric)}", "",
           "Mean over the cases all methods were scored on (n) per subset of present modalities "
           f"(● present, ○ missing; modality order {' '.join(names)}); best per row in bold. "
           f"p: two-sided Wilcoxon signed-rank test against {reference}, paired over those cases "
           "(1.000 when all differences are zero). The as acquired row scores each case with all "
           "the modalities it has (not in the mean or the wins).", ""]
  if comparison.get("metric_conventions") and metric in ("hd95", "assd"):
    lines += [conventions_line(comparison["metric_conventions"], metric), ""]

  def cells_of(entry, region):
    best = set(entry["best"][region])
    cells = []
    for name in methods:
      text = _fmt(entry["mean"][name][region], metric)
      cells.append(f"**{text}**" if name in best else text)
    return ([str(entry["n_cases"][region])] + cells
            + [_fmt_p(entry["p_value"][m][region]) for m in others])

  acquired = comparison.get("as_acquired")
  for region in regions:
    lines += [f"## {region}", "",
              _md_row(names + ["n"] + methods + [f"p ({m} vs {reference})" for m in others]),
              _md_row(aligns + ["-:"] * (1 + len(methods) + len(others)))]
    for entry in comparison["subsets"].values():
      lines.append(_md_row(_symbol_cells(entry["symbol"]) + cells_of(entry, region)))
    lines.append(_md_row(_label_cells("**mean**", modalities) + [""]
                         + [_fmt(comparison["overall"][m][region], metric) for m in methods]
                         + [""] * len(others)))
    if acquired:
      lines.append(_md_row(_label_cells(AS_ACQUIRED_DISPLAY, modalities)
                           + cells_of(acquired, region)))
    lines.append("")
  lines += ["## Wins", "",
            f"Subset x region cells where a method has the best mean (ties count for each tied "
            f"method), out of {comparison['n_cells']}.", "",
            _md_row(["method"] + regions + ["total"]),
            _md_row([":-"] + ["-:"] * (len(regions) + 1))]
  for name in methods:
    lines.append(_md_row([name] + [str(comparison["wins_by_region"][r][name]) for r in regions]
                         + [f"**{comparison['wins'][name]}**"]))
  lines.append("")
  return "\n".join(lines)


def write_comparison(out_dir, comparison, title="Comparison", name="comparison") -> None:
  """`name`.json and `name`.md in `out_dir` (atomic writes)."""
  atomic.write_text(os.path.join(out_dir, f"{name}.json"), json_text(comparison))
  atomic.write_text(os.path.join(out_dir, f"{name}.md"), comparison_markdown(comparison, title))
