"""Metrics: hand-computed cases, empty-mask conventions, surface distances against medpy (pooled
HD95) and a NumPy transcription of MONAI (directed-maximum HD95, the default)."""
import json

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from scipy.spatial.distance import cdist

from hemijax.evaluation import metrics
from hemijax.data.tasks import get_task


def _box(shape, lo, hi):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


def _blob(rng, shape, threshold, sigma=2.0):
  """Random smooth blob(s): thresholded smoothed noise, some touching the image edge."""
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return noise > threshold * noise.std()


def test_overlap_metrics_hand_computed():
  truth = np.zeros((4, 4, 4), bool)
  pred = np.zeros((4, 4, 4), bool)
  truth[0, 0, :4] = True  # 4 voxels
  pred[0, 0, 2:4] = True  # 2 voxels, both inside truth
  pred[3, 3, 3] = True  # 1 false positive
  assert metrics.dice(pred, truth) == pytest.approx(2 * 2 / (3 + 4))
  assert metrics.sensitivity(pred, truth) == pytest.approx(2 / 4)
  assert metrics.precision(pred, truth) == pytest.approx(2 / 3)
  assert metrics.dice(truth, truth) == 1.0


def test_volume_difference_signed_in_ml():
  truth = _box((10, 10, 10), (0, 0, 0), (5, 5, 4))  # 100 voxels
  pred = _box((10, 10, 10), (0, 0, 0), (5, 5, 6))  # 150 voxels
  spacing = (1.0, 2.0, 3.0)  # 6 mm^3 per voxel
  assert metrics.volume_difference(pred, truth, spacing) == pytest.approx(50 * 6 / 1000)
  assert metrics.volume_difference(truth, pred, spacing) == pytest.approx(-0.3)
  assert metrics.volume_difference(truth, truth, 2.0) == 0.0


def test_surface_distances_hand_computed():
  # Two single-voxel-thick slabs 3 voxels apart along an axis with 2 mm spacing: every surface
  # voxel is 6 mm from the other surface.
  pred = _box((6, 6, 10), (1, 1, 2), (5, 5, 3))
  truth = _box((6, 6, 10), (1, 1, 5), (5, 5, 6))
  spacing = (1.0, 1.0, 2.0)
  assert metrics.hausdorff95(pred, truth, spacing) == pytest.approx(6.0)
  assert metrics.assd(pred, truth, spacing) == pytest.approx(6.0)
  assert metrics.hausdorff95(pred, pred, spacing) == 0.0
  assert metrics.assd(pred, pred, spacing) == 0.0


def test_single_voxels_distance():
  pred = _box((5, 5, 5), (0, 0, 0), (1, 1, 1))
  truth = _box((5, 5, 5), (3, 4, 0), (4, 5, 1))
  assert metrics.hausdorff95(pred, truth, (1.0, 0.5, 1.0)) == pytest.approx(np.hypot(3.0, 2.0))


@pytest.mark.parametrize("connectivity", [1, 3])
def test_surface_metrics_match_medpy(connectivity):
  rng = np.random.default_rng(0)
  shape, spacing = (30, 26, 20), (0.9, 1.3, 2.5)
  for trial in range(4):
    truth = _blob(rng, shape, 0.8)
    pred = ndimage.binary_dilation(truth, iterations=1) if trial == 0 else _blob(rng, shape, 1.0)
    ours_hd = metrics.hausdorff95(pred, truth, spacing, connectivity=connectivity,
                                  hd95_convention="pooled")
    ours_assd = metrics.assd(pred, truth, spacing, connectivity=connectivity)
    ref_hd = medpy_binary.hd95(pred, truth, voxelspacing=spacing, connectivity=connectivity)
    ref_assd = medpy_binary.assd(pred, truth, voxelspacing=spacing, connectivity=connectivity)
    assert ours_hd == pytest.approx(ref_hd, rel=1e-9, abs=1e-9)
    assert ours_assd == pytest.approx(ref_assd, rel=1e-9, abs=1e-9)
    assert metrics.dice(pred, truth) == pytest.approx(medpy_binary.dc(pred, truth))
    assert metrics.sensitivity(pred, truth) == pytest.approx(medpy_binary.sensitivity(pred, truth))
    assert metrics.precision(pred, truth) == pytest.approx(medpy_binary.precision(pred, truth))


def test_cropping_keeps_distances_for_small_far_apart_masks():
  # Small blobs in a larger volume (crop is a small part), one touching the image edge.
  shape, spacing = (40, 48, 36), (1.0, 1.0, 1.5)
  truth = _box(shape, (0, 5, 3), (6, 12, 9)) | _box(shape, (10, 10, 10), (13, 14, 12))
  pred = _box(shape, (25, 30, 20), (31, 39, 30))
  assert metrics.hausdorff95(pred, truth, spacing, hd95_convention="pooled") == pytest.approx(
      medpy_binary.hd95(pred, truth, voxelspacing=spacing))
  assert metrics.assd(pred, truth, spacing) == pytest.approx(
      medpy_binary.assd(pred, truth, voxelspacing=spacing))


def test_both_empty_convention():
  empty = np.zeros((5, 5, 5), bool)
  values = metrics.binary_metrics(empty, empty, (1.0, 1.0, 1.0))
  assert values == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "sensitivity": 1.0,
                    "precision": 1.0, "volume_diff_ml": 0.0}
  assert tuple(values) == metrics.METRIC_NAMES


def test_truth_empty_prediction_not_convention():
  empty = np.zeros((5, 5, 5), bool)
  pred = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
  values = metrics.binary_metrics(pred, empty, 2.0)
  assert values["dice"] == 0.0
  assert values["hd95"] == values["assd"] == metrics.HD_PENALTY_MM == 373.13
  assert values["sensitivity"] == 1.0 and values["precision"] == 0.0
  assert values["volume_diff_ml"] == pytest.approx(8 * 8 / 1000)


def test_prediction_empty_truth_not_convention():
  empty = np.zeros((5, 5, 5), bool)
  truth = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
  values = metrics.binary_metrics(empty, truth, 1.0)
  assert values["dice"] == 0.0
  assert values["hd95"] == values["assd"] == 373.13
  assert values["sensitivity"] == 0.0 and values["precision"] == 1.0
  assert values["volume_diff_ml"] == pytest.approx(-8 / 1000)
  assert metrics.hausdorff95(empty, truth, 1.0) == 373.13
  assert metrics.assd(truth, empty, 1.0) == 373.13


def test_bad_inputs_raise():
  with pytest.raises(ValueError):
    metrics.dice(np.zeros((3, 3)), np.zeros((3, 4)))
  with pytest.raises(ValueError):
    metrics.hausdorff95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))
  with pytest.raises(ValueError):
    metrics.surface_distances(np.zeros((3, 3, 3)), np.ones((3, 3, 3)), 1.0)


def test_region_masks_and_case_metrics_brats():
  task = get_task("tumor")
  truth = np.zeros((12, 12, 12), np.int32)
  truth[2:8, 2:8, 2:8] = 2  # edema
  truth[3:6, 3:6, 3:6] = 1  # necrotic core
  truth[6:8, 6:8, 6:8] = 4  # enhancing
  masks = metrics.region_masks(truth, task.regions)
  assert set(masks) == {"WT", "TC", "ET"}
  assert masks["WT"].sum() == 216 and masks["TC"].sum() == 27 + 8 and masks["ET"].sum() == 8
  pred = truth.copy()
  pred[pred == 4] = 1  # enhancing predicted as core: ET missed, TC and WT perfect
  result = metrics.case_metrics(pred, truth, (1.0, 1.0, 1.0), task.regions)
  assert list(result) == ["WT", "TC", "ET"]
  assert result["WT"]["dice"] == 1.0 and result["TC"]["dice"] == 1.0
  assert result["WT"]["hd95"] == 0.0 and result["TC"]["assd"] == 0.0
  assert result["ET"]["dice"] == 0.0 and result["ET"]["hd95"] == 373.13
  assert result["ET"]["volume_diff_ml"] == pytest.approx(-0.008)
  for values in result.values():
    assert tuple(values) == metrics.METRIC_NAMES


def _face_surface_coords(mask, spacing):
  """Mask voxels with a background face neighbour (outside = background), in mm; by shifts."""
  padded = np.pad(mask, 1)
  interior = padded.copy()
  for axis in range(mask.ndim):
    for step in (-1, 1):
      interior &= np.roll(padded, step, axis=axis)
  surface = (padded & ~interior)[tuple(slice(1, -1) for _ in range(mask.ndim))]
  return np.argwhere(surface) * np.asarray(spacing)


def _brute_force_hd95(pred, truth, spacing):
  """(directed_max, pooled) HD95 from all pairwise surface-voxel distances."""
  pairwise = cdist(_face_surface_coords(pred, spacing), _face_surface_coords(truth, spacing))
  to_truth, to_pred = pairwise.min(axis=1), pairwise.min(axis=0)
  directed_max = max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))
  return directed_max, np.percentile(np.concatenate([to_truth, to_pred]), 95)


def _monai_surface_distances(pred, truth, spacing):
  """NumPy transcription of MONAI 1.5 get_edge_surface_distance(symmetric=True) on the CPU:
  crop to the bounding box of pred | truth with a 1-voxel margin, zero-padded where it leaves the
  image (CropForegroundD(margin=1, allow_smaller=False)); edges = binary_erosion(x) ^ x with scipy's
  default structure; distance_transform_edt(~edges, sampling) cast to float32."""
  coords = np.argwhere(pred | truth)
  lo, hi = coords.min(axis=0) - 1, coords.max(axis=0) + 2
  pad = [(max(-a, 0), max(b - n, 0)) for a, b, n in zip(lo, hi, pred.shape)]
  box = tuple(slice(a + p[0], b + p[0]) for a, b, p in zip(lo, hi, pad))
  pred, truth = np.pad(pred, pad)[box], np.pad(truth, pad)[box]
  edges_pred = ndimage.binary_erosion(pred) ^ pred
  edges_gt = ndimage.binary_erosion(truth) ^ truth
  def directed(src, dst):
    return ndimage.distance_transform_edt(~dst, sampling=spacing).astype(np.float32)[src]
  return directed(edges_pred, edges_gt), directed(edges_gt, edges_pred)


def _monai_hd95_and_asd(pred, truth, spacing):
  """compute_hausdorff_distance(percentile=95) (torch.quantile = linear interpolation, per directed
  set, then max) and compute_average_surface_distance(symmetric=True) (mean of the concatenation)."""
  distances = _monai_surface_distances(pred, truth, spacing)
  hd95 = max(np.percentile(d, 95) for d in distances)
  return float(hd95), float(np.concatenate(distances).mean())


def _under_segmentation_with_far_false_positive():
  """Truth: a 10^3 cube. Prediction: the cube's inner 6^3 core plus a 3^3 cube ~30 voxels away."""
  shape = (48, 16, 16)
  truth = _box(shape, (2, 3, 3), (12, 13, 13))
  pred = _box(shape, (4, 5, 5), (10, 11, 11)) | _box(shape, (42, 6, 6), (45, 9, 9))
  return pred, truth


def test_hd95_conventions_differ_on_far_false_positive():
  pred, truth = _under_segmentation_with_far_false_positive()
  spacing = (1.0, 1.2, 0.8)
  ref_directed, ref_pooled = _brute_force_hd95(pred, truth, spacing)
  directed = metrics.hausdorff95(pred, truth, spacing)
  pooled = metrics.hausdorff95(pred, truth, spacing, hd95_convention="pooled")
  assert directed == pytest.approx(ref_directed, abs=1e-9)
  assert pooled == pytest.approx(ref_pooled, abs=1e-9)
  assert pooled == pytest.approx(medpy_binary.hd95(pred, truth, voxelspacing=spacing), abs=1e-9)
  # The false positive's 26 surface voxels are > 5 % of the prediction's 152 + 26 but < 5 % of the
  # pooled 152 + 26 + 488: the directed maximum reports it (>= 31 voxels = 31 mm along axis 0 from
  # the truth), the pooled percentile hides it under the under-segmentation gap, at most the
  # distance of a truth corner to the core's corner, 2 voxels along each axis.
  assert directed >= 31.0
  assert pooled <= np.sqrt(2.0 ** 2 + 2.4 ** 2 + 1.6 ** 2) + 1e-9
  # Symmetric in its arguments; the default is the directed maximum.
  assert metrics.hausdorff95(truth, pred, spacing) == pytest.approx(directed, abs=1e-9)
  assert metrics.DEFAULT_HD95_CONVENTION == "directed_max"
  assert set(metrics.HD95_CONVENTIONS) == {"directed_max", "pooled"}
  region_values = metrics.case_metrics(pred.astype(np.int32), truth.astype(np.int32), spacing,
                                       {"lesion": (1,)}, hd95_convention="pooled")["lesion"]
  assert region_values["hd95"] == pytest.approx(pooled, abs=1e-9)
  assert metrics.binary_metrics(pred, truth, spacing)["hd95"] == pytest.approx(directed, abs=1e-9)


def test_hd95_and_assd_match_monai_transcription():
  rng = np.random.default_rng(1)
  shape, spacing = (34, 30, 22), (0.9, 1.3, 2.5)
  gaps = []
  for trial in range(6):
    truth = _blob(rng, shape, 0.8)
    if trial == 0:
      pred = ndimage.binary_erosion(truth, iterations=2)
    else:
      pred = _blob(rng, shape, 1.0 + 0.1 * trial)
    if trial == 5:  # a small far false positive on the image edge
      pred[-3:, :2, :2] = True
    assert pred.any() and truth.any()
    ref_hd95, ref_asd = _monai_hd95_and_asd(pred, truth, spacing)
    values = metrics.binary_metrics(pred, truth, spacing)
    assert values["hd95"] == pytest.approx(ref_hd95, abs=0.01)
    assert values["assd"] == pytest.approx(ref_asd, abs=0.01)
    gaps.append(values["hd95"] - metrics.hausdorff95(pred, truth, spacing, hd95_convention="pooled"))
  assert max(gaps) > 0.01  # the cases tell the two conventions apart


def test_unknown_conventions_raise_naming_the_option():
  pred = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
  empty = np.zeros((5, 5, 5), bool)
  with pytest.raises(ValueError, match="hd95_convention"):
    metrics.hausdorff95(pred, pred, 1.0, hd95_convention="medpy")
  with pytest.raises(ValueError, match="hd95_convention"):
    metrics.binary_metrics(empty, empty, 1.0, hd95_convention="max")  # checked even when empty
  with pytest.raises(ValueError, match="hd95_convention"):
    metrics.case_metrics(pred.astype(int), pred.astype(int), 1.0, {"r": (1,)},
                         hd95_convention="")
  with pytest.raises(ValueError, match="empty_penalty"):
    metrics.assd(pred, empty, 1.0, empty_penalty="huge")
  with pytest.raises(ValueError, match="hd95_convention"):
    metrics.metric_conventions(hd95_convention="Directed_Max")


def test_image_diagonal_empty_penalty():
  shape, spacing = (20, 30, 10), (1.0, 0.5, 2.0)  # extent 20 x 15 x 20 mm
  pred = _box(shape, (1, 1, 1), (3, 3, 3))
  empty = np.zeros(shape, bool)
  diagonal = np.sqrt(20.0 ** 2 + 15.0 ** 2 + 20.0 ** 2)
  values = metrics.binary_metrics(empty, pred, spacing, empty_penalty="image_diagonal")
  assert values["hd95"] == values["assd"] == pytest.approx(diagonal)
  assert metrics.empty_mask_penalty((240, 240, 155), 1.0, "image_diagonal") == pytest.approx(
      metrics.HD_PENALTY_MM, abs=0.005)
  assert metrics.empty_mask_penalty(shape, spacing) == metrics.HD_PENALTY_MM
  both_empty = metrics.binary_metrics(empty, empty, spacing, empty_penalty="image_diagonal")
  assert both_empty["hd95"] == both_empty["assd"] == 0.0


def test_metric_conventions_record():
  record = metrics.metric_conventions()
  assert record["hd95"].startswith("directed_max")
  assert record["assd"].startswith("pooled")
  assert record["empty_penalty_mm"] == metrics.HD_PENALTY_MM
  assert json.loads(json.dumps(record)) == record
  pooled = metrics.metric_conventions(hd95_convention="pooled", empty_penalty="image_diagonal")
  assert pooled["hd95"].startswith("pooled") and pooled["empty_penalty_mm"] is None


def _lesion_scene():
  """Truth lesions A, B (6^3), C (two 4^3 boxes 4 voxels apart) and D (3^3 = 27 mm^3, too small);
  prediction: A shifted by one voxel, B missed, C exact, a blob one voxel beside D, a far FP."""
  shape = (60, 40, 20)
  truth = (_box(shape, (2, 2, 2), (8, 8, 8)) | _box(shape, (20, 2, 2), (26, 8, 8))
           | _box(shape, (2, 20, 2), (6, 24, 6)) | _box(shape, (2, 28, 2), (6, 32, 6))
           | _box(shape, (40, 2, 2), (43, 5, 5)))
  pred = (_box(shape, (3, 2, 2), (9, 8, 8))
          | _box(shape, (2, 20, 2), (6, 24, 6)) | _box(shape, (2, 28, 2), (6, 32, 6))
          | _box(shape, (44, 2, 2), (46, 5, 5)) | _box(shape, (50, 30, 12), (53, 33, 15)))
  return pred, truth


def test_lesion_wise_metrics_brats_2023_rules():
  pred, truth = _lesion_scene()
  penalty = metrics.HD_PENALTY_MM
  # A one-voxel shift of a 6^3 box: all surface distances are 0 or 1, over 5 % of them 1.
  assert metrics.hausdorff95(pred[:20, :12], truth[:20, :12], 1.0) == 1.0  # A alone
  result = metrics.lesion_wise_metrics(pred, truth, 1.0)
  # Dilation 3 merges C's boxes; D is too small (its neighbour blob is matched, not an FP).
  # Counted: A (Dice 2*180/432, HD95 1), B (0, penalty), C (1, 0); one FP (0, penalty).
  assert (result["num_tp"], result["num_fn"], result["num_fp"]) == (2, 1, 1)
  assert len(result["lesions"]) == 4
  assert [lesion["counted"] for lesion in result["lesions"]].count(False) == 1
  assert result["dice"] == pytest.approx((2 * 180 / 432 + 0 + 1) / 4)
  assert result["hd95"] == pytest.approx((1.0 + penalty + 0.0 + penalty) / 4)
  # Dilation 1: C's boxes stay two lesions and D's neighbour blob becomes a second FP.
  narrow = metrics.lesion_wise_metrics(pred, truth, 1.0, dilation_iterations=1)
  assert (narrow["num_tp"], narrow["num_fn"], narrow["num_fp"]) == (3, 1, 2)
  assert narrow["dice"] == pytest.approx((2 * 180 / 432 + 0 + 1 + 1) / 6)
  assert narrow["hd95"] == pytest.approx((1.0 + penalty + 0 + 0 + 2 * penalty) / 6)
  # The volume threshold is in mm^3: at 2 mm spacing along one axis D (54 mm^3) counts, detected.
  wide = metrics.lesion_wise_metrics(pred, truth, (1.0, 1.0, 2.0))
  assert (wide["num_tp"], wide["num_fn"], wide["num_fp"]) == (3, 1, 1)


def test_lesion_wise_metrics_empty_cases():
  shape = (20, 20, 20)
  empty = np.zeros(shape, bool)
  small = _box(shape, (5, 5, 5), (8, 8, 8))  # 27 mm^3: not counted
  both_empty = metrics.lesion_wise_metrics(empty, empty, 1.0)
  assert (both_empty["dice"], both_empty["hd95"], both_empty["lesions"]) == (1.0, 0.0, [])
  only_small_missed = metrics.lesion_wise_metrics(empty, small, 1.0)
  assert (only_small_missed["dice"], only_small_missed["hd95"]) == (1.0, 0.0)
  assert only_small_missed["lesions"][0]["detected"] is False
  false_positive = metrics.lesion_wise_metrics(small, empty, 1.0, empty_penalty="image_diagonal")
  assert false_positive["dice"] == 0.0 and false_positive["num_fp"] == 1
  assert false_positive["hd95"] == pytest.approx(np.sqrt(3 * 20.0 ** 2))
  with pytest.raises(ValueError, match="hd95_convention"):
    metrics.lesion_wise_metrics(small, small, 1.0, hd95_convention="mean")


def test_small_predicted_region_counts_as_empty_rfnet_convention():
  """A predicted ET under the threshold (mm^3, so 62.5 voxels at 2 mm) is scored as empty; WT and
  TC keep its voxels; the threshold scales with the voxel size."""
  regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
  truth = np.zeros((12, 12, 12), np.int32)
  truth[2:6, 2:6, 2:6] = 2                     # no ET in the truth
  pred = truth.copy()
  pred[3:5, 3:5, 3:5] = 4                      # 8 voxels of false ET
  plain = metrics.case_metrics(pred, truth, 2.0, regions)
  assert plain["ET"]["dice"] == 0.0
  options = {"ET": 500.0}                      # 8 voxels * 8 mm^3 = 64 mm^3 < 500
  post = metrics.case_metrics(pred, truth, 2.0, regions, min_region_volume_mm3=options)
  assert post["ET"]["dice"] == 1.0 and post["ET"]["hd95"] == 0.0
  assert post["WT"] == plain["WT"] and post["TC"] == plain["TC"]
  # At 4 mm the same 8 voxels are 512 mm^3: kept.
  assert metrics.case_metrics(pred, truth, 4.0, regions,
                              min_region_volume_mm3=options)["ET"]["dice"] == 0.0
  # Anisotropic spacing: 8 voxels * (1 * 1 * 60) = 480 mm^3 < 500, dropped.
  assert metrics.case_metrics(pred, truth, (1.0, 1.0, 60.0), regions,
                              min_region_volume_mm3=options)["ET"]["dice"] == 1.0
  with pytest.raises(ValueError, match="min_region_volume_mm3: unknown region 'XX'"):
    metrics.case_metrics(pred, truth, 2.0, regions, min_region_volume_mm3={"XX": 1.0})
  record = metrics.metric_conventions(min_region_volume_mm3=options)
  assert "ET < 500 mm^3" in record["postprocessing"]
  assert metrics.metric_conventions()["postprocessing"] == "none"


def test_evaluate_metric_options_are_checked_before_evaluating():
  from hemijax.evaluation.evaluate import check_metric_options, parse_min_volume_option

  regions = ("WT", "TC", "ET")
  assert parse_min_volume_option(["ET=500"]) == {"ET": 500.0}
  with pytest.raises(ValueError, match="--min-volume: 'ET' is not REGION=MM3"):
    parse_min_volume_option(["ET"])
  with pytest.raises(ValueError, match="--min-volume: 'ET=abc'"):
    parse_min_volume_option(["ET=abc"])
  with pytest.raises(ValueError, match="unknown region 'lesion'"):
    check_metric_options({"min_region_volume_mm3": {"lesion": 10}}, regions)
  assert check_metric_options({"min_region_volume_mm3": {"lesion": 10}}, regions,
                              unknown_regions="ignore")["min_region_volume_mm3"] == {}
  with pytest.raises(ValueError, match="must be a volume >= 0"):
    check_metric_options({"min_region_volume_mm3": {"ET": -1}}, regions)
  with pytest.raises(ValueError, match="hd95_convention"):
    check_metric_options({"hd95_convention": "medpy"}, regions)
  with pytest.raises(ValueError, match="unknown \\['typo'\\]"):
    check_metric_options({"typo": 1}, regions)
