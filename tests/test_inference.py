"""Sliding-window inference and the shared-encoding subset evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemijax.evaluation import subsets as evaluation
from hemijax.inference import sliding_window as inference
from hemijax.models import base
from hemijax.models.hemis import HeMIS

SMALL = dict(backend_features=(3,), backend_kernel=3, frontend_features=(4,), frontend_kernel=3,
             final_kernel=3)


def make_method(spatial_dims, m=3):
  model = HeMIS(num_modalities=m, num_classes=3, **SMALL)
  shape = (1,) + (8,) * spatial_dims + (m,)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), jnp.ones((1, m), bool))
  method = base.Method(name="hemis", model=model, loss_fn=None, modalities=("a", "b", "c")[:m],
                       num_classes=3, spatial_dims=spatial_dims)
  return method, variables


def test_window_starts_cover_the_axis():
  for size, roi, overlap in [(10, 4, 0.5), (7, 7, 0.5), (5, 8, 0.25), (33, 16, 0.0)]:
    starts = inference.window_starts(size, roi, overlap)
    covered = np.zeros(max(size, roi), bool)
    for s in starts:
      covered[s:s + roi] = True
    assert covered[:size].all() and starts[-1] + roi >= size


def test_subset_masks_of_all_subsets():
  modalities = ("flair", "t1", "t1ce", "t2")
  masks = inference.subset_masks(evaluation.all_subsets(modalities), modalities)
  assert masks.shape == (15, 4) and masks.any(1).all()
  assert len({tuple(m) for m in masks}) == 15


@pytest.mark.slow  # ~40 s; the 2D case and the contract test cover CI
def test_shared_encoding_equals_independent_forwards_3d():
  method, variables = make_method(3)
  volume = np.asarray(jax.random.normal(jax.random.key(1), (11, 9, 10, 3)))
  masks = inference.subset_masks(evaluation.all_subsets(("a", "b", "c")), ("a", "b", "c"))
  settings = inference.WindowSettings(roi=(6, 6, 6), overlap=0.5, batch_size=3)
  shared = inference.predict_probabilities(method, variables, volume, masks, settings)
  for i, mask in enumerate(masks):
    single = inference.predict_probabilities(method, variables, volume * mask, mask[None], settings)
    np.testing.assert_allclose(shared[i], single[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shared.sum(-1), 1.0, rtol=1e-5)


def test_whole_volume_window_equals_direct_apply_3d():
  method, variables = make_method(3)
  volume = np.asarray(jax.random.normal(jax.random.key(2), (7, 8, 6, 3)))
  mask = np.array([[True, False, True]])
  probs = inference.predict_probabilities(method, variables, volume, mask,
                                          inference.WindowSettings(roi=None))
  direct = jax.nn.softmax(method.apply(variables, volume[None] * mask[:, None, None, None, :],
                                       jnp.asarray(mask)), -1)
  np.testing.assert_allclose(probs[0], direct[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_window_at_a_time_equals_batched_windows(spatial_dims):
  """The low-memory schedule (3D on CPU by default) computes what the batched one does."""
  method, variables = make_method(spatial_dims)
  depth = 5 if spatial_dims == 3 else 1  # 2D models take (X, Y, 1) windows
  windows = np.asarray(jax.random.normal(jax.random.key(4), (3, 6, 7, depth, 3)))
  masks = np.array([[True, False, True], [False, True, False]])
  one = inference.make_window_forward(method, variables, one_window_at_a_time=True)(windows, masks)
  batched = inference.make_window_forward(method, variables, one_window_at_a_time=False)(windows,
                                                                                        masks)
  assert one.shape == batched.shape == (2, 3) + windows.shape[1:-1] + (3,)
  np.testing.assert_allclose(one, batched, rtol=1e-5, atol=1e-6)


def test_2d_models_run_slice_by_slice():
  method, variables = make_method(2)
  volume = np.asarray(jax.random.normal(jax.random.key(3), (9, 7, 5, 3)))
  mask = np.array([[True, True, False]])
  probs = inference.predict_probabilities(method, variables, volume, mask,
                                          inference.WindowSettings(batch_size=2))
  slices = np.moveaxis(volume, 2, 0) * mask[0]
  direct = jax.nn.softmax(method.apply(variables, slices, jnp.asarray(np.repeat(mask, 5, 0))), -1)
  np.testing.assert_allclose(probs[0], np.moveaxis(np.asarray(direct), 0, 2), rtol=1e-5, atol=1e-6)


def test_bad_masks_are_value_errors():
  method, variables = make_method(3)
  volume = np.zeros((6, 6, 6, 3), np.float32)
  with pytest.raises(ValueError, match="none empty"):
    inference.predict_probabilities(method, variables, volume, np.zeros((1, 3), bool))
  with pytest.raises(ValueError, match="volume must be"):
    inference.predict_probabilities(method, variables, volume[..., :2], np.ones((1, 3), bool))


def test_window_settings_come_from_the_config():
  from configs import unet
  config = unet.get_config("smoke")
  settings = inference.WindowSettings.from_config(config)
  assert settings == inference.WindowSettings(
      roi=tuple(config.data.patch_size), overlap=config.eval.overlap,
      batch_size=config.eval.sw_batch_size, blend=config.eval.blend)
  config.eval.roi_size = (8, 8, 8)
  config.eval.overlap = 0.25
  assert inference.WindowSettings.from_config(config).roi == (8, 8, 8)
  assert inference.WindowSettings.from_config(config).overlap == 0.25
  for bad, needle in [(dict(overlap=1.0), "eval.overlap"), (dict(batch_size=0), "sw_batch_size"),
                      (dict(blend="box"), "eval.blend"), (dict(roi=(8, 0, 8)), "roi_size")]:
    with pytest.raises(ValueError, match=needle):
      inference.WindowSettings(**bad)
