"""Preprocessing: checks, crop/normalise/resample, inverse transform, label remap, cache, splits."""
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from hemijax.data import preprocess
from hemijax.data.io import DataError, load_nifti
from hemijax.data.layouts import CaseFiles
from hemijax.data.preprocess import (GridTransform, class_ids_to_label_values, load_dataset,
                                     preprocess_case, to_original_grid, write_prediction)

MODS = ("flair", "t1", "t1ce", "t2")
LABELS = (0, 1, 2, 4)
SHAPE = (16, 14, 12)
# LAS: the preprocessing flips x to RAS+ (the brain box below is symmetric in x, so it stays).
AFFINE = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -8], [0, 0, 1.5, 3], [0, 0, 0, 1]])
CANONICAL_AFFINE = np.array([[1.0, 0, 0, 5], [0, 1.0, 0, -8], [0, 0, 1.5, 3], [0, 0, 0, 1]])
BRAIN = (slice(3, 13), slice(2, 12), slice(2, 10))


def _image(seed, shape=SHAPE):
  rng = np.random.default_rng(seed)
  data = np.zeros(shape, np.float32)
  data[BRAIN] = rng.gamma(4.0, 25.0, data[BRAIN].shape)
  return data


def _label(shape=SHAPE):
  label = np.zeros(shape, np.int16)
  label[5:10, 4:9, 3:8] = 2
  label[6:9, 5:8, 4:7] = 4
  label[7, 6, 5] = 1
  return label


def _save(path, array, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def _case(tmp_path, case_id="c0", mods=MODS, label=True):
  folder = tmp_path / case_id
  images = {m: _save(folder / f"{case_id}_{m}.nii.gz", _image(i)) for i, m in enumerate(MODS)
            if m in mods}
  seg = _save(folder / f"{case_id}_seg.nii.gz", _label()) if label else None
  return CaseFiles(case_id, images, seg, folder)


def _dataset(tmp_path, n=3, missing=()):
  root = tmp_path / "data"
  for i in range(n):
    _case(root, f"c{i}", [m for m in MODS if (i, m) not in missing])
  return root


# ----------------------------------------------------------------------------------------------
# Errors name the file


def _raises_naming(path, match, case, **kw):
  with pytest.raises(DataError, match=match) as e:
    preprocess_case(case, MODS, LABELS, **kw)
  assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_shape_mismatch(tmp_path):
  case = _case(tmp_path)
  _save(case.images["t1ce"], _image(0, (16, 14, 11)))
  _raises_naming(case.images["t1ce"], "shape", case)


def test_affine_mismatch(tmp_path):
  case = _case(tmp_path)
  shifted = AFFINE.copy()
  shifted[0, 3] += 2.0
  _save(case.label, _label(), shifted)
  _raises_naming(case.label, "affine", case)


def test_label_outside_declared_set(tmp_path):
  case = _case(tmp_path)
  label = _label()
  label[0, 0, 0] = 3
  _save(case.label, label)
  _raises_naming(case.label, r"label values \[3\]", case)


def test_nan_corrupt_and_4d(tmp_path):
  case = _case(tmp_path)
  data = _image(1)
  data[5, 5, 5] = np.nan
  _save(case.images["t1"], data)
  _raises_naming(case.images["t1"], "NaN", case)
  case = _case(tmp_path / "b")
  case.images["t2"].write_bytes(case.images["t2"].read_bytes()[:100])
  _raises_naming(case.images["t2"], "cannot read", case)
  case = _case(tmp_path / "c")
  _save(case.images["flair"], np.stack([_image(0)] * 3, -1))
  _raises_naming(case.images["flair"], "3D", case)


def test_empty_image_and_case_without_modality(tmp_path):
  case = _case(tmp_path)
  _save(case.images["t1"], np.zeros(SHAPE, np.float32))
  _raises_naming(case.images["t1"], "empty", case)
  case = _case(tmp_path / "b", mods=("t1",))
  with pytest.raises(DataError, match="no image file") as e:
    preprocess_case(case, ("flair", "t2"), LABELS)
  assert str(case.origin) in str(e.value)


def test_unknown_modality_and_bad_target_spacing(tmp_path):
  case = _case(tmp_path)
  with pytest.raises(DataError, match="modalities"):
    preprocess_case(case, ("t1", "T2*"), LABELS)
  with pytest.raises(DataError, match="target_spacing"):
    preprocess_case(case, MODS, LABELS, target_spacing=-1.0)


# ----------------------------------------------------------------------------------------------
# Preprocessing


def test_crop_normalise_remap(tmp_path):
  case = _case(tmp_path, mods=("flair", "t1ce", "t2"))
  v = preprocess_case(case, MODS, LABELS)
  assert v.image.shape == (10, 10, 8, 4) and v.image.dtype == np.float32
  np.testing.assert_array_equal(v.available, [True, False, True, True])
  assert v.transform.bbox == BRAIN
  assert v.spacing == pytest.approx((1.0, 1.0, 1.5))
  assert v.brain.all()  # the brain fills its box here
  assert not v.image[..., 1].any()  # absent modality: zeros
  for i in (0, 2, 3):
    x = v.image[..., i][v.brain]
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-4
  # Clipped to the 0.1/99.9% quantiles before standardising.
  raw = load_nifti(case.images["flair"])[0][::-1][BRAIN]  # reoriented to RAS+
  lo, hi = np.quantile(raw, preprocess.CLIP_QUANTILES)
  expected = (np.clip(raw, lo, hi) - np.clip(raw, lo, hi).mean()) / np.clip(raw, lo, hi).std()
  np.testing.assert_allclose(v.image[..., 0], expected, atol=1e-4)
  # BraTS 4 -> class 3; the label is int32 class ids.
  assert v.label.dtype == np.int32 and set(np.unique(v.label)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(class_ids_to_label_values(v.label, LABELS), _label()[::-1][BRAIN])
  # The preprocessed grid's affine places voxel 0 at the box corner, in RAS+ axes.
  np.testing.assert_allclose(v.transform.affine, CANONICAL_AFFINE @ _shift((3, 2, 2)))
  np.testing.assert_allclose(nib.as_closest_canonical(nib.load(str(case.images["t2"]))).affine,
                             CANONICAL_AFFINE)


def _shift(start):
  out = np.eye(4)
  out[:3, 3] = start
  return out


def test_normalise_outside_brain_zero_and_constant_image():
  image = np.full((4, 4, 4), 7.0, np.float32)
  brain = np.zeros((4, 4, 4), bool)
  brain[1:3, 1:3, 1:3] = True
  out = preprocess.normalise(image, brain)
  assert not out.any()
  image[brain] = np.arange(8)
  out = preprocess.normalise(image, brain)
  assert not out[~brain].any() and abs(out[brain].std() - 1) < 1e-5


def test_round_trip_prediction_to_nifti(tmp_path):
  case = _case(tmp_path)
  v = preprocess_case(case, MODS, LABELS)
  out = tmp_path / "pred" / "c0.nii.gz"
  header = nib.load(str(case.images["flair"])).header
  write_prediction(out, v.label, v.transform, LABELS, header=header)
  img = nib.load(str(out))
  assert img.shape == SHAPE
  np.testing.assert_allclose(img.affine, AFFINE)
  np.testing.assert_array_equal(np.asarray(img.dataobj), _label())
  assert os.listdir(out.parent) == ["c0.nii.gz"]


def test_resampling_keeps_world_coordinates_and_round_trips(tmp_path):
  case = _case(tmp_path)
  v = preprocess_case(case, MODS, LABELS, target_spacing=2.0)
  t = v.transform
  assert v.spacing == pytest.approx((2.0, 2.0, 2.0))
  assert v.image.shape[:3] == t.shape == (5, 5, 6)
  # Preprocessed voxel j sits at cropped coordinate (j + 0.5) * zoom - 0.5, in world space too.
  j = np.array([1, 2, 3])
  src = np.asarray(t.bbox_start) + (j + 0.5) * np.asarray(t.zoom) - 0.5
  np.testing.assert_allclose(t.affine @ np.append(j, 1), CANONICAL_AFFINE @ np.append(src, 1),
                             atol=1e-6)
  back = to_original_grid(t, v.label, order=0)
  assert back.shape == SHAPE
  truth = preprocess.remap_labels(_label(), LABELS)
  assert np.mean(back == truth) > 0.95
  # Probabilities (last axis = classes), linear, background-filled outside the box.
  probs = np.eye(4, dtype=np.float32)[v.label]
  back = to_original_grid(t, probs, order=1, fill=(1, 0, 0, 0))
  assert back.shape == SHAPE + (4,)
  np.testing.assert_allclose(back.sum(-1), 1, atol=1e-5)
  np.testing.assert_array_equal(back[0, 0, 0], [1, 0, 0, 0])
  assert np.mean(back.argmax(-1) == truth) > 0.95


def test_to_original_grid_checks_shape():
  t = GridTransform((4, 4, 4), np.eye(4), (0, 0, 0), (2, 2, 2), (1.0, 1.0, 1.0), (2, 2, 2), np.eye(4))
  with pytest.raises(ValueError, match="shape"):
    to_original_grid(t, np.zeros((3, 3, 3)))
  out = to_original_grid(t, np.ones((2, 2, 2), np.int32), fill=0)
  assert out.sum() == 8 and out[:2, :2, :2].all()


def test_class_ids_to_label_values_range():
  np.testing.assert_array_equal(class_ids_to_label_values(np.array([0, 3, 1]), LABELS), [0, 4, 1])
  with pytest.raises(ValueError):
    class_ids_to_label_values(np.array([4]), LABELS)


def test_n4_reduces_bias(tmp_path):
  pytest.importorskip("SimpleITK")
  shape = (24, 24, 20)
  x = np.linspace(-1, 1, shape[0])[:, None, None]
  brain = np.zeros(shape, bool)
  brain[2:22, 2:22, 2:18] = True
  flat = np.where(brain, 100.0, 0.0)
  biased = (flat * np.exp(0.4 * x)).astype(np.float32)
  out = preprocess.n4_correct(biased, brain, (1.0, 1.0, 1.0))
  cv = lambda a: a[brain].std() / a[brain].mean()
  assert cv(out) < 0.5 * cv(biased)


def test_n4_without_simpleitk_names_option(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "SimpleITK", None)
  with pytest.raises(DataError, match="^n4: .*SimpleITK"):
    preprocess_case(_case(tmp_path), MODS, LABELS, n4=True)


# ----------------------------------------------------------------------------------------------
# Dataset loading, cache, splits


def test_load_dataset_with_missing_files(tmp_path):
  root = _dataset(tmp_path, missing={(1, "t1"), (2, "flair"), (2, "t2")})
  vols = load_dataset(root, modalities=MODS, label_values=LABELS)
  assert [v.case_id for v in vols] == ["c0", "c1", "c2"]
  np.testing.assert_array_equal(vols[2].available, [False, True, True, False])
  assert vols[0].modalities == MODS


def test_cache_memory_maps_and_skips_nifti(tmp_path, monkeypatch):
  root = _dataset(tmp_path, n=2, missing={(1, "t2")})
  cache = tmp_path / "cache"
  first = load_dataset(root, modalities=MODS, label_values=LABELS, cache_dir=cache,
                       target_spacing=2.0)
  assert not [p for p in os.listdir(cache) if p.startswith(".")]  # no temporaries left

  def no_nifti(*args, **kwargs):
    raise AssertionError("NIfTI read on a cached load")

  monkeypatch.setattr(preprocess, "load_nifti", no_nifti)
  second = load_dataset(root, modalities=MODS, label_values=LABELS, cache_dir=cache,
                        target_spacing=2.0)
  for a, b in zip(first, second):
    assert isinstance(b.image, np.memmap)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.brain, b.brain)
    np.testing.assert_array_equal(a.available, b.available)
    assert a.transform.to_dict() == b.transform.to_dict() and a.spacing == b.spacing
  # Other options or a changed file: a new entry, so NIfTI is read again.
  with pytest.raises(AssertionError, match="cached load"):
    load_dataset(root, modalities=MODS, label_values=LABELS, cache_dir=cache)
  monkeypatch.undo()
  seg = root / "c0" / "c0_seg.nii.gz"
  os.utime(seg, ns=(seg.stat().st_atime_ns, seg.stat().st_mtime_ns + 10**9))
  monkeypatch.setattr(preprocess, "load_nifti", no_nifti)
  with pytest.raises(AssertionError, match="cached load"):
    load_dataset(root, modalities=MODS, label_values=LABELS, cache_dir=cache, target_spacing=2.0)


def test_damaged_cache_entry_is_rebuilt(tmp_path):
  root = _dataset(tmp_path, n=1)
  cache = tmp_path / "cache"
  load_dataset(root, modalities=MODS, label_values=LABELS, cache_dir=cache)
  entry, = cache.iterdir()
  (entry / "image.npy").write_bytes(b"junk")
  v, = load_dataset(root, modalities=MODS, label_values=LABELS, cache_dir=cache)
  assert v.image.shape == (10, 10, 8, 4)


def test_splits(tmp_path):
  root = _dataset(tmp_path, n=3)
  with pytest.raises(DataError, match="not found") as e:
    load_dataset(root, modalities=MODS, label_values=LABELS, split="train")
  assert str(root / "splits.json") in str(e.value)
  (root / "splits.json").write_text(json.dumps({"train": ["c2", "c0"], "val": ["c1"]}))
  vols = load_dataset(root, modalities=MODS, label_values=LABELS, split="train")
  assert [v.case_id for v in vols] == ["c2", "c0"]
  with pytest.raises(DataError, match="no split 'test'"):
    load_dataset(root, modalities=MODS, label_values=LABELS, split="test")
  (root / "splits.json").write_text(json.dumps({"train": ["c0", "ghost"]}))
  with pytest.raises(DataError, match="ghost") as e:
    load_dataset(root, modalities=MODS, label_values=LABELS, split="train")
  assert str(root / "splits.json") in str(e.value)


def test_preprocess_in_memory_arrays_matches_files(tmp_path):
  case = _case(tmp_path, mods=("t1", "flair"))
  from_files = preprocess_case(case, MODS, LABELS, target_spacing=2.0)
  arrays = {m: load_nifti(p)[0] for m, p in case.images.items()}
  raw = preprocess.raw_case_from_arrays(arrays, AFFINE)
  v = preprocess.preprocess_raw(raw, "input", MODS, LABELS, target_spacing=2.0)
  np.testing.assert_array_equal(v.image, from_files.image)
  np.testing.assert_array_equal(v.available, from_files.available)
  assert v.label is None and v.case_id == "input"
  assert v.transform.to_dict() == from_files.transform.to_dict()
  bad = dict(arrays, t1=np.zeros((3, 3, 3), np.float32))
  with pytest.raises(DataError, match=r"^images\['t1'\]: shape"):
    preprocess.raw_case_from_arrays(bad, AFFINE)
  bad = dict(arrays, t1=np.full(SHAPE, np.nan, np.float32))
  with pytest.raises(DataError, match=r"^images\['t1'\]: .*NaN"):
    preprocess.raw_case_from_arrays(bad, AFFINE)
  with pytest.raises(DataError, match="^affine"):
    preprocess.raw_case_from_arrays(arrays, np.eye(3))
  raw = preprocess.raw_case_from_arrays(arrays, AFFINE, label=np.full(SHAPE, 3))
  with pytest.raises(DataError, match=r"^input: label values \[3\]"):
    preprocess.preprocess_raw(raw, "input", MODS, LABELS)


# ----------------------------------------------------------------------------------------------
# Orientation: the same case stored RAS, LPS or with permuted axes (#21)

RAS_AFFINE = np.array([[1.0, 0, 0, -7], [0, 1.0, 0, 5], [0, 0, 1.5, 2], [0, 0, 0, 1]])
LOPSIDED_BRAIN = (slice(2, 11), slice(3, 13), slice(1, 8))  # not symmetric: flips show


def _stored(tmp_path, axcodes):
  """The same case (RAS arrays above) re-stored with the axes `axcodes`, as a BraTS folder."""
  rng = np.random.default_rng(3)
  ras = {m: np.zeros(SHAPE, np.float32) for m in MODS}
  for m in MODS:
    ras[m][LOPSIDED_BRAIN] = rng.gamma(4.0, 25.0, ras[m][LOPSIDED_BRAIN].shape)
  label = np.zeros(SHAPE, np.int16)
  label[4:9, 5:10, 2:6] = 2
  label[5:7, 6:8, 3:5] = 4
  ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                         nib.orientations.axcodes2ornt(axcodes))
  folder = tmp_path / axcodes

  def store(array, name):
    img = nib.Nifti1Image(array, RAS_AFFINE).as_reoriented(ornt)
    return _save(folder / name, np.asarray(img.dataobj), img.affine)

  images = {m: store(ras[m], f"{axcodes}_{m}.nii.gz") for m in MODS}
  return CaseFiles(axcodes, images, store(label, f"{axcodes}_seg.nii.gz"), folder)


def _world(path_or_array, affine=None):
  """A label map in RAS+ voxel order (world-aligned), to compare maps stored any way."""
  img = (nib.load(str(path_or_array)) if affine is None
         else nib.Nifti1Image(np.asarray(path_or_array), affine))
  return np.asarray(nib.as_closest_canonical(img).dataobj)


def _fake_prediction(volume):
  """Stands in for a model that knows left from right: bright FLAIR in the first half of axis 0."""
  pred = (volume.image[..., 0] > 0.5).astype(np.int32)
  pred[volume.image.shape[0] // 2:] = 0
  return pred


@pytest.mark.parametrize("target_spacing", [None, 2.0])
def test_the_same_case_stored_any_way_gives_the_same_labels_in_world_space(tmp_path,
                                                                           target_spacing):
  stored = {codes: _stored(tmp_path, codes) for codes in ("RAS", "LPS", "SLA")}
  assert nib.aff2axcodes(nib.load(str(stored["SLA"].images["t1"])).affine) == ("S", "L", "A")
  volumes = {codes: preprocess_case(case, MODS, LABELS, target_spacing=target_spacing)
             for codes, case in stored.items()}
  ras = volumes["RAS"]
  for codes, v in volumes.items():
    # The model sees identical arrays, in RAS+ axes, whatever the storage.
    np.testing.assert_array_equal(v.image, ras.image, err_msg=codes)
    np.testing.assert_array_equal(v.label, ras.label, err_msg=codes)
    np.testing.assert_allclose(v.transform.affine, ras.transform.affine, atol=1e-9)
    # A prediction put back in each file's grid agrees with the others in world space.
    case = stored[codes]
    back = to_original_grid(v.transform, _fake_prediction(v), order=0)
    assert back.shape == nib.load(str(case.label)).shape
    np.testing.assert_array_equal(_world(back, nib.load(str(case.label)).affine),
                                  _world(to_original_grid(ras.transform, _fake_prediction(ras)),
                                         RAS_AFFINE), err_msg=codes)
    assert _fake_prediction(v).any()
    # Written out, the labels land on the file's own grid with the dataset's values.
    out = tmp_path / f"pred_{codes}.nii.gz"
    write_prediction(out, v.label, v.transform, LABELS)
    np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(case.label)).affine)
    if target_spacing is None:  # no interpolation: the exact inverse of the preprocessing
      np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj),
                                    np.asarray(nib.load(str(case.label)).dataobj), err_msg=codes)
  # GridTransform round-trips through the cache's JSON with its orientation.
  t = volumes["SLA"].transform
  assert GridTransform.from_dict(json.loads(json.dumps(t.to_dict()))).to_dict() == t.to_dict()


def test_to_original_grid_inverts_the_crop_and_reorientation_exactly(tmp_path):
  case = _stored(tmp_path, "LPI")
  v = preprocess_case(case, MODS, LABELS)
  truth = preprocess.remap_labels(load_nifti(case.label, label=True)[0], LABELS)
  np.testing.assert_array_equal(to_original_grid(v.transform, v.label), truth)
  brain = to_original_grid(v.transform, v.brain.astype(np.uint8)).astype(bool)
  np.testing.assert_array_equal(brain, load_nifti(case.images["flair"])[0] != 0)


def test_a_modality_stored_in_another_orientation_is_named(tmp_path):
  """Files of one case must share a grid; the odd one is named on one line."""
  case = _stored(tmp_path, "RAS")
  other = _stored(tmp_path, "LPS")
  mixed = CaseFiles("mixed", dict(case.images, t2=other.images["t2"]), case.label, case.origin)
  _raises_naming(other.images["t2"], "affine differs", mixed)
