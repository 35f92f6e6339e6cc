"""Evaluation reports over modality subsets: per-case CSV, summaries, method comparisons and plots.

A *row* is one case x subset x region: `{"case_id", "subset", "region", *METRIC_NAMES}`. `subset`
is a subset key: the present modality names joined by "+" in the model's modality order
("flair+t1ce").
Subsets are shown in the papers' notation, one symbol per model modality in model order: ● present,
○ missing (HeMIS Table 3, URN, RFNet, mmFormer).

Subset order (`all_subsets`): by number of present modalities ascending (single modalities first,
the full set last), then lexicographic in model modality order (`itertools.combinations` order).

Averages: a subset's mean/std are over its cases (population std, ddof=0, so one case gives 0);
the "mean" row / `overall` is the unweighted mean of the per-subset means (the papers' average).

Comparisons (`compare`): for each subset x region cell, every method's mean over the cases that all
methods have for that cell; the best mean wins the cell (ties count a win for every tied method;
"best" is the highest for dice/sensitivity/precision, the lowest for distances, the closest to 0 for
volume_diff_ml). The p-value is the two-sided Wilcoxon signed-rank test (scipy, zero differences
dropped) pairing each method's per-case values with the first method's. When every paired difference
is zero scipy has no statistic (it warns and returns NaN, or raises); we report p = 1.0 there (no
evidence of a difference), and also for any other degenerate sample scipy cannot test.

Files are written to a temporary name in the target folder, then renamed (never half-written).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import warnings

import numpy as np
from scipy import stats

from hemijax import atomic
from hemijax.evaluation.metrics import HIGHER_IS_BETTER, METRIC_NAMES

PRESENT, MISSING = "●", "○"
MODALITY_DISPLAY = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
METRIC_DISPLAY = {"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)",
                  "sensitivity": "Sensitivity", "precision": "Precision",
                  "volume_diff_ml": "Volume difference (mL, pred - truth)"}
METRIC_DECIMALS = {"dice": 3, "sensitivity": 3, "precision": 3, "hd95": 2, "assd": 2,
                   "volume_diff_ml": 2}
CSV_FIELDS = ("case_id", "subset", "region") + METRIC_NAMES
# Label colours for overlays (BraTS habit: necrotic core red, edema green, enhancing yellow).
LABEL_COLOURS = ("#e41a1c", "#4daf4a", "#ffd92f", "#377eb8", "#984ea3", "#ff7f00", "#a65628",
                 "#f781bf")


# ---------------------------------------------------------------------------------------------
# Subsets


def display_name(modality: str) -> str:
  """Name as printed in tables ("flair" -> "FLAIR")."""
  return MODALITY_DISPLAY.get(modality, modality.upper())


def all_subsets(modalities) -> list[tuple[str, ...]]:
  """Every non-empty subset (2^M - 1): fewest present first, then lexicographic in model order."""
  modalities = tuple(modalities)
  return [subset for size in range(1, len(modalities) + 1)
          for subset in itertools.combinations(modalities, size)]


def parse_subset(subset, modalities) -> tuple[str, ...]:
  """Subset key ("flair+t1") or sequence of names -> tuple in model modality order (validated)."""
  names = subset.split("+") if isinstance(subset, str) else list(subset)
  unknown = [n for n in names if n not in modalities]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(f"subset {subset!r} is not a non-empty subset of {list(modalities)}")
  return tuple(m for m in modalities if m in names)


def subset_key(subset, modalities) -> str:
  """Canonical key of a subset: present names joined by "+" in model modality order."""
  return "+".join(parse_subset(subset, modalities))


def subset_symbol(subset, modalities) -> str:
  """"●○●●": one symbol per model modality, in model order (● present, ○ missing)."""
  present = parse_subset(subset, modalities)
  return "".join(PRESENT if m in present else MISSING for m in modalities)


# ---------------------------------------------------------------------------------------------
# Rows and cases.csv


def case_rows(case_id, subset, metrics_by_region, modalities) -> list[dict]:
  """Rows for one case and subset from `metrics.case_metrics` output (region -> metric -> value)."""
  key = subset_key(subset, modalities)
  return [{"case_id": str(case_id), "subset": key, "region": region, **values}
          for region, values in metrics_by_region.items()]


def _json_text(obj) -> str:
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
  """subset key -> region -> metric -> {case_id: value}, subsets in `all_subsets` order."""
  regions = list(regions)
  table, seen = {}, set()
  for row in rows:
    key = subset_key(row["subset"], modalities)
    region, case_id = row["region"], str(row["case_id"])
    if region not in regions:
      continue  # a region this report does not show
    if (case_id, key, region) in seen:
      raise ValueError(f"duplicate row for case {case_id!r}, subset {key!r}, region {region!r}")
    seen.add((case_id, key, region))
    cell = table.setdefault(key, {}).setdefault(region, {m: {} for m in metrics})
    for metric in metrics:
      cell[metric][case_id] = float(row[metric])
  order = [subset_key(s, modalities) for s in all_subsets(modalities)]
  return {key: table[key] for key in order if key in table}


# ---------------------------------------------------------------------------------------------
# Summary


def _mean(values):
  return float(np.mean(values)) if len(values) else None


def _std(values):
  return float(np.std(values)) if len(values) else None


def summarise(rows, modalities, regions, metrics=METRIC_NAMES) -> dict:
  """Per-subset mean/std over cases of every metric and region, and the mean over subsets.

  Returns {"modalities", "regions", "metrics", "subsets": {key: {"symbol", "modalities", "n_cases",
  "mean": {region: {metric: value}}, "std": ...}}, "overall": {"n_subsets", "n_cases", "mean"}}.
  Values are None where a subset has no rows for a region.
  """
  modalities, regions, metrics = list(modalities), list(regions), list(metrics)
  table = _collect(rows, modalities, regions, metrics)
  subsets, all_cases = {}, set()
  for key, by_region in table.items():
    cases = set()
    for cell in by_region.values():
      cases |= set(cell[metrics[0]]) if metrics else set()
    all_cases |= cases
    empty = {m: {} for m in metrics}
    subsets[key] = {
        "symbol": subset_symbol(key, modalities),
        "modalities": list(parse_subset(key, modalities)),
        "n_cases": len(cases),
        "mean": {r: {m: _mean(list(by_region.get(r, empty)[m].values())) for m in metrics}
                 for r in regions},
        "std": {r: {m: _std(list(by_region.get(r, empty)[m].values())) for m in metrics}
                for r in regions},
    }
  overall = {r: {m: _mean([s["mean"][r][m] for s in subsets.values()
                           if s["mean"][r][m] is not None]) for m in metrics} for r in regions}
  return {"modalities": modalities, "regions": regions, "metrics": metrics, "subsets": subsets,
          "overall": {"n_subsets": len(subsets), "n_cases": len(all_cases), "mean": overall}}


def _fmt(value, metric):
  return "–" if value is None else f"{value:.{METRIC_DECIMALS.get(metric, 3)}f}"


def _md_row(cells):
  return "| " + " | ".join(cells) + " |"


def _modality_header(modalities):
  return [display_name(m) for m in modalities], [":-:"] * len(modalities)


def _symbol_cells(symbol):
  return list(symbol)


def summary_markdown(summary, title="Evaluation") -> str:
  """Markdown: a Dice table (rows = subsets in ● ○ notation, columns = regions) then the others."""
  modalities, regions = summary["modalities"], summary["regions"]
  names, aligns = _modality_header(modalities)
  lines = [f"# {title}", "",
           f"Mean over cases per subset of present modalities (● present, ○ missing; modality "
           f"order {' '.join(names)}). {summary['overall']['n_cases']} case(s), "
           f"{summary['overall']['n_subsets']} subset(s); the mean row averages the subsets. "
           "Standard deviations are in summary.json.", ""]
  for metric in summary["metrics"]:
    lines += [f"## {METRIC_DISPLAY.get(metric, metric)}", "",
              _md_row(names + ["n"] + regions), _md_row(aligns + ["-:"] * (1 + len(regions)))]
    for entry in summary["subsets"].values():
      lines.append(_md_row(_symbol_cells(entry["symbol"]) + [str(entry["n_cases"])]
                           + [_fmt(entry["mean"][r][metric], metric) for r in regions]))
    lines.append(_md_row(["**mean**"] + [""] * len(modalities)
                         + [f"**{_fmt(summary['overall']['mean'][r][metric], metric)}**"
                            for r in regions]))
    lines.append("")
  return "\n".join(lines)


def write_summary(out_dir, summary, title="Evaluation") -> None:
  """summary.json and summary.md in `out_dir` (atomic writes)."""
  atomic.write_text(os.path.join(out_dir, "summary.json"), _json_text(summary))
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


def compare(methods_rows, modalities, regions, metric="dice", wilcoxon_method="auto") -> dict:
  """Methods side by side per subset and region, wins per method, Wilcoxon p vs the first method.

  `methods_rows`: [(method name, rows), ...]; the first method is the reference. Each cell uses the
  cases every method has for it (paired); a method without rows for a cell gets None there.
  `wilcoxon_method` goes to `paired_wilcoxon`.
  Returns {"metric", "higher_is_better", "methods", "reference", "modalities", "regions",
  "subsets": {key: {"symbol", "modalities", "n_cases": {region: n}, "mean": {method: {region: v}},
  "p_value": {method: {region: p}} (methods after the first), "best": {region: [methods]}}},
  "overall": {method: {region: mean over subsets}}, "wins": {method: n}, "wins_by_region":
  {region: {method: n}}, "n_cells"}.
  """
  modalities, regions = list(modalities), list(regions)
  methods = [name for name, _ in methods_rows]
  if len(set(methods)) != len(methods) or not methods:
    raise ValueError(f"method names must be distinct and non-empty, got {methods}")
  tables = {name: _collect(rows, modalities, regions, [metric]) for name, rows in methods_rows}
  order = [subset_key(s, modalities) for s in all_subsets(modalities)]
  reference = methods[0]
  wins = {name: 0 for name in methods}
  wins_by_region = {r: {name: 0 for name in methods} for r in regions}
  subsets, n_cells = {}, 0
  for key in order:
    if not any(key in t for t in tables.values()):
      continue
    entry = {"symbol": subset_symbol(key, modalities),
             "modalities": list(parse_subset(key, modalities)), "n_cases": {},
             "mean": {name: {} for name in methods},
             "p_value": {name: {} for name in methods[1:]}, "best": {}}
    for region in regions:
      cells = {name: t[key][region][metric] for name, t in tables.items()
               if region in t.get(key, {})}
      common = sorted(set.intersection(*(set(c) for c in cells.values()))) if cells else []
      entry["n_cases"][region] = len(common)
      means = {}
      for name in methods:
        values = [cells[name][c] for c in common] if name in cells and common else []
        means[name] = _mean(values)
        entry["mean"][name][region] = means[name]
        if name != reference:
          ref = [cells[reference][c] for c in common] if reference in cells else []
          p = paired_wilcoxon(values, ref, wilcoxon_method) if ref and values else None
          entry["p_value"][name][region] = p
      present = {k: v for k, v in means.items() if v is not None}
      entry["best"][region] = _best(present, metric)
      if present:
        n_cells += 1
      for name in entry["best"][region]:
        wins[name] += 1
        wins_by_region[region][name] += 1
    subsets[key] = entry
  overall = {name: {r: _mean([e["mean"][name][r] for e in subsets.values()
                              if e["mean"][name][r] is not None]) for r in regions}
             for name in methods}
  return {"metric": metric, "higher_is_better": HIGHER_IS_BETTER.get(metric, True),
          "methods": methods, "reference": reference, "modalities": modalities,
          "regions": regions, "subsets": subsets, "overall": overall, "wins": wins,
          "wins_by_region": wins_by_region, "n_cells": n_cells}


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
           "Mean over the cases all methods share (n) per subset of present modalities "
           f"(● present, ○ missing; modality order {' '.join(names)}); best per row in bold. "
           f"p: two-sided Wilcoxon signed-rank test against {reference}, paired over cases "
           "(1.000 when all differences are zero).", ""]
  for region in regions:
    lines += [f"## {region}", "",
              _md_row(names + ["n"] + methods + [f"p ({m} vs {reference})" for m in others]),
              _md_row(aligns + ["-:"] * (1 + len(methods) + len(others)))]
    for entry in comparison["subsets"].values():
      best = set(entry["best"][region])
      cells = []
      for name in methods:
        text = _fmt(entry["mean"][name][region], metric)
        cells.append(f"**{text}**" if name in best else text)
      lines.append(_md_row(_symbol_cells(entry["symbol"]) + [str(entry["n_cases"][region])] + cells
                           + [_fmt_p(entry["p_value"][m][region]) for m in others]))
    lines.append(_md_row(["**mean**"] + [""] * len(modalities)
                         + [_fmt(comparison["overall"][m][region], metric) for m in methods]
                         + [""] * len(others)))
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
  atomic.write_text(os.path.join(out_dir, f"{name}.json"), _json_text(comparison))
  atomic.write_text(os.path.join(out_dir, f"{name}.md"), comparison_markdown(comparison, title))


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib object API with the Agg canvas: no global pyplot state, no display needed)


def _save_figure(fig, path, dpi=110):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
  atomic.write_bytes(path, buffer.getvalue())


def _new_figure(width, height):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def plot_training_curves(path, metrics_jsonl) -> None:
  """Training loss and validation Dice against step, from a run's metrics.jsonl."""
  records = [json.loads(line) for line in open(metrics_jsonl) if line.strip()]
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  fig = _new_figure(10, 3.5)
  loss_ax, val_ax = fig.subplots(1, 2)
  loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train])
  loss_ax.set(xlabel="step", ylabel="training loss", yscale="log")
  for key in ("val_dice_all", "val_dice_dropped"):
    val_ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=key)
  val_ax.set(xlabel="step", ylabel="validation Dice", ylim=(0, 1))
  val_ax.legend()
  fig.tight_layout()
  _save_figure(fig, path)


def plot_dice_by_subset(path, summary, metric="dice", title=None) -> None:
  """Bar chart PNG: one group per subset (● ○ labels), one bar per region, std as error bars."""
  regions, entries = summary["regions"], list(summary["subsets"].values())
  names = " ".join(display_name(m) for m in summary["modalities"])
  fig = _new_figure(max(6.0, 0.22 * len(entries) * (len(regions) + 1) + 1.5), 4.0)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(entries))
  width = 0.8 / max(len(regions), 1)
  for i, region in enumerate(regions):
    means = [np.nan if e["mean"][region][metric] is None else e["mean"][region][metric]
             for e in entries]
    stds = [0.0 if e["std"][region][metric] is None else e["std"][region][metric] for e in entries]
    ax.bar(x + (i - (len(regions) - 1) / 2) * width, means, width, yerr=stds, capsize=1.5,
           label=region, error_kw={"elinewidth": 0.6, "alpha": 0.6})
  ax.set_xticks(x)
  ax.set_xticklabels([e["symbol"] for e in entries], fontsize=9)
  ax.set_xlabel(f"modalities present (● present, ○ missing; order {names})")
  ax.set_ylabel(f"mean {METRIC_DISPLAY.get(metric, metric)}")
  if metric in ("dice", "sensitivity", "precision"):
    ax.set_ylim(0.0, 1.05)
  ax.grid(axis="y", alpha=0.3)
  ax.set_axisbelow(True)
  ax.legend(title="region", fontsize=8, loc="upper left", ncol=len(regions))
  ax.set_title(title or f"{METRIC_DISPLAY.get(metric, metric)} by subset of modalities")
  _save_figure(fig, path)


def _normalise_slice(image_slice):
  # Robust window: missing (all-zero) channels stay black instead of dividing by zero.
  lo, hi = np.percentile(image_slice, [1, 99])
  if hi <= lo:
    return np.zeros_like(image_slice, dtype=float)
  return np.clip((image_slice - lo) / (hi - lo), 0.0, 1.0)


def _label_rgba(label_slice, values, alpha=0.55):
  from matplotlib.colors import to_rgb
  rgba = np.zeros(label_slice.shape + (4,))
  for i, value in enumerate(values):
    rgba[label_slice == value] = (*to_rgb(LABEL_COLOURS[i % len(LABEL_COLOURS)]), alpha)
  return rgba


def plot_overlays(path, image, truth, predictions, modality_names, slice_index=None,
                  label_values=None, class_names=None, title=None) -> None:
  """PNG: an axial slice of each modality, then truth and each prediction over the first modality.

  `image` is channels-last (X, Y, Z, M) in `modality_names` order; `truth` and each prediction
  (title -> label map, e.g. subset symbol -> prediction) are (X, Y, Z) in file label values. The
  axial slice is along the last spatial axis; by default the one with the most truth foreground.
  Labels are coloured by `label_values` (default: the values found; 0 = background, transparent);
  `class_names` (one per label value, e.g. `Task.class_names`) label the legend.
  """
  from matplotlib.patches import Patch
  image, truth = np.asarray(image, float), np.asarray(truth)
  if image.ndim != truth.ndim + 1 or image.shape[:-1] != truth.shape:
    raise ValueError(f"image {image.shape} must be truth {truth.shape} plus a channel axis")
  if image.shape[-1] != len(modality_names):
    raise ValueError(f"{image.shape[-1]} channels but {len(modality_names)} modality names")
  if slice_index is None:
    counts = (truth != 0).sum(axis=tuple(range(truth.ndim - 1)))
    slice_index = int(np.argmax(counts)) if counts.any() else truth.shape[-1] // 2
  if class_names is not None and label_values is None:
    raise ValueError("class_names need the label_values they name")
  if label_values is None:
    found = set(np.unique(truth).tolist())
    for pred in predictions.values():
      found |= set(np.unique(np.asarray(pred)).tolist())
    label_values = sorted(found | {0})
  foreground = [v for v in label_values if v != 0]
  if class_names is None:
    names = [f"label {v}" for v in foreground]
  else:
    names = [n for v, n in zip(label_values, class_names) if v != 0]

  # Panels: modalities in the first row, truth and predictions in the second.
  n_mod, n_lab = len(modality_names), 1 + len(predictions)
  ncols = max(n_mod, n_lab)
  fig = _new_figure(2.4 * ncols, 2.4 * 2 + 0.6)
  base = _normalise_slice(image[..., slice_index, 0])
  panels = [(0, i, display_name(m), _normalise_slice(image[..., slice_index, i]), None)
            for i, m in enumerate(modality_names)]
  panels.append((1, 0, "truth", base, truth[..., slice_index]))
  for j, (name, pred) in enumerate(predictions.items()):
    panels.append((1, j + 1, str(name), base, np.asarray(pred)[..., slice_index]))
  axes = fig.subplots(2, ncols, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for row, col, name, gray, labels in panels:
    ax = axes[row, col]
    # Transpose + origin="lower": first axis left-right, second axis up (radiological habit).
    ax.imshow(gray.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0, interpolation="nearest")
    if labels is not None:
      ax.imshow(_label_rgba(labels, foreground).transpose(1, 0, 2), origin="lower",
                interpolation="nearest")
    ax.set_title(name, fontsize=9)
  handles = [Patch(color=LABEL_COLOURS[i % len(LABEL_COLOURS)], label=n)
             for i, n in enumerate(names)]
  if handles:
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
  fig.suptitle(title or f"axial slice {slice_index}", fontsize=10)
  _save_figure(fig, path)
