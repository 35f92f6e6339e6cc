"""Patch samplers: shapes, determinism, strategies, padding."""
import numpy as np
import pytest

from hemijax.data import sampling
from hemijax.data.io import DataError
from hemijax.data.preprocess import GridTransform, Volume
from hemijax.data.sampling import Sampler, sample_batch

M = 3


def _volume(case_id="v", shape=(20, 18, 12), available=(True, False, True), lesion=True):
  """Image channel i holds 1000*i + the voxel's flat index, so patches can be located."""
  n = int(np.prod(shape))
  flat = np.arange(n, dtype=np.float32).reshape(shape)
  image = np.stack([flat + 1000 * i for i in range(M)], -1) * np.asarray(available, np.float32)
  brain = np.zeros(shape, bool)
  brain[2:-2, 2:-2, 1:-1] = True
  label = np.zeros(shape, np.int32)
  if lesion:
    label[8:12, 8:11, 5:8] = 1   # 36 voxels
    label[9, 9, 6] = 2           # one voxel of a rare class
  t = GridTransform(shape, np.eye(4), (0, 0, 0), shape, (1.0, 1.0, 1.0), shape, np.eye(4))
  return Volume(case_id, image, np.asarray(available), label, brain, (1.0, 1.0, 1.0), t)


def _centres(sampler, volume, n, seed=0):
  rng = np.random.default_rng(seed)
  return np.array([sampler.centre(rng, volume) for _ in range(n)])


@pytest.mark.parametrize("patch", [(8, 6), (8, 6, 4)])
@pytest.mark.parametrize("strategy", sampling.STRATEGIES)
def test_shapes_dtypes_and_mask(patch, strategy):
  vols = [_volume("a"), _volume("b", available=(True, True, False))]
  batch = sample_batch(vols, np.random.default_rng((0, 1)), patch_size=patch, batch_size=5,
                       strategy=strategy)
  assert set(batch) == {"image", "modality_mask", "label", "valid"}
  assert batch["image"].shape == (5,) + patch + (M,) and batch["image"].dtype == np.float32
  assert batch["modality_mask"].shape == (5, M) and batch["modality_mask"].dtype == bool
  assert batch["label"].shape == (5,) + patch and batch["label"].dtype == np.int32
  assert batch["valid"].shape == (5,) + patch and batch["valid"].dtype == bool
  for b in range(5):
    mask = batch["modality_mask"][b]
    assert mask.tolist() in ([True, False, True], [True, True, False])
    # Absent channels are zero; present ones are not (these volumes are non-zero everywhere).
    assert not batch["image"][b][..., ~mask].any()


def test_deterministic_given_generator_state():
  vols = [_volume("a"), _volume("b")]
  for strategy in sampling.STRATEGIES:
    kw = dict(patch_size=(6, 6, 4), batch_size=4, strategy=strategy)
    a = sample_batch(vols, np.random.default_rng((3, 10)), **kw)
    b = sample_batch(vols, np.random.default_rng((3, 10)), **kw)
    c = sample_batch(vols, np.random.default_rng((3, 11)), **kw)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])


def test_patch_content_and_padding():
  v = _volume(shape=(10, 8, 6), lesion=False)
  sampler = Sampler([v], patch_size=(4, 4, 4))
  rng = np.random.default_rng(0)
  batch = sampler.sample(rng, 6)
  for b in range(6):
    image, valid = batch["image"][b, ..., 0], batch["valid"][b]
    # Locate the patch from an in-volume voxel and check the whole patch against the volume.
    i = np.argwhere(valid)[0]
    x, y, z = np.unravel_index(int(image[tuple(i)]), v.label.shape)
    start = np.array([x, y, z]) - i
    for j in np.argwhere(np.ones((4, 4, 4))):
      p = start + j
      inside = np.all(p >= 0) and np.all(p < v.label.shape)
      assert valid[tuple(j)] == inside
      if inside:
        assert image[tuple(j)] == v.image[tuple(p) + (0,)]
        assert batch["label"][b][tuple(j)] == v.label[tuple(p)]
      else:
        assert image[tuple(j)] == 0 and batch["label"][b][tuple(j)] == 0


def test_patch_larger_than_volume_is_padded():
  v = _volume(shape=(10, 8, 6), lesion=False)
  batch = Sampler([v], patch_size=(16, 16)).sample(np.random.default_rng(0), 3)
  assert batch["valid"].sum(axis=(1, 2)).tolist() == [80, 80, 80]


def test_2d_slices_are_axial():
  v = _volume()
  batch = Sampler([v], patch_size=(8, 6)).sample(np.random.default_rng(1), 6)
  for b in range(6):
    i, j = np.argwhere(batch["valid"][b])[0]
    x, y, z = np.unravel_index(int(batch["image"][b, i, j, 0]), v.label.shape)
    x0, y0 = x - i + 8, y - j + 8  # in the padded arrays below
    padded = np.pad(v.image[:, :, z], ((8, 8), (8, 8), (0, 0)))
    np.testing.assert_array_equal(batch["image"][b], padded[x0:x0 + 8, y0:y0 + 6])
    padded = np.pad(v.label[:, :, z], 8)
    np.testing.assert_array_equal(batch["label"][b], padded[x0:x0 + 8, y0:y0 + 6])


def test_uniform_centres_cover_brain_only():
  v = _volume()
  centres = _centres(Sampler([v], patch_size=(4, 4, 4)), v, 400)
  assert v.brain[tuple(centres.T)].all()
  # Roughly uniform: the foreground (39 of 1920 brain voxels) is rarely hit.
  assert (v.label[tuple(centres.T)] > 0).mean() < 0.1


def test_balanced_picks_classes_uniformly():
  v = _volume()
  classes = v.label[tuple(_centres(Sampler([v], patch_size=(4, 4, 4), strategy="balanced"), v, 600).T)]
  counts = np.bincount(classes, minlength=3) / 600
  np.testing.assert_allclose(counts, 1 / 3, atol=0.07)
  # class_probs reweights the present classes.
  s = Sampler([v], patch_size=(4, 4, 4), strategy="balanced", class_probs=[0, 0, 1])
  assert (v.label[tuple(_centres(s, v, 50).T)] == 2).all()


def test_lesion_weighted():
  v = _volume()
  s = Sampler([v], patch_size=(4, 4, 4), strategy="lesion_weighted", lesion_class=1,
              lesion_dilation=0, lesion_fraction=1.0)
  assert (v.label[tuple(_centres(s, v, 100).T)] >= 1).all()  # voxel 2 lies inside class 1's box
  s = Sampler([v], patch_size=(4, 4, 4), strategy="lesion_weighted", lesion_dilation=2,
              lesion_fraction=1.0)
  c = _centres(s, v, 300)
  assert (c.min(0) >= [6, 6, 3]).all() and (c.max(0) <= [13, 12, 9]).all()
  assert (v.label[tuple(c.T)] == 0).any()  # the dilated rim is sampled too
  s = Sampler([v], patch_size=(4, 4, 4), strategy="lesion_weighted", lesion_fraction=0.5,
              lesion_dilation=0)
  hits = (v.label[tuple(_centres(s, v, 400).T)] > 0).mean()
  assert 0.4 < hits < 0.65  # half from the lesion, the rest uniform (2% lesion)
  # No lesion at all: falls back to uniform brain voxels.
  empty = _volume(lesion=False)
  assert empty.brain[tuple(_centres(s, empty, 50).T)].all()


def test_index_tables_and_rejection_agree():
  # A class covering more than REJECTION_MIN_FRACTION of the volume is drawn by rejection.
  v = _volume()
  v.label[:, :, :6] = np.where(v.brain[:, :, :6], 1, 0)
  v.label[9, 9, 9] = 2
  pools = sampling._tables(v).class_pools()
  assert pools[1].indices is None and pools[2].indices is not None
  s = Sampler([v], patch_size=(4, 4, 4), strategy="balanced", class_probs=[0, 1, 0])
  c = _centres(s, v, 200)
  assert (v.label[tuple(c.T)] == 1).all()
  assert len({tuple(x) for x in c}) > 100  # spread over the class, not stuck on a few voxels


def test_errors():
  v = _volume()
  with pytest.raises(DataError, match="strategy"):
    Sampler([v], patch_size=(4, 4), strategy="random")
  with pytest.raises(DataError, match="patch_size"):
    Sampler([v], patch_size=(4,))
  with pytest.raises(DataError, match="no volumes"):
    Sampler([], patch_size=(4, 4))
  unlabelled = _volume("nolabel")
  unlabelled.label = None
  with pytest.raises(DataError, match="nolabel"):
    Sampler([unlabelled], patch_size=(4, 4))
  with pytest.raises(DataError, match="class_probs"):
    Sampler([v], patch_size=(4, 4), strategy="balanced", class_probs=[-1, 1])
