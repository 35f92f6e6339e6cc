"""Segmentation metrics on binary masks (NumPy/SciPy), following the BraTS challenge evaluation.

Masks are boolean arrays of equal shape; `spacing` is the voxel size in mm per axis (a scalar means
isotropic). Label maps hold the label values written in the files (e.g. 0, 1, 2, 4 for BraTS) and
`regions` maps a region name to the label values it unites (`Task.regions`). docs/metrics.md says
which definitions hemijax uses and why; `metric_conventions()` returns them for reports.

Metrics (`METRIC_NAMES`):
  dice            2|P∩T| / (|P| + |T|)
  hd95            95th percentile surface distance in mm, by `hd95_convention` (`HD95_CONVENTIONS`):
                    "directed_max" (default): the 95th percentile of each directed set (P -> T and
                    T -> P, `np.percentile`'s linear interpolation), then the larger of the two, as
                    MONAI `compute_hausdorff_distance(percentile=95)` and the BraTS evaluation
                    (DeepMind surface-distance `compute_robust_hausdorff`, which weights by surfel area);
                    "pooled": the 95th percentile of both directed sets concatenated, as
                    `medpy.metric.binary.hd95` 0.5.x. Pooling lets a far false positive (or a missed
                    lobe) hide under 5 % of the joint surface; the directed maximum does not.
  assd            mean of the pooled symmetric surface distances in mm (both directed sets
                  concatenated), as `medpy...assd` 0.5.x and MONAI
                  `compute_average_surface_distance(symmetric=True)` (which also concatenates)
  sensitivity     |P∩T| / |T|
  precision       |P∩T| / |P|
  volume_diff_ml  signed volume difference (|P| - |T|) * voxel volume, in mL (1 mL = 1000 mm^3):
                  positive = over-segmentation

Surfaces are the mask voxels removed by one binary erosion (outside the image counts as background),
with a 6-neighbourhood structuring element by default (`connectivity=1`, the default of medpy and of
MONAI >= 1.3 `get_mask_edges`, which erodes with scipy's default structure after cropping with a
one-voxel zero margin); pass `connectivity=ndim` for the full 26-neighbourhood. Distances come from
`scipy.ndimage.distance_transform_edt(..., sampling=spacing)`, computed on the joint bounding box of
both masks plus a one-voxel margin: every surface voxel lies inside that box, so the exact Euclidean
distances are unchanged while the transforms run on a small fraction of the volume.

Empty-mask conventions (BraTS challenge):
  truth and prediction both empty  -> dice 1, hd95 0, assd 0, sensitivity 1, precision 1
  exactly one of them empty        -> dice 0, hd95 and assd = the empty-mask penalty, chosen by
                                      `empty_penalty` (`EMPTY_PENALTIES`): "brats" (default)
                                      HD_PENALTY_MM = 373.13 mm, the diagonal of the 240 x 240 x 155 mm
                                      BraTS volume, the challenge's value, the same for every image;
                                      "image_diagonal" the diagonal of this image's extent
                                      (shape * spacing) in mm, for data not on the BraTS grid
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
HD95_CONVENTIONS = ("directed_max", "pooled")
DEFAULT_HD95_CONVENTION = "directed_max"  # MONAI / BraTS; "pooled" is medpy's
EMPTY_PENALTIES = ("brats", "image_diagonal")
DEFAULT_EMPTY_PENALTY = "brats"
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


def _check_option(option, value, allowed):
  if value not in allowed:
    raise ValueError(f"{option} must be one of {allowed}, got {value!r}")


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


def empty_mask_penalty(shape, spacing, empty_penalty=DEFAULT_EMPTY_PENALTY) -> float:
  """hd95/assd in mm when exactly one mask is empty (see module docstring, `EMPTY_PENALTIES`)."""
  _check_option("empty_penalty", empty_penalty, EMPTY_PENALTIES)
  if empty_penalty == "brats":
    return HD_PENALTY_MM
  extent_mm = np.asarray(shape, np.float64) * np.asarray(_as_spacing(spacing, len(shape)))
  return float(np.sqrt(np.sum(extent_mm ** 2)))


def _percentile_hd(to_truth, to_pred, hd95_convention):
  if hd95_convention == "directed_max":
    return max(float(np.percentile(to_truth, 95)), float(np.percentile(to_pred, 95)))
  return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def _distance_metrics(pred, truth, spacing, connectivity, hd95_convention, empty_penalty):
  """(hd95, assd) with the BraTS empty-mask conventions."""
  _check_option("hd95_convention", hd95_convention, HD95_CONVENTIONS)
  _check_option("empty_penalty", empty_penalty, EMPTY_PENALTIES)
  pred_empty, truth_empty = not pred.any(), not truth.any()
  if pred_empty and truth_empty:
    return 0.0, 0.0
  if pred_empty or truth_empty:
    penalty = empty_mask_penalty(pred.shape, spacing, empty_penalty)
    return penalty, penalty
  to_truth, to_pred = surface_distances(pred, truth, spacing, connectivity)
  pooled_mean = float(np.concatenate([to_truth, to_pred]).mean())
  return _percentile_hd(to_truth, to_pred, hd95_convention), pooled_mean


def hausdorff95(pred, truth, spacing, connectivity=1, *, hd95_convention=DEFAULT_HD95_CONVENTION,
                empty_penalty=DEFAULT_EMPTY_PENALTY) -> float:
  """95th percentile surface distance in mm; by default the larger of the two directed 95th
  percentiles (MONAI / BraTS), `hd95_convention="pooled"` for medpy.hd95's pooled one."""
  pred, truth = _as_masks(pred, truth)
  return _distance_metrics(pred, truth, spacing, connectivity, hd95_convention, empty_penalty)[0]


def assd(pred, truth, spacing, connectivity=1, *, empty_penalty=DEFAULT_EMPTY_PENALTY) -> float:
  """Average symmetric surface distance in mm: mean of both directed distance sets concatenated
  (as medpy.assd and MONAI compute_average_surface_distance(symmetric=True))."""
  pred, truth = _as_masks(pred, truth)
  return _distance_metrics(pred, truth, spacing, connectivity, DEFAULT_HD95_CONVENTION,
                           empty_penalty)[1]


def binary_metrics(pred, truth, spacing, connectivity=1, *,
                   hd95_convention=DEFAULT_HD95_CONVENTION,
                   empty_penalty=DEFAULT_EMPTY_PENALTY) -> dict[str, float]:
  """All of `METRIC_NAMES` for one pair of masks, computing the surface distances once."""
  pred, truth = _as_masks(pred, truth)
  hd95_mm, assd_mm = _distance_metrics(pred, truth, spacing, connectivity, hd95_convention,
                                       empty_penalty)
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


def drop_small_regions(pred_regions, spacing, min_region_volume_mm3) -> dict:
  """The predicted regions with each one smaller than its threshold (mm^3) emptied.

  The BraTS convention of the RFNet / mmFormer evaluations: a predicted enhancing tumour under 500
  voxels at 1 mm (`{"ET": 500}`) counts as none, because small ET predictions are mostly false
  positives on cases without ET. Thresholds are volumes, so they scale with the voxel size (62.5
  voxels at 2 mm). Only the named region's own score changes (as those evaluations do): the voxels
  stay in the label map, so WT and TC keep them.
  """
  if not min_region_volume_mm3:
    return pred_regions
  voxel_mm3 = float(np.prod(np.broadcast_to(np.asarray(spacing, float),
                                            (next(iter(pred_regions.values())).ndim,))))
  out = dict(pred_regions)
  for name, threshold in min_region_volume_mm3.items():
    if name not in out:
      raise ValueError(f"min_region_volume_mm3: unknown region {name!r}; regions: "
                       f"{', '.join(out)}")
    if not float(threshold) >= 0:
      raise ValueError(f"min_region_volume_mm3: {name}={threshold!r} must be a volume >= 0 mm^3")
    if np.count_nonzero(out[name]) * voxel_mm3 < float(threshold):
      out[name] = np.zeros_like(out[name])
  return out


def case_metrics(pred_labels, true_labels, spacing, regions, connectivity=1, *,
                 hd95_convention=DEFAULT_HD95_CONVENTION, empty_penalty=DEFAULT_EMPTY_PENALTY,
                 min_region_volume_mm3=None):
  """Region -> metric name -> value for one case; label maps in file label values.

  `min_region_volume_mm3` ({region: mm^3}): `drop_small_regions` post-processing of the prediction.
  """
  pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
  if pred_labels.shape != true_labels.shape:
    raise ValueError(f"prediction shape {pred_labels.shape} != truth shape {true_labels.shape}")
  pred_regions = drop_small_regions(region_masks(pred_labels, regions), spacing,
                                    min_region_volume_mm3)
  true_regions = region_masks(true_labels, regions)
  return {name: binary_metrics(pred_regions[name], true_regions[name], spacing, connectivity,
                               hd95_convention=hd95_convention, empty_penalty=empty_penalty)
          for name in regions}


def lesion_wise_metrics(pred, truth, spacing, *, dilation_iterations=3, min_lesion_volume_mm3=50.0,
                        connectivity=1, hd95_convention=DEFAULT_HD95_CONVENTION,
                        empty_penalty=DEFAULT_EMPTY_PENALTY) -> dict:
  """BraTS 2023 lesion-wise Dice and HD95 for one pair of binary masks.

  As the BraTS 2023 evaluation (github.com/rachitsaluja/BraTS-2023-Metrics, defaults = BraTS-GLI):
  lesions are the connected components of the truth (full neighbourhood), merged when their
  dilations touch (`dilation_iterations` of a dilation by the ndim-1 neighbourhood, 18 in 3D).
  A prediction component overlapping a lesion's dilation is matched to it; the lesion's Dice and
  HD95 compare it with the union of its matches (none: Dice 0, HD95 = the empty-mask penalty).
  Prediction components matched to no lesion are false positives, each scored Dice 0 and the
  penalty. Lesions of at most `min_lesion_volume_mm3` are left out (their matches are not false
  positives). Score = sum over lesions / (lesions + false positives); with neither, Dice 1 and
  HD95 0. Differences from the challenge script: HD95 is `hausdorff95` (voxel surfaces,
  `hd95_convention`) rather than DeepMind's surfel-area-weighted one, and the penalty is
  `empty_mask_penalty` (373.13 mm by default) where the script uses 374 mm.

  Returns dice, hd95, num_tp / num_fn (counted lesions detected / missed), num_fp, and `lesions`:
  one dict (volume_mm3, dice, hd95, detected, counted) per truth lesion.
  """
  pred, truth = _as_masks(pred, truth)
  _check_option("hd95_convention", hd95_convention, HD95_CONVENTIONS)
  penalty = empty_mask_penalty(pred.shape, spacing, empty_penalty)
  voxel_mm3 = float(np.prod(_as_spacing(spacing, pred.ndim)))
  full = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
  grow = ndimage.generate_binary_structure(pred.ndim, max(pred.ndim - 1, 1))

  def dilate(mask):
    if dilation_iterations <= 0:
      return mask
    return ndimage.binary_dilation(mask, structure=grow, iterations=dilation_iterations)

  # Lesion id = id of the dilated component holding it, so lesions whose dilations touch merge.
  dilated_ids, num_lesions = ndimage.label(dilate(truth), structure=full)
  lesion_ids = np.where(truth, dilated_ids, 0)
  pred_ids, _ = ndimage.label(pred, structure=full)
  matched = set()
  lesions = []
  for lesion_id in range(1, num_lesions + 1):
    lesion = lesion_ids == lesion_id
    hits = np.unique(pred_ids[dilate(lesion) & (pred_ids > 0)])
    matched.update(int(h) for h in hits)
    volume_mm3 = int(lesion.sum()) * voxel_mm3
    if hits.size:
      matches = np.isin(pred_ids, hits)
      lesion_dice = dice(matches, lesion)
      lesion_hd95 = hausdorff95(matches, lesion, spacing, connectivity,
                                hd95_convention=hd95_convention, empty_penalty=empty_penalty)
    else:
      lesion_dice, lesion_hd95 = 0.0, penalty
    lesions.append({"volume_mm3": volume_mm3, "dice": lesion_dice, "hd95": lesion_hd95,
                    "detected": bool(hits.size), "counted": volume_mm3 > min_lesion_volume_mm3})
  num_fp = len(set(np.unique(pred_ids[pred_ids > 0]).tolist()) - matched)
  counted = [lesion for lesion in lesions if lesion["counted"]]
  denominator = len(counted) + num_fp
  if denominator == 0:
    lesion_dice, lesion_hd95 = 1.0, 0.0
  else:
    lesion_dice = sum(lesion["dice"] for lesion in counted) / denominator
    lesion_hd95 = (sum(lesion["hd95"] for lesion in counted) + num_fp * penalty) / denominator
  return {"dice": float(lesion_dice), "hd95": float(lesion_hd95),
          "num_tp": sum(lesion["detected"] for lesion in counted),
          "num_fn": sum(not lesion["detected"] for lesion in counted),
          "num_fp": num_fp, "lesions": lesions}


METRIC_OPTIONS = ("hd95_convention", "empty_penalty", "min_region_volume_mm3")


def check_metric_options(options) -> dict:
  """`case_metrics`' convention options, checked (one-line ValueErrors naming the option) and
  complete: every option present, thresholds as floats >= 0."""
  options = dict(options or {})
  unknown = set(options) - set(METRIC_OPTIONS)
  if unknown:
    raise ValueError(f"unknown {sorted(unknown)}; known: {', '.join(METRIC_OPTIONS)}")
  out = {"hd95_convention": str(options.get("hd95_convention", DEFAULT_HD95_CONVENTION)),
         "empty_penalty": str(options.get("empty_penalty", DEFAULT_EMPTY_PENALTY)),
         "min_region_volume_mm3": {}}
  _check_option("hd95_convention", out["hd95_convention"], HD95_CONVENTIONS)
  _check_option("empty_penalty", out["empty_penalty"], EMPTY_PENALTIES)
  for name, value in dict(options.get("min_region_volume_mm3") or {}).items():
    try:
      volume = float(value)
    except (TypeError, ValueError):
      volume = float("nan")
    if not volume >= 0:
      raise ValueError(f"min_region_volume_mm3: {name}={value!r} must be a volume >= 0 mm^3")
    out["min_region_volume_mm3"][str(name)] = volume
  return out


def metric_conventions(hd95_convention=DEFAULT_HD95_CONVENTION,
                       empty_penalty=DEFAULT_EMPTY_PENALTY, connectivity=1,
                       min_region_volume_mm3=None) -> dict:
  """JSON-ready description of the metric definitions in use, to record beside every report."""
  _check_option("hd95_convention", hd95_convention, HD95_CONVENTIONS)
  _check_option("empty_penalty", empty_penalty, EMPTY_PENALTIES)
  hd95_text = {
      "directed_max": "directed_max (MONAI/BraTS): max of the 95th percentiles of the two directed "
                      "surface-distance sets",
      "pooled": "pooled (MedPy hd95): 95th percentile of both directed surface-distance sets "
                "concatenated",
  }[hd95_convention]
  penalty_text = {
      "brats": "brats: 373.13 mm (diagonal of the 240x240x155 mm BraTS volume) when exactly one "
               "mask is empty",
      "image_diagonal": "image_diagonal: diagonal of the image extent (shape * spacing) in mm when "
                        "exactly one mask is empty",
  }[empty_penalty]
  return {
      "hd95": hd95_text,
      "assd": "pooled mean of both directed surface-distance sets (MedPy assd, MONAI "
              "compute_average_surface_distance(symmetric=True))",
      "surface": f"mask voxels removed by one binary erosion, connectivity {connectivity} "
                 "(1 = 6-neighbourhood, as MONAI >= 1.3 and MedPy), outside the image = background",
      "empty_penalty": penalty_text,
      "empty_penalty_mm": HD_PENALTY_MM if empty_penalty == "brats" else None,
      "both_empty": "dice 1, hd95 0, assd 0, sensitivity 1, precision 1",
      "postprocessing": (
          "none" if not min_region_volume_mm3 else
          "a predicted region under its volume counts as empty for its own score (RFNet/mmFormer "
          "convention): " + ", ".join(f"{k} < {float(v):g} mm^3"
                                      for k, v in min_region_volume_mm3.items())),
      "min_region_volume_mm3": dict(min_region_volume_mm3 or {}),
  }
