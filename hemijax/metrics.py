"""Segmentation metrics on binary masks (NumPy/SciPy), following the BraTS challenge evaluation.

Masks are boolean arrays of equal shape; `spacing` is the voxel size in mm per axis (a scalar means
isotropic). Label maps hold the label values written in the files (e.g. 0, 1, 2, 4 for BraTS) and
`regions` maps a region name to the label values it unites (`Task.regions`).

Metrics (`METRIC_NAMES`):
  dice            2|P∩T| / (|P| + |T|)
  hd95            95th percentile of the pooled symmetric surface distances in mm (both directions
                  concatenated, as `medpy.metric.binary.hd95` 0.5.x)
  assd            mean of the pooled symmetric surface distances in mm (as `medpy...assd` 0.5.x)
  sensitivity     |P∩T| / |T|
  precision       |P∩T| / |P|
  volume_diff_ml  signed volume difference (|P| - |T|) * voxel volume, in mL (1 mL = 1000 mm^3):
                  positive = over-segmentation

Surfaces are the mask voxels removed by one binary erosion (outside the image counts as background),
with a 6-neighbourhood structuring element by default (`connectivity=1`, medpy's default; pass
`connectivity=ndim` for the full 26-neighbourhood). Distances come from
`scipy.ndimage.distance_transform_edt(..., sampling=spacing)`, computed on the joint bounding box of
both masks plus a one-voxel margin: every surface voxel lies inside that box, so the exact Euclidean
distances are unchanged while the transforms run on a small fraction of the volume.

Empty-mask conventions (BraTS challenge):
  truth and prediction both empty  -> dice 1, hd95 0, assd 0, sensitivity 1, precision 1
  exactly one of them empty        -> dice 0, hd95 and assd = HD_PENALTY_MM (373.13 mm, the diagonal
                                      of the 240 x 240 x 155 mm BraTS volume, the challenge's value)
  sensitivity with an empty truth / precision with an empty prediction (ratios with an empty
  denominator) are 1: nothing was missed / nothing was falsely predicted. Hence truth empty and
  prediction non-empty gives sensitivity 1, precision 0; prediction empty and truth non-empty gives
  sensitivity 0, precision 1. The failure is carried by dice and the distance penalties.
  volume_diff_ml is always defined (0 when both are empty).
None of the metrics is ever NaN.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "hd95", "assd", "sensitivity", "precision", "volume_diff_ml")
HD_PENALTY_MM = 373.13  # sqrt(240^2 + 240^2 + 155^2): BraTS value when exactly one mask is empty
# Direction of "better" per metric; volume_diff_ml is better the closer it is to 0.
HIGHER_IS_BETTER = {"dice": True, "hd95": False, "assd": False, "sensitivity": True,
                    "precision": True, "volume_diff_ml": False}


def _as_masks(pred, truth):
  pred = np.asarray(pred).astype(bool, copy=False)
  truth = np.asarray(truth).astype(bool, copy=False)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
  return pred, truth


def _as_spacing(spacing, ndim):
  spacing = np.asarray(spacing, np.float64)
  if spacing.ndim == 0:
    spacing = np.full(ndim, float(spacing))
  if spacing.shape != (ndim,):
    raise ValueError(f"spacing {tuple(spacing)} does not have one value per axis ({ndim})")
  if np.any(spacing <= 0):
    raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
  return tuple(float(s) for s in spacing)


def _ratio(numerator, denominator):
  # Empty denominator: nothing to miss / nothing falsely predicted (see module docstring).
  return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def dice(pred, truth) -> float:
  """Dice coefficient 2|P∩T| / (|P| + |T|); 1 when both masks are empty."""
  pred, truth = _as_masks(pred, truth)
  total = int(pred.sum()) + int(truth.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def sensitivity(pred, truth) -> float:
  """|P∩T| / |T| (recall); 1 when the truth is empty."""
  pred, truth = _as_masks(pred, truth)
  return _ratio(np.logical_and(pred, truth).sum(), truth.sum())


def precision(pred, truth) -> float:
  """|P∩T| / |P| (positive predictive value); 1 when the prediction is empty."""
  pred, truth = _as_masks(pred, truth)
  return _ratio(np.logical_and(pred, truth).sum(), pred.sum())


def volume_difference(pred, truth, spacing) -> float:
  """Signed volume difference (|P| - |T|) * voxel volume in mL; positive = over-segmentation."""
  pred, truth = _as_masks(pred, truth)
  voxel_ml = float(np.prod(_as_spacing(spacing, pred.ndim))) / 1000.0
  return (int(pred.sum()) - int(truth.sum())) * voxel_ml


def _joint_box(pred, truth, margin=1):
  """Slices of the bounding box of pred | truth grown by `margin` voxels (clipped to the image)."""
  coords = np.nonzero(np.logical_or(pred, truth))
  return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n))
               for c, n in zip(coords, pred.shape))


def _surface(mask, structure):
  # border_value=0: voxels on the image edge belong to the surface, as in medpy.
  return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def surface_distances(pred, truth, spacing, connectivity=1):
  """Distances in mm (pred surface -> nearest truth surface, truth surface -> nearest pred surface).

  Both masks must be non-empty. The distance transforms run on the joint bounding box plus a
  one-voxel margin, which holds every surface voxel and keeps erosion at the box edge exact.
  """
  pred, truth = _as_masks(pred, truth)
  if not pred.any() or not truth.any():
    raise ValueError("surface distances need two non-empty masks")
  spacing = _as_spacing(spacing, pred.ndim)
  box = _joint_box(pred, truth)
  pred, truth = pred[box], truth[box]
  structure = ndimage.generate_binary_structure(pred.ndim, connectivity)
  pred_surface, truth_surface = _surface(pred, structure), _surface(truth, structure)
  to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
  return to_truth, to_pred


def _distance_metrics(pred, truth, spacing, connectivity):
  """(hd95, assd) with the BraTS empty-mask conventions."""
  pred_empty, truth_empty = not pred.any(), not truth.any()
  if pred_empty and truth_empty:
    return 0.0, 0.0
  if pred_empty or truth_empty:
    return HD_PENALTY_MM, HD_PENALTY_MM
  pooled = np.concatenate(surface_distances(pred, truth, spacing, connectivity))
  return float(np.percentile(pooled, 95)), float(pooled.mean())


def hausdorff95(pred, truth, spacing, connectivity=1) -> float:
  """95th percentile of the pooled symmetric surface distances in mm (as medpy.hd95 / BraTS)."""
  pred, truth = _as_masks(pred, truth)
  return _distance_metrics(pred, truth, spacing, connectivity)[0]


def assd(pred, truth, spacing, connectivity=1) -> float:
  """Average symmetric surface distance in mm (mean of the pooled distances, as medpy.assd)."""
  pred, truth = _as_masks(pred, truth)
  return _distance_metrics(pred, truth, spacing, connectivity)[1]


def binary_metrics(pred, truth, spacing, connectivity=1) -> dict[str, float]:
  """All of `METRIC_NAMES` for one pair of masks, computing the surface distances once."""
  pred, truth = _as_masks(pred, truth)
  hd95_mm, assd_mm = _distance_metrics(pred, truth, spacing, connectivity)
  return {
      "dice": dice(pred, truth),
      "hd95": hd95_mm,
      "assd": assd_mm,
      "sensitivity": sensitivity(pred, truth),
      "precision": precision(pred, truth),
      "volume_diff_ml": volume_difference(pred, truth, spacing),
  }


def region_masks(label_map, regions) -> dict[str, np.ndarray]:
  """Region name -> boolean mask of the voxels whose file label value is one of the region's."""
  label_map = np.asarray(label_map)
  return {name: np.isin(label_map, np.asarray(values)) for name, values in regions.items()}


def case_metrics(pred_labels, true_labels, spacing, regions, connectivity=1):
  """Region -> metric name -> value for one case; label maps in file label values."""
  pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
  if pred_labels.shape != true_labels.shape:
    raise ValueError(f"prediction shape {pred_labels.shape} != truth shape {true_labels.shape}")
  pred_regions = region_masks(pred_labels, regions)
  true_regions = region_masks(true_labels, regions)
  return {name: binary_metrics(pred_regions[name], true_regions[name], spacing, connectivity)
          for name in regions}
