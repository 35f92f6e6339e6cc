"""Evaluation plots: training curves, a metric by subset, and overlays of predictions on slices.

matplotlib's object API with the Agg canvas: no global pyplot state, no display needed. PNGs are
written to a temporary name, then renamed (never half-written).
"""
from __future__ import annotations

import io
import json

import numpy as np

from hemijax import atomic
from hemijax.evaluation.subsets import AS_ACQUIRED_DISPLAY, display_name
from hemijax.evaluation.tables import METRIC_DISPLAY

# Label colours for overlays (BraTS habit: necrotic core red, edema green, enhancing yellow).
LABEL_COLOURS = ("#e41a1c", "#4daf4a", "#ffd92f", "#377eb8", "#984ea3", "#ff7f00", "#a65628",
                 "#f781bf")


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
  """Bar chart PNG: one group per subset (● ○ labels), one bar per region, std as error bars; the
  "as acquired" group last when the summary has one; case counts under the labels when they vary."""
  regions, entries = summary["regions"], list(summary["subsets"].values())
  labels = [e["symbol"] for e in entries]
  if summary.get("as_acquired"):
    entries.append(summary["as_acquired"])
    labels.append(AS_ACQUIRED_DISPLAY.replace(" ", "\n"))
  if len({e["n_cases"] for e in entries}) > 1:  # cases genuinely lack modalities
    labels = [f"{label}\nn={e['n_cases']}" for label, e in zip(labels, entries)]
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
  ax.set_xticklabels(labels, fontsize=9)
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
  """PNG: an axial slice of each modality, then truth and each prediction over the first modality
  the case has.

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
  # Labels are drawn over the first modality the case has (a missing one is all zero).
  base_channel = next((i for i in range(n_mod) if np.any(image[..., i])), 0)
  base = _normalise_slice(image[..., slice_index, base_channel])
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
