"""Metrics: hand-computed cases, empty-mask conventions, surface distances against medpy."""
import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from hemijax import metrics
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
    ours_hd = metrics.hausdorff95(pred, truth, spacing, connectivity=connectivity)
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
  assert metrics.hausdorff95(pred, truth, spacing) == pytest.approx(
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
