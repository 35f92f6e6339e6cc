"""Augmentation: deterministic in the key, label-consistent resampling, borders marked invalid,
modality slots respected, differentiable, identity when disabled; 2D and 3D."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemijax.nn import augment

SHAPES = {"3d": (2, 16, 16, 16, 3), "2d": (2, 32, 32, 3)}
MASK = np.array([[True, False, True], [True, True, True]])
ALL_OFF = dict(enabled=True, flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, elastic_prob=0.0,
               intensity_prob=0.0, gamma_prob=0.0, noise_prob=0.0, bias_prob=0.0, blur_prob=0.0)
SPATIAL_ONLY = dict(ALL_OFF, flip_prob=0.5, flip_axes=(0, 1), rotate_prob=1.0, rotate_degrees=20.0,
                    scale_prob=1.0, scale_range=(0.8, 1.2), elastic_prob=1.0, elastic_sigma=6.0,
                    elastic_magnitude=1.5)
EVERYTHING = dict(SPATIAL_ONLY, intensity_prob=1.0, gamma_prob=1.0, noise_prob=1.0, bias_prob=1.0,
                  blur_prob=1.0, remap_prob=1.0)
AUGMENT_EVERYTHING = jax.jit(augment.make_augment(EVERYTHING))  # one compilation per shape


def make_batch(dims, seed=0, with_valid=False):
  shape = SHAPES[dims]
  rng = np.random.default_rng(seed)
  image = rng.normal(size=shape).astype(np.float32) * MASK.reshape((2,) + (1,) * (len(shape) - 2)
                                                                   + (3,))
  batch = {"image": image, "modality_mask": MASK.copy(),
           "label": rng.integers(0, 4, shape[:-1]).astype(np.int32)}
  if with_valid:
    valid = np.ones(shape[:-1], bool)
    valid[:, :3] = False   # padding along the first spatial axis
    batch["valid"] = valid
  return batch


def blocky_labels(spatial, seed=0):
  """Class ids constant over 4-voxel blocks, so that nearest and linear reads differ visibly."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 4, (2,) + tuple(n // 4 for n in spatial))
  for axis in range(1, len(spatial) + 1):
    coarse = np.repeat(coarse, 4, axis=axis)
  return coarse.astype(np.int32)


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_same_key_same_batch_and_different_key_different_batch(dims):
  fn = AUGMENT_EVERYTHING
  batch = make_batch(dims)
  first, again = fn(jax.random.key(3), batch), fn(jax.random.key(3), batch)
  other = fn(jax.random.key(4), batch)
  for name in ("image", "label", "valid"):
    np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(again[name]))
  assert not np.array_equal(np.asarray(first["image"]), np.asarray(other["image"]))
  # Each example draws its own transform.
  assert not np.array_equal(np.asarray(first["valid"][0]), np.asarray(first["valid"][1]))


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_disabled_is_the_identity(dims):
  batch = make_batch(dims)
  fn = augment.make_augment(augment.default_config(enabled=False))
  assert fn(jax.random.key(0), batch) is batch
  # A config with every probability 0 changes nothing either (but adds an all-True valid).
  out = jax.jit(augment.make_augment(ALL_OFF))(jax.random.key(0), batch)
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  assert np.all(np.asarray(out["valid"]))


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_linear_image_follows_the_nearest_label(dims):
  """A ramp along each axis, as label and as image: linear interpolation of a ramp is exact, so the
  image reads the source coordinate and the nearest-neighbour label is within half a voxel of it."""
  shape = SHAPES[dims]
  spatial = shape[1:-1]
  fn = jax.jit(augment.make_augment(SPATIAL_ONLY))
  for axis in range(len(spatial)):
    ramp = np.broadcast_to(np.arange(spatial[axis]).reshape(
        [-1 if a == axis else 1 for a in range(len(spatial))]), spatial)
    label = np.broadcast_to(ramp, shape[:-1]).astype(np.int32)
    image = np.repeat(label[..., None].astype(np.float32), 3, axis=-1)
    batch = {"image": image, "label": label, "modality_mask": np.ones((2, 3), bool)}
    out = fn(jax.random.key(axis), batch)
    valid = np.asarray(out["valid"])
    got_image, got_label = np.asarray(out["image"][..., 0]), np.asarray(out["label"])
    assert valid.mean() > 0.3 and not np.array_equal(got_label, label), "no transform happened"
    np.testing.assert_array_less(np.abs(got_image - got_label)[valid], 0.5 + 1e-4)
    assert np.all(got_image[~valid] == 0) and np.all(got_label[~valid] == 0)


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_nearest_image_equals_label_where_valid(dims):
  shape = SHAPES[dims]
  spatial = shape[1:-1]
  label = blocky_labels(spatial)
  image = label[..., None].astype(np.float32)
  options = dict(augment.default_config().to_dict(), **SPATIAL_ONLY)
  options["flip_axes"] = tuple(options["flip_axes"])
  for b in range(2):
    coords = augment.sample_coordinates(jax.random.key(10 + b), spatial, options)
    got_image, got_label, valid = augment.resample(coords, jnp.asarray(image[b]),
                                                   jnp.asarray(label[b]), image_order=0)
    valid = np.asarray(valid)
    assert 0.3 < valid.mean() < 1.0
    np.testing.assert_array_equal(np.asarray(got_image[..., 0])[valid],
                                  np.asarray(got_label)[valid].astype(np.float32))
    assert not np.array_equal(np.asarray(got_label), label[b])


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_sources_outside_the_patch_become_invalid(dims):
  """Zooming out by 2 reads source c + 2 (p - c): outside the patch where |p - c| > c / 2."""
  batch = make_batch(dims, with_valid=True)
  spatial = SHAPES[dims][1:-1]
  fn = jax.jit(augment.make_augment(dict(ALL_OFF, scale_prob=1.0, scale_range=(0.5, 0.5))))
  out = fn(jax.random.key(0), batch)
  centre = (np.array(spatial) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij"))
  source = centre.reshape((-1,) + (1,) * len(spatial)) + 2 * (
      grid - centre.reshape((-1,) + (1,) * len(spatial)))
  inside = np.all((source >= 0) & (source <= np.reshape(np.array(spatial) - 1,
                                                         (-1,) + (1,) * len(spatial))), axis=0)
  # The input's padding (first 3 rows) is read where the nearest source row (halves rounded up,
  # as jax rounds them away from zero) is < 3, and stays invalid there.
  expected = inside & (np.floor(source[0] + 0.5) >= 3)
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(out["valid"][b]), expected)
  assert np.all(np.asarray(out["image"])[~np.asarray(out["valid"])] == 0)


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_modalities_untouched_and_absent_slots_exactly_zero(dims):
  batch = make_batch(dims)
  absent = ~MASK.reshape((2,) + (1,) * (len(SHAPES[dims]) - 2) + (3,))
  batch["image"] = batch["image"] + 5.0 * absent   # garbage in absent slots must not survive
  out = AUGMENT_EVERYTHING(jax.random.key(1), batch)
  np.testing.assert_array_equal(np.asarray(out["modality_mask"]), MASK)
  image = np.asarray(out["image"])
  assert np.all(image[0, ..., 1] == 0), "an absent modality slot is not exactly zero"
  assert np.all(np.abs(image[..., 0]).max(axis=tuple(range(1, image.ndim - 1))) > 0)
  assert np.all(np.isfinite(image))


# 3D compiles a second (differentiated) augmentation program: slow; 2D runs the same code on CI.
@pytest.mark.parametrize("dims", ["2d", pytest.param("3d", marks=pytest.mark.slow)])
def test_gradients_through_the_augmented_image_are_finite(dims):
  batch = make_batch(dims)
  fn = augment.make_augment(EVERYTHING)
  total = lambda image: jnp.sum(fn(jax.random.key(2), dict(batch, image=image))["image"])
  grad = jax.jit(jax.grad(total))(jnp.asarray(batch["image"]))
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


def test_intensity_transforms_leave_labels_and_valid_alone():
  batch = make_batch("3d", with_valid=True)
  out = jax.jit(augment.make_augment(dict(EVERYTHING, **{k: 0.0 for k in (
      "flip_prob", "rotate_prob", "scale_prob", "elastic_prob")})))(jax.random.key(0), batch)
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  np.testing.assert_array_equal(np.asarray(out["valid"]), batch["valid"])
  assert not np.allclose(np.asarray(out["image"])[batch["valid"]],
                         batch["image"][batch["valid"]], atol=1e-3)


def test_nested_and_other_batches():
  fn = AUGMENT_EVERYTHING
  nested = {"tissue": make_batch("2d"), "lesion": make_batch("2d", seed=1)}
  out = fn(jax.random.key(0), nested)
  assert set(out) == {"tissue", "lesion"} and "valid" in out["tissue"]
  voxels = {"voxels": np.ones((5, 3), np.float32), "available": np.ones((5, 3), bool)}
  np.testing.assert_array_equal(np.asarray(fn(jax.random.key(0), voxels)["voxels"]),
                                voxels["voxels"])


@pytest.mark.parametrize("option,value", [("rotate_prob", 1.5), ("scale_range", (1.2, 0.8)),
                                          ("flip_probability", 0.5), ("blur_sigma", (0.0, 1.0)),
                                          ("scale_shift", (1.0, 0.1))])
def test_bad_options_are_named(option, value):
  with pytest.raises(ValueError, match=f"config.augment.*{option}"):
    augment.make_augment({"enabled": True, option: value})


def test_flip_axis_beyond_the_patch_rank():
  fn = augment.make_augment(dict(ALL_OFF, flip_prob=1.0, flip_axes=(2,)))
  with pytest.raises(ValueError, match="flip_axes"):
    fn(jax.random.key(0), make_batch("2d"))


def test_train_step_without_augmentation_is_unchanged_and_with_it_differs():
  import optax
  from hemijax.training import step as step_lib

  def loss_fn(params, model_state, batch, key, step):
    del step
    noise = jax.random.normal(key, ())
    loss = jnp.mean((batch["image"] * params["w"]) ** 2) + 1e-3 * noise * params["w"]
    return loss, ({}, model_state)

  optimizer = optax.sgd(0.1)
  state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones(())}, "model_state": {},
           "opt_state": optimizer.init({"w": jnp.ones(())})}
  batch = jax.tree.map(jnp.asarray, make_batch("2d"))
  plain = jax.jit(step_lib.make_train_step(loss_fn, optimizer, 0))(state, batch)
  disabled = jax.jit(step_lib.make_train_step(
      loss_fn, optimizer, 0, augment=augment.make_augment({"enabled": False})))(state, batch)
  # Runs, changes nothing the loss reads: the loss must still get the step's own key.
  no_op = jax.jit(step_lib.make_train_step(
      loss_fn, optimizer, 0, augment=augment.make_augment(ALL_OFF)))(state, batch)
  enabled = jax.jit(step_lib.make_train_step(
      loss_fn, optimizer, 0, augment=augment.make_augment(EVERYTHING)))(state, batch)
  assert float(plain[1]["loss"]) == float(disabled[1]["loss"]) == float(no_op[1]["loss"])
  assert float(plain[1]["loss"]) != float(enabled[1]["loss"])


def test_contrast_remap_is_monotone_keeps_the_range_and_changes_contrast():
  """A random monotone piecewise-linear curve per modality: order and range kept, tissue contrast
  changed; the same key gives the same curve; strength 0 is the identity."""
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(24, 24, 2)).astype(np.float32))
  valid = jnp.ones((24, 24), bool)
  slopes = jnp.asarray([[0.3, 1.7], [1.7, 0.3], [1.0, 1.0], [0.5, 1.5]], jnp.float32)
  out = np.asarray(augment._remap(image, valid, slopes))
  for m in range(2):
    x, y = np.asarray(image[..., m]).ravel(), out[..., m].ravel()
    order = np.argsort(x)
    assert np.all(np.diff(y[order]) >= -1e-5)                     # monotone
    assert y.min() == pytest.approx(x.min(), abs=1e-5) and y.max() == pytest.approx(x.max(), abs=1e-4)
    assert np.abs(y - x).max() > 0.1                              # not the identity
  # NumPy transcription: knots at i/K of the range, values the normalised cumulative slopes.
  x = np.asarray(image[..., 0])
  lo, hi = x.min(), x.max()
  knots = np.concatenate([[0.0], np.cumsum(np.asarray(slopes[:, 0]))])
  expected = lo + (hi - lo) * np.interp((x - lo) / (hi - lo), np.linspace(0, 1, 5), knots / knots[-1])
  np.testing.assert_allclose(out[..., 0], expected, atol=1e-4)
  same = augment._remap(image, valid, jnp.ones((4, 2)))
  np.testing.assert_allclose(np.asarray(same), np.asarray(image), atol=1e-5)
  cfg = dict(ALL_OFF, remap_prob=1.0)
  batch = make_batch("2d")
  a = augment.make_augment(cfg)(jax.random.key(3), batch)["image"]
  b = augment.make_augment(cfg)(jax.random.key(3), batch)["image"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), batch["image"])
  with pytest.raises(ValueError, match="config.augment.remap_strength"):
    augment.make_augment(dict(cfg, remap_strength=1.0))
