"""Evaluating a trained workdir on every modality subset, in each case's original voxel grid.

For each case the per-modality encoders run once and every subset is fused and decoded from the
same features (`hemijax.inference.sliding_window`). A subset is evaluated on the cases that have all of its
modalities. Results: cases.csv, summary.{md,json}, a Dice-by-subset bar chart and overlay PNGs.
"""
from __future__ import annotations

import pathlib

import numpy as np
from tqdm import tqdm

from hemijax.evaluation import report as evaluation
from hemijax.inference import sliding_window as inference
from hemijax.evaluation import metrics
from hemijax.data import datasets, io, layouts, preprocess
from hemijax.inference.predictor import Predictor

OVERLAY_CASES = 3
COMPARED_DISTANCES = ("assd", "hd95")  # besides Dice: comparison_<metric>.md/.json


def parse_subsets_option(value: str, modalities) -> list[tuple[str, ...]]:
  """'all' or comma-separated subset keys such as 'flair+t1,t2' (validated, model order)."""
  if value in (None, "", "all"):
    return evaluation.all_subsets(modalities)
  subsets = []
  for key in value.split(","):
    try:
      subsets.append(evaluation.parse_subset(key.strip(), modalities))
    except (ValueError, KeyError) as e:
      raise ValueError(f"--subsets: {e}") from None
  return subsets


def evaluate_workdir(workdir, *, data=None, layout="auto", split="test", subsets="all", out=None,
                     compare=(), step="best", progress=True) -> dict:
  """Evaluates `workdir`'s checkpoint; returns the summary (and writes the report files)."""
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out) if out else workdir / "eval"
  for other in compare:  # fail before the long evaluation, not after it
    if not (pathlib.Path(other) / "eval" / "cases.csv").is_file():
      raise ValueError(f"--compare: {pathlib.Path(other) / 'eval' / 'cases.csv'} not found; run "
                       f"evaluate.py --workdir {other} first")
  predictor = Predictor(workdir, step)
  config, task, modalities = predictor.config, predictor.task, predictor.modalities
  root = pathlib.Path(data) if data else datasets.dataset_root(config)
  if not root.is_dir():
    raise ValueError(f"--data: {root} is not a folder")
  if layouts.read_splits(root) is None:
    split = None  # a user's folder without splits.json: every case is a test case
  chosen = parse_subsets_option(subsets, modalities)
  masks = inference.subset_masks(chosen, modalities)
  volumes = datasets.load_split(config, split, root=root, layout=layout)
  label_files = {c.case_id: c.label for c in layouts.discover_cases(root, layout, modalities)}

  rows, overlays = [], []
  for vol in tqdm(volumes, desc=f"evaluate {workdir.name}", disable=not progress):
    label_path = label_files.get(vol.case_id)
    if label_path is None:
      raise ValueError(f"{root}: case {vol.case_id} has no label file to evaluate against")
    truth, affine, _ = io.load_nifti(label_path, label=True)
    spacing = preprocess.spacing_of(affine)
    usable = np.all(~masks | vol.available[None], axis=1)  # subsets this case has all of
    probs = predictor.probabilities(vol.image, masks & vol.available[None])
    class_maps = np.argmax(probs, axis=-1)
    for subset, ok, class_map in zip(chosen, usable, class_maps):
      if not ok:
        continue
      pred = preprocess.class_ids_to_label_values(
          preprocess.to_original_grid(vol.transform, class_map, order=0), task.label_values)
      case = metrics.case_metrics(pred, truth, spacing, task.regions)
      rows.extend(evaluation.case_rows(vol.case_id, subset, case, modalities))
    if len(overlays) < OVERLAY_CASES and usable[-1]:
      overlays.append((vol, {evaluation.subset_symbol(s, modalities): class_maps[i]
                             for i, s in enumerate(chosen) if len(s) in (1, len(modalities))}))
  if not rows:
    raise ValueError(f"{root}: no case with a label had the modalities of any requested subset")

  regions = tuple(task.regions)
  summary = evaluation.summarise(rows, modalities, regions)
  summary["workdir"] = str(workdir)
  summary["method"] = config.method
  summary["split"] = split
  evaluation.write_cases_csv(out / "cases.csv", rows)
  evaluation.plot_dice_by_subset(out / "dice_by_subset.png", summary)
  for vol, preds in overlays:
    to_values = lambda m: preprocess.class_ids_to_label_values(m, task.label_values)
    evaluation.plot_overlays(out / f"overlay_{vol.case_id}.png", vol.image, to_values(vol.label),
                             {k: to_values(v) for k, v in preds.items()}, modalities,
                             label_values=task.label_values, class_names=task.class_names)
  reports = []
  for evaluator in predictor.method.evaluators:  # the method's own reports (synthesis, ...)
    entries = evaluator(predictor, volumes, out, title=f"{root.name} ({split or 'all'})",
                        progress=progress)
    if "report" in entries:
      reports.append(entries.pop("report"))
    summary.update(entries)
  if compare:
    methods_rows = [(f"{config.method} ({workdir.name})", rows)]
    for other in compare:
      path = pathlib.Path(other) / "eval" / "cases.csv"
      other_config = predictor_config_name(other)
      methods_rows.append((f"{other_config} ({pathlib.Path(other).name})",
                           evaluation.read_cases_csv(path)))
    comparison = evaluation.compare(methods_rows, modalities, regions, wilcoxon_method="auto")
    evaluation.write_comparison(out, comparison)
    summary["comparison"] = str(out / "comparison.md")
    reports.append(summary["comparison"])
    # The surface distances side by side too (the papers report ASSD and HD95 beside Dice).
    for metric in COMPARED_DISTANCES:
      evaluation.write_comparison(
          out, evaluation.compare(methods_rows, modalities, regions, metric=metric,
                                  wilcoxon_method="auto"), name=f"comparison_{metric}")
  summary["reports"] = reports
  evaluation.write_summary(out, summary, title=f"{config.method} on {root.name} ({split or 'all'})")
  return summary


def predictor_config_name(workdir) -> str:
  from hemijax.training.checkpoints import load_config_dict
  return load_config_dict(workdir).get("method", "?")
