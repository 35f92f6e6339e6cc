r"""Synthesis quality of models with synthesis decoders (URN): the URN paper's Table 2.

For every case and every non-empty subset S of its modalities that lacks at least one of them,
each modality t the case holds but S lacks is synthesised from S (per-modality encoders run once
per window; every subset is fused and decoded from the same features) and compared with the real
image inside the brain, on the preprocessed (normalised) intensities:

  PSNR = 10 log10(range^2 / MSE),  range = max - min of the real image t inside the brain.

`python evaluate.py --workdir runs/urn` (this method's evaluator, `synthesis_evaluator`)
writes synthesis.csv (one row per case x subset x target), synthesis.json and synthesis.md (mean
PSNR in dB per subset and target) to --out (default WORKDIR/eval).
"""
from __future__ import annotations

import csv
import io
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from hemijax import atomic
from hemijax.evaluation import subsets as evaluation
from hemijax.inference import sliding_window as inference

CSV_FIELDS = ("case_id", "subset", "target", "psnr", "mse")


def _method_and_variables(predictor_or_pair):
  if isinstance(predictor_or_pair, tuple):
    method, variables = predictor_or_pair
    return method, variables, None
  return predictor_or_pair.method, predictor_or_pair.variables, predictor_or_pair.config


def check_synthesis(method):
  if not (method.has_encoder and hasattr(method.model, "synthesize")):
    raise ValueError(f"synthesis: method {method.name!r} has no synthesis decoders "
                     "(only URN workdirs have a synthesis table)")


def make_synthesis_forward(method, variables):
  """jitted `(windows (B, *roi, M), masks (S, M)) -> synthesised images (S, B, *roi, M)`.

  The same window contract as `inference.make_window_forward`, so the sliding-window blending of
  `inference.predict_probabilities` serves synthesised intensities as well.
  """
  check_synthesis(method)
  spatial_dims = method.spatial_dims

  def forward(variables, windows, masks):
    if spatial_dims == 2:
      windows = windows[..., 0, :]   # (B, X, Y, 1, M) axial slices -> (B, X, Y, M)
    batch = windows.shape[0]
    features = method.encode(variables, windows)
    synthesise = lambda m: method.model.apply(
        variables, features, jnp.broadcast_to(m, (batch, m.shape[-1])), method="synthesize")
    images = jax.lax.map(synthesise, masks)
    return images[..., None, :] if spatial_dims == 2 else images

  jitted = jax.jit(forward)
  return lambda windows, masks: jitted(variables, windows, masks)


def psnr(prediction, truth, region):
  """(PSNR in dB, MSE) of `prediction` against `truth` inside the boolean `region`."""
  values = np.asarray(truth, np.float64)[region]
  if values.size == 0:
    raise ValueError("psnr: empty region")
  mse = float(np.mean(np.square(np.asarray(prediction, np.float64)[region] - values)))
  peak = float(values.max() - values.min())
  if mse == 0.0:
    return math.inf, 0.0
  if peak == 0.0:
    return -math.inf, mse
  return 10.0 * math.log10(peak * peak / mse), mse


def synthesis_psnr(predictor_or_pair, volumes, modalities=None, *, settings=None,
                   progress=False) -> list[dict]:
  """Rows {case_id, subset, target, psnr, mse}: every held modality from every subset lacking it.

  `predictor_or_pair`: a `hemijax.inference.predictor.Predictor` or a `(method, variables)` pair.
  `volumes`: preprocessed `Volume`s (e.g. `datasets.load_split(config, "test")`); the brain mask of
  each is the region compared. `settings`: an `inference.WindowSettings` (default: the predictor
  config's; with a pair, the whole volume).
  """
  method, variables, config = _method_and_variables(predictor_or_pair)
  modalities = tuple(modalities or method.modalities)
  if len(modalities) != len(method.modalities):
    raise ValueError(f"modalities: expected {len(method.modalities)} names, got {modalities}")
  if settings is None:
    settings = (inference.WindowSettings.from_config(config) if config is not None
                else inference.WindowSettings())
  forward = make_synthesis_forward(method, variables)
  subsets = evaluation.all_subsets(modalities)
  rows = []
  iterator = volumes
  if progress:
    from tqdm import tqdm
    iterator = tqdm(volumes, desc="synthesis")
  for vol in iterator:
    held = {m for m, a in zip(modalities, vol.available) if a}
    chosen = [s for s in subsets if set(s) < held]   # proper, non-empty subsets of what it holds
    if not chosen:
      continue
    masks = np.array([[m in s for m in modalities] for s in chosen])
    synthesised = inference.predict_probabilities(method, variables, vol.image, masks, settings,
                                                  forward=forward)
    brain = np.asarray(vol.brain, bool)
    for subset, images in zip(chosen, synthesised):
      for i, target in enumerate(modalities):
        if target in held and target not in subset:
          value, mse = psnr(images[..., i], vol.image[..., i], brain)
          rows.append({"case_id": vol.case_id,
                       "subset": evaluation.subset_key(subset, modalities),
                       "target": target, "psnr": value, "mse": mse})
  return rows


def summarise(rows, modalities) -> dict:
  """Mean PSNR (and case count) per subset and target, in `evaluation.all_subsets` order."""
  modalities = tuple(modalities)
  table = {}
  for subset in evaluation.all_subsets(modalities):
    key = evaluation.subset_key(subset, modalities)
    cells = {}
    for target in modalities:
      values = [r["psnr"] for r in rows if r["subset"] == key and r["target"] == target]
      if values:
        cells[target] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                         "n_cases": len(values)}
    if cells:
      table[key] = {"symbol": evaluation.subset_symbol(subset, modalities), "targets": cells}
  means = {t: [c["targets"][t]["mean"] for c in table.values() if t in c["targets"]]
           for t in modalities}
  overall = {t: float(np.mean(v)) if v else None for t, v in means.items()}
  return {"modalities": list(modalities), "subsets": table, "mean": overall}


def synthesis_markdown(summary, title="Synthesis PSNR") -> str:
  """Rows = input subsets (● present, ○ missing), columns = synthesised modality: mean PSNR."""
  modalities = summary["modalities"]
  names = [evaluation.display_name(m) for m in modalities]
  head = names + [f"→ {n}" for n in names]
  lines = [f"# {title}", "",
           "PSNR (dB) of each modality synthesised from the subset of present modalities (● "
           f"present, ○ missing; modality order {' '.join(names)}), on the normalised "
           "intensities inside the brain, peak = the real image's range there; mean over cases. "
           "The mean row averages the subsets.", "",
           "| " + " | ".join(head) + " |", "|" + "|".join([":-:"] * len(names)
                                                         + ["-:"] * len(names)) + "|"]
  for entry in summary["subsets"].values():
    cells = [f"{entry['targets'][t]['mean']:.2f}" if t in entry["targets"] else "–"
             for t in modalities]
    lines.append("| " + " | ".join(list(entry["symbol"]) + cells) + " |")
  lines.append("| " + " | ".join(["**mean**"] + [""] * (len(names) - 1) + [
      "–" if summary["mean"][t] is None else f"**{summary['mean'][t]:.2f}**"
      for t in modalities]) + " |")
  return "\n".join(lines) + "\n"


def write_synthesis_report(out_dir, rows, modalities, title="Synthesis PSNR") -> dict:
  """synthesis.csv, synthesis.json and synthesis.md in `out_dir`; returns the summary."""
  out_dir = pathlib.Path(out_dir)
  summary = summarise(rows, modalities)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS), lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_text(out_dir / "synthesis.csv", buffer.getvalue())
  atomic.write_text(out_dir / "synthesis.json",
                    json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
  atomic.write_text(out_dir / "synthesis.md", synthesis_markdown(summary, title))
  return summary


def synthesis_evaluator(predictor, volumes, out_dir, *, title, progress=True) -> dict:
  """`evaluate.py`'s extra report for URN workdirs: synthesis.csv/.json/.md in `out_dir`."""
  rows = synthesis_psnr(predictor, volumes, predictor.modalities, progress=progress)
  if not rows:  # no case holds two or more modalities
    return {}
  summary = write_synthesis_report(out_dir, rows, predictor.modalities,
                                   title=f"synthesis PSNR, {title}")
  path = str(pathlib.Path(out_dir) / "synthesis.md")
  # The mean PSNR per synthesised modality: a number a study can average over seeds.
  return {"synthesis": path, "synthesis_psnr": summary["mean"], "report": path}
