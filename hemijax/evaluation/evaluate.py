"""Evaluating a trained workdir on every modality subset, in each case's original voxel grid.

For each case the per-modality encoders run once and every subset is fused and decoded from the
same features (`hemijax.inference.sliding_window`). A case is scored on the subsets of the
modalities its files have (a subset needing a modality the case lacks is not applicable to it, and
costs nothing), and once more "as acquired", with all the modalities it has. A case without a label
file is reported and left out. Results: cases.csv, summary.{md,json}, a Dice-by-subset bar chart
and overlay PNGs, written into a temporary folder that then replaces the report folder as a whole
(an interrupted run leaves the previous report intact, never a mix of two runs).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
from tqdm import tqdm

from hemijax import atomic
from hemijax.data import datasets, io, layouts, preprocess
from hemijax.data.case_ids import case_filename
from hemijax.evaluation import metrics, plots, tables
from hemijax.evaluation.subsets import (AS_ACQUIRED, all_subsets, applicable, default_subsets,
                                        held_modalities, parse_subset, subset_key, subset_symbol)
from hemijax.inference import sliding_window as inference
from hemijax.inference.predictor import Predictor, checkpoint_step
from hemijax.training import checkpoints

OVERLAY_CASES = 3
COMPARED_DISTANCES = ("assd", "hd95")  # besides Dice: comparison_<metric>.md/.json
SPLITS = ("train", "val", "test", "all")  # "all": every case, with or without splits.json
REPORT_MARKERS = ("summary.json", "cases.csv")  # a folder holding one of these is a report


# ---------------------------------------------------------------------------------------------
# Options (checked before anything long runs)


def parse_subsets_option(value: str, modalities) -> list[tuple[str, ...]]:
  """'all' or comma-separated subset keys such as 'flair+t1,t2' -> subsets (validated, each given
  once, in `all_subsets` order)."""
  if value in (None, "", "all"):
    return default_subsets(modalities)
  subsets = {}
  for text in value.split(","):
    try:
      subset = parse_subset(text.strip(), modalities)
    except (ValueError, KeyError) as e:
      raise ValueError(f"--subsets: {e}") from None
    if subset in subsets:
      raise ValueError(f"--subsets: {text.strip()!r} is the same subset as "
                       f"{subsets[subset]!r}; give each subset once")
    subsets[subset] = text.strip()
  order = all_subsets(modalities)
  return sorted(subsets, key=order.index)


def _check_split(split, config, root, layout) -> tuple[str | None, str | None]:
  """(split to load, None: every case; the split file used) for --split. A named split needs a
  split file for this dataset: its own splits.json, or the one the run recorded for it."""
  if split not in SPLITS:
    raise ValueError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
  if split == "all":
    return None, None
  choice = datasets.split_choice(config, root, layout)
  if choice.path is None:  # only a split made up now: it would pick cases silently
    raise ValueError(f"--split {split}: {root} has no split file (no {layouts.SPLITS_FILE}, and "
                     "the run recorded none for it); pass --split all to evaluate every case")
  return split, str(choice.path)


def check_metric_options(options, regions, unknown_regions="error") -> dict:
  """`metric_options` checked (`metrics.check_metric_options`) and against the task's regions
  (one-line errors naming the option), before anything is evaluated."""
  try:
    options = metrics.check_metric_options(options)
  except ValueError as e:
    raise ValueError(f"metric options: {e}") from None
  volumes = options["min_region_volume_mm3"]
  if unknown_regions == "ignore":
    volumes = {k: v for k, v in volumes.items() if k in regions}
  unknown = [name for name in volumes if name not in regions]
  if unknown:
    raise ValueError(f"min_region_volume_mm3: unknown region {unknown[0]!r}; this task's regions: "
                     f"{', '.join(regions)}")
  return dict(options, min_region_volume_mm3=volumes)


def parse_min_volume_option(values) -> dict:
  """`--min-volume ET=500 ...` -> {"ET": 500.0}."""
  out = {}
  for item in values or ():
    name, sep, value = str(item).partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep or not name.strip():
      raise ValueError(f"--min-volume: {item!r} is not REGION=MM3 (e.g. ET=500)")
  return out


def _check_out(out: pathlib.Path) -> None:
  """The report folder is replaced as a whole: refuse one that holds anything but a report."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out: {out} exists and is not a folder")
  if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in REPORT_MARKERS):
    raise ValueError(f"--out: {out} holds files that are not an evaluation report, and a report "
                     "replaces its folder as a whole; choose a new or empty folder")


def _compared_runs(workdir, others, saved: dict):
  """This run's column name, and (column name, workdir, cases.csv rows) of each --compare workdir;
  refuses one that cannot be compared (not evaluated, another task or other modalities)."""
  runs = []
  for other in map(pathlib.Path, others):
    path = other / "eval" / "cases.csv"
    if not path.is_file():
      raise ValueError(f"--compare: {path} not found; run evaluate.py --workdir {other} first")
    try:
      other_saved = checkpoints.load_config_dict(other)
    except ValueError as e:
      raise ValueError(f"--compare: {e}") from None
    # task=auto runs compare by the task they read (labels and regions), not by the word "auto".
    if (other_saved.get("task"), other_saved.get("task_spec")) != (saved.get("task"),
                                                                   saved.get("task_spec")):
      raise ValueError(f"--compare: {other} is a run of task {other_saved.get('task')!r}, not "
                       f"{saved.get('task')!r} as {workdir}; only runs of one task compare")
    if other_saved.get("modalities") != saved.get("modalities"):
      raise ValueError(f"--compare: {other} uses modalities {other_saved.get('modalities')}, "
                       f"not {saved.get('modalities')} as {workdir}")
    runs.append((other_saved.get("method", "?"), other, tables.read_cases_csv(path)))
  methods = [saved.get("method", "?")] + [method for method, _, _ in runs]
  folders = [pathlib.Path(workdir)] + [other for _, other, _ in runs]
  names = [f"{m} ({f.name})" for m, f in zip(methods, folders)]
  if len(set(names)) != len(names):  # two workdirs of one name: name them by path
    names = [f"{m} ({f})" for m, f in zip(methods, folders)]
  if len(set(names)) != len(names):
    raise ValueError(f"--compare: a workdir is given twice ({', '.join(map(str, folders))})")
  return names[0], [(name, other, rows) for name, (_, other, rows) in zip(names[1:], runs)]


def _evaluated_data(other) -> str | None:
  """The dataset folder an earlier evaluation of `other` recorded (None: not recorded)."""
  try:
    return json.loads((pathlib.Path(other) / "eval" / "summary.json").read_text()).get("data")
  except (OSError, ValueError, AttributeError):
    return None


def _same_folder(a, b) -> bool:
  return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


# ---------------------------------------------------------------------------------------------
# Scoring


def _score_case(predictor, vol, truth, spacing, chosen, metric_options):
  """Rows of one case on each applicable subset of `chosen` and as acquired; predictions (class
  ids, preprocessed grid) of its single-modality subsets and as acquired, for overlays."""
  modalities, task = predictor.modalities, predictor.task
  held = held_modalities(vol.available, modalities)
  own = applicable(chosen, held)
  # Only the masks this case can have; as acquired reuses its subset's prediction when requested.
  decoded = own if held in own else own + [held]
  probs = predictor.probabilities(vol.image, inference.subset_masks(decoded, modalities))
  class_maps = np.argmax(probs, axis=-1)
  del probs
  rows, by_subset = [], {}
  for subset, class_map in zip(decoded, class_maps):
    pred = preprocess.class_ids_to_label_values(
        preprocess.to_original_grid(vol.transform, class_map, order=0), task.label_values)
    by_subset[subset] = metrics.case_metrics(pred, truth, spacing, task.regions, **metric_options)
    if subset in own:
      rows += tables.case_rows(vol.case_id, subset, by_subset[subset], modalities, acquired=held)
  rows += tables.case_rows(vol.case_id, AS_ACQUIRED, by_subset[held], modalities, acquired=held)
  shown = {subset_symbol(s, modalities): m for s, m in zip(decoded, class_maps)
           if len(s) == 1 and s in own}
  shown[f"{subset_symbol(held, modalities)} as acquired"] = class_maps[decoded.index(held)]
  return rows, shown


def _partial_path(out: pathlib.Path) -> pathlib.Path:
  """The scored cases of an unfinished evaluation: beside the report folder, which is replaced
  as a whole."""
  return out.parent / f".{out.name}.cases.partial.jsonl"


def _jsonl(entry) -> str:
  return json.dumps(entry, default=float) + "\n"  # metric values may be NumPy scalars


def _scored_before(path: pathlib.Path, header: dict) -> dict[str, list[dict]]:
  """Case id -> rows of the cases an interrupted evaluation with the same `header` (checkpoint,
  data, split, subsets, metric options) scored; {} for any other or none."""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except FileNotFoundError:
    return {}
  try:
    if not lines or json.loads(lines[0]) != header:
      return {}
  except json.JSONDecodeError:
    return {}
  done = {}
  for line in lines[1:]:
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:  # the line being written when the process stopped
      break
    done[entry["case_id"]] = entry["rows"]
  return done


def _write_overlays(out, overlays, predictor):
  task = predictor.task
  to_values = lambda m: preprocess.class_ids_to_label_values(m, task.label_values)
  for vol, predictions in overlays:
    plots.plot_overlays(out / ("overlay_" + case_filename(vol.case_id, ".png")), vol.image,
                        to_values(vol.label), {k: to_values(v) for k, v in predictions.items()},
                        predictor.modalities, label_values=task.label_values,
                        class_names=task.class_names, title=vol.case_id)


def evaluate_workdir(workdir, *, data=None, layout="auto", split="test", subsets="all", out=None,
                     compare=(), step="best", metric_options=None, unknown_regions="error",
                     progress=True) -> dict:
  """Evaluates `workdir`'s checkpoint; returns the summary (and writes the report files).

  `split`: "train", "val", "test" (as listed in the dataset's splits.json or the split file the run
  recorded for this dataset; refused without one) or "all". `subsets`: "all" or comma-separated subset keys; an explicitly requested subset that no
  case has all the modalities of is refused. `compare`: workdirs evaluated before, of the same
  task and sharing cases with this evaluation. `metric_options`: `hd95_convention`,
  `empty_penalty` and `min_region_volume_mm3` of `metrics.case_metrics` (defaults: the BraTS
  directed-maximum HD95, the 373.13 mm penalty, no post-processing); recorded in the summary.
  `unknown_regions="ignore"` drops thresholds of regions this task lacks (a study mixes tasks).
  """
  step = checkpoint_step(step)
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out) if out else workdir / "eval"
  _check_out(out)
  # Everything that can be checked before the long evaluation is.
  first_name, others = _compared_runs(workdir, compare, checkpoints.load_config_dict(workdir))
  predictor = Predictor(workdir, step)
  config, task, modalities = predictor.config, predictor.task, predictor.modalities
  regions = tuple(task.regions)
  metric_options = check_metric_options(metric_options, regions, unknown_regions)
  chosen = parse_subsets_option(subsets, modalities)
  root = pathlib.Path(data) if data else datasets.dataset_root(config)
  if not root.is_dir():
    raise ValueError(f"--data: {root} is not a folder")
  split_to_load, split_file = _check_split(split, config, root, layout)
  labels = datasets.label_mapping(config, root, layout)  # the dataset's label values -> the task's
  where = f"{root} ({split})"
  volumes = datasets.load_split(config, split_to_load, root=root, layout=layout)
  label_files = {c.case_id: c.label for c in layouts.discover_cases(root, layout, modalities)}

  left_out = {v.case_id: "no label file" for v in volumes if label_files.get(v.case_id) is None}
  for case_id, why in left_out.items():
    print(f"warning: {where}: case {case_id} left out of the evaluation ({why})", file=sys.stderr)
  scored = [v for v in volumes if v.case_id not in left_out]
  if not scored:
    raise ValueError(f"{where}: no case with a label file to evaluate against")
  held = [held_modalities(v.available, modalities) for v in scored]
  not_applicable = [s for s in chosen if not any(set(s) <= set(h) for h in held)]
  if not_applicable and subsets not in (None, "", "all"):
    raise ValueError(f"--subsets: no case of {where} has all the modalities of "
                     f"{', '.join(subset_key(s, modalities) for s in not_applicable)}")
  if len(not_applicable) == len(chosen):  # every subset needs a modality no case has
    raise ValueError(f"{where}: no case has all the modalities of any requested subset")
  case_ids = {v.case_id for v in scored}
  for _, other, other_rows in others:
    other_data = _evaluated_data(other)
    if other_data is not None and not _same_folder(other_data, root):
      raise ValueError(f"--compare: {other} was evaluated on {other_data}, not {root}; evaluate "
                       "it on the same data first")
    if not case_ids & {str(r["case_id"]) for r in other_rows}:
      raise ValueError(f"--compare: {other} was evaluated on no case of {where} "
                       f"({len(case_ids)} case(s)); evaluate it on the same data first")

  # Each scored case is appended to a file beside the report, so that an interrupted evaluation
  # (3D models on many cases take hours on CPU) resumes with the cases it has not scored yet.
  partial = _partial_path(out)
  header = json.loads(json.dumps(dict(
      workdir=str(workdir.resolve()), step=predictor.step, data=str(root.resolve()), layout=layout,
      split=split, subsets=[subset_key(s, modalities) for s in chosen],
      metric_options=metric_options), default=str))
  done = _scored_before(partial, header)
  if done:
    print(f"{where}: resuming, {len(done)} of {len(scored)} case(s) scored before "
          f"({partial.name})", file=sys.stderr)
  # Rewritten whole: without another evaluation's entries or a line cut short by an interruption.
  partial.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(partial, "".join(_jsonl(entry) for entry in [header] + [
      {"case_id": case_id, "rows": case_rows} for case_id, case_rows in done.items()]))
  rows, overlays = [], []
  for vol in tqdm(scored, desc=f"evaluate {workdir.name}", disable=not progress):
    if vol.case_id in done and len(overlays) >= OVERLAY_CASES:
      rows += done[vol.case_id]
      continue
    truth, affine, _ = io.load_nifti(label_files[vol.case_id], label=True)
    try:
      truth = labels.to_task_values(truth)
    except ValueError as e:
      raise ValueError(f"{label_files[vol.case_id]}: {e}") from None
    case_rows, shown = _score_case(predictor, vol, truth, preprocess.spacing_of(affine), chosen,
                                   metric_options)
    rows += case_rows
    if len(overlays) < OVERLAY_CASES:  # overlays need the predictions: those cases are rescored
      overlays.append((vol, shown))
    if vol.case_id not in done:
      with open(partial, "a", encoding="utf-8") as f:
        f.write(_jsonl({"case_id": vol.case_id, "rows": case_rows}))

  conventions = metrics.metric_conventions(**metric_options)
  summary = tables.summarise(rows, modalities, regions)
  summary.update(workdir=str(workdir), method=config.method, split=split, split_file=split_file,
                 step=predictor.step, step_requested=step, data=str(root.absolute()),
                 metric_conventions=conventions,
                 left_out=left_out,
                 not_applicable=[f"{subset_symbol(s, modalities)} {subset_key(s, modalities)}"
                                 for s in not_applicable])
  title = f"{config.method} on {root.name} ({split}), checkpoint step {predictor.step}"
  with atomic.replacing_directory(out) as tmp:
    relocate = lambda value: (str(out / pathlib.Path(value).relative_to(tmp))
                              if isinstance(value, str) and value.startswith(f"{tmp}{os.sep}")
                              else value)
    tables.write_cases_csv(tmp / "cases.csv", rows)
    plots.plot_dice_by_subset(tmp / "dice_by_subset.png", summary)
    _write_overlays(tmp, overlays, predictor)
    reports = [str(out / "summary.md")]
    for evaluator in predictor.method.evaluators:  # the method's own reports (synthesis, ...)
      entries = evaluator(predictor, volumes, tmp, title=where, progress=progress)
      if "report" in entries:
        reports.append(relocate(entries.pop("report")))
      summary.update({k: relocate(v) for k, v in entries.items()})
    if others:
      methods_rows = [(first_name, rows)] + [(name, other_rows) for name, _, other_rows in others]
      # The surface distances side by side too (the papers report ASSD and HD95 beside Dice).
      for metric in ("dice",) + COMPARED_DISTANCES:
        comparison = tables.compare(methods_rows, modalities, regions, metric=metric,
                                    wilcoxon_method="auto")
        comparison["metric_conventions"] = conventions
        name = "comparison" if metric == "dice" else f"comparison_{metric}"
        tables.write_comparison(tmp, comparison, title=f"Comparison on {where}", name=name)
      summary["comparison"] = str(out / "comparison.md")
      reports.append(summary["comparison"])
    summary["reports"] = reports
    tables.write_summary(tmp, summary, title=title)
  partial.unlink(missing_ok=True)
  return summary
