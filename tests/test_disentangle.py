"""Disentanglement with gated fusion: subsets ignore dropped images, the loss terms, a smoke run.

Compilation dominates at these sizes, so the tests share one parameter set (filled from NumPy
instead of a compiled `init`) and one jitted function per model variant.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import disentangle as disentangle_config
from hemijax.models import disentangle, get_method
from hemijax.nn import layers
from model_helpers import metrics_records, smoke_training_config

M = 4
C = 4  # tumour classes
SIZE = 8
# Two scales and two appearance convolutions keep compilation short; presets hold the real sizes.
TINY = dict(content_features=(2, 3), appearance_features=(2, 2), appearance_strides=(1, 2),
            appearance_size=3, gate_kernel=3, conv_impl="xla")
STACKED = ("content_encoders", "appearance_encoders", "reconstruction_decoders")
# (fusion, disentangle): the full method and the ablation arms.
VARIANTS = [("gated", True), ("mean", True), ("mean", False)]


def subsets(m):
  return [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]


def subset_mask(subset, batch=2):
  mask = np.zeros((batch, M), bool)
  mask[:, list(subset)] = True
  return jnp.asarray(mask)


def make_model(fusion="gated", disentangle_on=True):
  return disentangle.Disentangle(num_modalities=M, num_classes=C, fusion=fusion,
                                 disentangle=disentangle_on, **TINY)


def numpy_params(model, image, seed=0):
  """He-scaled random parameters in the shapes `init` gives (biases 0, norm scales 1)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), image, jnp.ones((2, M), bool))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "bias":
      return jnp.zeros(leaf.shape)
    if name == "scale":
      return jnp.ones(leaf.shape)
    stacked = path[0].key in STACKED
    fan_in = math.prod(leaf.shape[1 if stacked else 0:-1])
    return jnp.asarray(rng.normal(size=leaf.shape) * math.sqrt(2 / fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def image():
  return jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, SIZE, M))


@pytest.fixture(scope="module")
def full_params(image):
  return numpy_params(make_model(), image)


def variant_params(params, fusion, disentangle_on):
  """The full model's parameters restricted to an ablation arm's parts."""
  drop = set()
  if fusion == "mean":
    drop |= {k for k in params if k.startswith("fusers_")}
  if not disentangle_on:
    drop |= {"appearance_encoders", "reconstruction_decoders"}
  return {k: v for k, v in params.items() if k not in drop}


@functools.lru_cache(maxsize=None)
def fused_and_logits_fn(fusion, disentangle_on):
  """jit: (params, image, mask) -> fused codes, __call__ logits, decode(encode(zeroed)) logits."""
  model = make_model(fusion, disentangle_on)

  @jax.jit
  def run(params, image, mask):
    variables = {"params": params}
    fused = model.apply(variables, model.apply(variables, image, method="encode"), mask,
                        method="fuse")
    zeroed = jnp.where(mask[:, None, None, None, :], image, 0)
    features = model.apply(variables, zeroed, method="encode")
    decoded = model.apply(variables, features, mask, method="decode")
    return fused, model.apply(variables, image, mask), decoded, features

  return run


def test_init_holds_every_part_with_stacked_modality_weights(image):
  for fusion, disentangle_on in VARIANTS:
    model = make_model(fusion, disentangle_on)
    params = jax.eval_shape(model.init, jax.random.key(0), image, jnp.ones((2, M), bool))["params"]
    expected = {"content_encoders", "segmentation_decoder"}
    if fusion == "gated":
      expected |= {"fusers_0", "fusers_1"}
    if disentangle_on:
      expected |= {"appearance_encoders", "reconstruction_decoders"}
    assert set(params) == expected
    for name in STACKED:
      if name in params:
        assert all(p.shape[0] == M for p in jax.tree.leaves(params[name]))


@pytest.mark.parametrize("fusion", ["gated", "mean"])
def test_fused_code_does_not_depend_on_dropped_images(full_params, image, fusion):
  params = variant_params(full_params, fusion, True)
  run = fused_and_logits_fn(fusion, True)
  other = jax.random.normal(jax.random.key(2), image.shape) * 100
  for subset in subsets(M):
    mask = subset_mask(subset)
    fused, logits, _, _ = run(params, image, mask)
    present = mask[:, None, None, None, :]
    # The dropped modalities' images replaced by other values, by NaN, by infinity.
    for garbage in (other, jnp.nan, jnp.inf):
      fused_b, logits_b, _, _ = run(params, jnp.where(present, image, garbage), mask)
      for a, b in zip(fused + (logits,), fused_b + (logits_b,)):
        np.testing.assert_array_equal(a, b)
    # A kept modality's image does change the fused code (so the check above can fail).
    fused_c, _, _, _ = run(params, image.at[..., subset[0]].add(1.0), mask)
    assert not np.allclose(fused[0], fused_c[0])


@pytest.mark.parametrize("fusion", ["gated", "mean"])
def test_encode_then_decode_equals_call(full_params, image, fusion):
  params = variant_params(full_params, fusion, True)
  run = fused_and_logits_fn(fusion, True)
  for subset in [(0,), (1, 3), (0, 1, 2, 3)]:
    _, logits, decoded, features = run(params, image, subset_mask(subset))
    assert [f.shape for f in features] == [(2, M, 8, 8, 8, 2), (2, M, 4, 4, 4, 3)]
    assert logits.shape == (2, SIZE, SIZE, SIZE, C)
    np.testing.assert_allclose(decoded, logits, rtol=1e-5, atol=1e-6)


def test_gates_are_voxelwise_per_modality_and_never_read_absent_codes():
  fuser = disentangle.GatedFusion(features=3, num_modalities=M, conv=layers.conv_factory("xla"))
  codes = jax.random.normal(jax.random.key(0), (1, M, 4, 4, 4, 3))
  mask = jnp.array([[True, False, True, False]])
  variables = jax.jit(fuser.init)(jax.random.key(1), codes, mask)
  assert variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, M * 3, M)  # one gate each
  assert variables["params"]["Conv_1"]["kernel"].shape == (1, 1, 1, M * 3, 3)  # 1x1x1 fusion
  # Output and its gradient with respect to the codes (which reaches the present codes only).
  run = jax.jit(jax.value_and_grad(lambda c: jnp.sum(fuser.apply(variables, c, mask) ** 2)))
  out, grad = run(codes)
  assert fuser.apply(variables, codes, mask).shape == (1, 4, 4, 4, 3)
  np.testing.assert_array_equal(out, run(codes.at[:, 1].set(jnp.nan))[0])
  assert np.all(np.asarray(grad[:, 1]) == 0) and np.all(np.asarray(grad[:, 3]) == 0)
  assert np.any(np.asarray(grad[:, 0]) != 0) and np.any(np.asarray(grad[:, 2]) != 0)


def loss_method(fusion="gated", disentangle_on=True, **loss_weights):
  config = disentangle_config.get_config("smoke")
  config.model.update(fusion=fusion, disentangle=disentangle_on, **TINY)
  config.data.patch_size = (SIZE,) * 3
  config.loss.update(loss_weights)
  return get_method(config)


def make_batch(available, key=0):
  """A batch per the contract: absent modalities are zeros; some voxels outside the volume."""
  available = np.asarray(available, bool)
  b = available.shape[0]
  k1, k2 = jax.random.split(jax.random.key(key))
  image = jax.random.normal(k1, (b, SIZE, SIZE, SIZE, M))
  image = jnp.where(available[:, None, None, None, :], image, 0)
  label = jax.random.randint(k2, (b, SIZE, SIZE, SIZE), 0, C)
  valid = jnp.ones((b, SIZE, SIZE, SIZE), bool).at[:, :2].set(False)
  return {"image": image, "modality_mask": jnp.asarray(available), "label": label, "valid": valid}


def test_gradients_finite_with_one_modality(full_params):
  method = loss_method()
  batch = make_batch([[False, False, True, False], [True, False, False, False]])
  grad_fn = jax.jit(jax.grad(lambda p, b: method.loss_fn(p, {}, b, jax.random.key(3), 0),
                             has_aux=True))
  grads, (metrics, _) = grad_fn(full_params, batch)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(metrics["modalities_kept"]) == 1.0
  assert np.isfinite(float(metrics["loss"]))
  # Each subject's only modality trains its encoders; absent modalities' get exactly zero.
  for name in ("content_encoders", "appearance_encoders", "reconstruction_decoders"):
    per_modality = sum(np.abs(np.asarray(g)).reshape(M, -1).sum(1)
                       for g in jax.tree.leaves(grads[name]))
    assert per_modality[0] > 0 and per_modality[2] > 0, name
    assert per_modality[1] == 0 and per_modality[3] == 0, name


def test_loss_is_the_configured_sum_of_its_terms(full_params):
  weights = dict(dice_weight=2.0, ce_weight=0.5, reconstruction_weight=0.3, kl_weight=0.7)
  method = loss_method(**weights)
  batch = make_batch([[True, True, False, True], [True, True, True, True]])
  loss, (metrics, state) = jax.jit(method.loss_fn)(full_params, {}, batch, jax.random.key(5), 0)
  assert state == {}
  expected = (2.0 * metrics["soft_dice_loss"] + 0.5 * metrics["cross_entropy"]
              + 0.3 * metrics["reconstruction_l1"] + 0.7 * metrics["appearance_kl"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(metrics["reconstruction_l1"]) > 0 and float(metrics["appearance_kl"]) > 0
  # The dropout dropped some of the 3 + 4 available modalities and kept one per item at least.
  assert 1.0 <= float(metrics["modalities_kept"]) < 3.5


def test_cross_entropy_stays_sane_on_a_background_only_batch(full_params):
  # Regression: the per-batch weight 1 - n/n of a class filling the batch came out as -3e-8
  # under jit, and the weighted mean divided it by its 1e-8 floor (CE of -2e5).
  method = loss_method()
  batch = make_batch([[True, True, True, True], [True, False, True, False]])
  batch["label"] = jnp.zeros_like(batch["label"])
  batch["valid"] = jnp.ones_like(batch["valid"]).at[0, :3].set(False)
  _, (metrics, _) = jax.jit(method.loss_fn)(full_params, {}, batch, jax.random.key(5), 0)
  assert 0.0 <= float(metrics["cross_entropy"]) < 5.0


def test_without_disentanglement_the_loss_is_segmentation_only(full_params):
  method = loss_method("mean", False)
  params = variant_params(full_params, "mean", False)
  batch = make_batch([[True, True, True, True], [False, True, True, False]])
  loss, (metrics, _) = jax.jit(method.loss_fn)(params, {}, batch, jax.random.key(5), 0)
  assert "reconstruction_l1" not in metrics and "appearance_kl" not in metrics
  np.testing.assert_allclose(loss, metrics["soft_dice_loss"] + metrics["cross_entropy"], rtol=1e-6)


def test_appearance_kl_matches_the_closed_form_over_available_codes():
  mean = np.array([[[0.5, -1.0], [9.0, 9.0]], [[0.0, 0.0], [1.0, 2.0]]], np.float32)
  log_var = np.array([[[0.2, -0.3], [5.0, 5.0]], [[0.0, 0.0], [-1.0, 0.5]]], np.float32)
  available = np.array([[True, False], [True, True]])
  kl = 0.5 * np.sum(np.exp(log_var) + mean**2 - 1 - log_var, axis=-1)
  # Eq. 3: a sum over the modalities (of each subject), averaged over the subjects.
  got = disentangle.masked_appearance_kl(jnp.asarray(mean), jnp.asarray(log_var),
                                         jnp.asarray(available))
  np.testing.assert_allclose(got, np.sum(np.where(available, kl, 0), axis=1).mean(), rtol=1e-6)
  mean_form = disentangle.masked_appearance_kl(jnp.asarray(mean), jnp.asarray(log_var),
                                               jnp.asarray(available), "mean")
  np.testing.assert_allclose(mean_form, kl[available].mean(), rtol=1e-6)
  # N(0, I) codes cost nothing.
  zero = disentangle.masked_appearance_kl(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)),
                                          jnp.ones((2, 2), bool))
  assert float(zero) == 0.0


def test_reconstruction_l1_sums_the_modalities():
  rng = np.random.default_rng(0)
  rec = rng.normal(size=(2, 3, 3, 3, 3)).astype(np.float32)
  target = rng.normal(size=rec.shape).astype(np.float32)
  available = np.array([[True, True, False], [True, False, False]])
  valid = rng.uniform(size=(2, 3, 3, 3)) < 0.8
  rec_valid = available[:, None, None, None, :] & valid[..., None]
  # Eq. 1: sum over modalities i of the mean |x_i - x̂_i| (over the voxels of the subjects that
  # have modality i); a modality no subject has contributes nothing.
  expected = sum(np.abs(rec[..., i] - target[..., i])[rec_valid[..., i]].mean()
                 for i in range(3) if rec_valid[..., i].any())
  got = disentangle.reconstruction_l1(jnp.asarray(rec), jnp.asarray(target),
                                      jnp.asarray(rec_valid))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  pooled = disentangle.reconstruction_l1(jnp.asarray(rec), jnp.asarray(target),
                                         jnp.asarray(rec_valid), "mean")
  np.testing.assert_allclose(pooled, np.abs(rec - target)[rec_valid].mean(), rtol=1e-5)


def test_residual_reconstruction_decoder_has_the_papers_layers(image):
  """The paper's D^r: 4 residual blocks at the bottleneck, then one upsampling + conv per scale."""
  model = disentangle.Disentangle(num_modalities=M, num_classes=C, reconstruction_decoder="residual",
                                  **TINY)
  params = numpy_params(model, image)
  decoder = params["reconstruction_decoders"]
  blocks = [k for k in decoder if k.startswith("AdaINResidualBlock_")]
  assert len(blocks) == 4
  upsampling_convs = len(TINY["content_features"]) - 1
  convs = [k for k in decoder if not k.startswith(("AdaINResidualBlock_", "Dense_"))]
  assert len(convs) == upsampling_convs + 1   # + the 1x1 output conv (no projection: same width)
  out = jax.jit(lambda p, key: model.apply({"params": p}, image, subset_mask((0, 1)),
                                           subset_mask((0, 1, 2)), train=True,
                                           method="forward_train", rngs={"sample": key}))
  first, second = out(params, jax.random.key(0)), out(params, jax.random.key(1))
  assert first["reconstruction"].shape == image.shape
  assert np.all(np.isfinite(first["reconstruction"]))
  # The appearance code (sampled per key) changes the reconstruction, not the segmentation.
  assert not np.allclose(first["reconstruction"], second["reconstruction"])
  np.testing.assert_array_equal(first["logits"], second["logits"])


def test_dropped_modalities_are_still_reconstructed(full_params, image):
  """Pseudo-cycle: a dropped but available modality is re-rendered from the kept modalities'
  content and its own appearance code (from its image); an unavailable slot is never read."""
  model = make_model()
  kept, available = subset_mask((0, 2)), subset_mask((0, 1, 2))

  @jax.jit
  def run(image, key):
    return model.apply({"params": full_params}, image, kept, available, train=True,
                       method="forward_train", rngs={"sample": key})

  key = jax.random.key(0)
  out = run(image, key)
  assert out["reconstruction"].shape == image.shape
  assert out["appearance_mean"].shape == (2, M, 3)
  dropped_changed = run(image.at[..., 1].set(3.0 * image[..., 1] + 2.0), key)
  absent_changed = run(image.at[..., 3].set(jnp.nan), key)
  np.testing.assert_array_equal(out["logits"], dropped_changed["logits"])
  assert not np.allclose(out["appearance_mean"][:, 1], dropped_changed["appearance_mean"][:, 1])
  assert not np.allclose(out["reconstruction"][..., 1], dropped_changed["reconstruction"][..., 1])
  for name in ("logits", "reconstruction", "appearance_mean"):
    np.testing.assert_array_equal(out[name], absent_changed[name])
  # Training samples the appearance code: another key, another reconstruction, same logits.
  resampled = run(image, jax.random.key(1))
  np.testing.assert_array_equal(out["logits"], resampled["logits"])
  assert not np.allclose(out["reconstruction"], resampled["reconstruction"])


def test_presets_and_clear_errors():
  for preset in ("paper", "demo", "smoke"):
    config = disentangle_config.get_config(preset)
    method = get_method(config)
    assert method.spatial_dims == 3 and method.has_encoder
    assert all(p % method.size_multiple == 0 for p in config.data.patch_size)
  config = disentangle_config.get_config("smoke")
  config.model.fusion = "max"
  with pytest.raises(ValueError, match="config.model.fusion"):
    get_method(config)
  config = disentangle_config.get_config("smoke")
  config.loss.modality_reduction = "max"
  with pytest.raises(ValueError, match=r"config\.loss\.modality_reduction"):
    get_method(config)
  assert disentangle_config.get_config("paper").loss.modality_reduction == "sum"
  config = disentangle_config.get_config("smoke")
  config.data.patch_size = (16, 16)
  with pytest.raises(ValueError, match="config.data.patch_size"):
    get_method(config)
  config = disentangle_config.get_config("demo")
  config.data.patch_size = (32, 32, 20)
  with pytest.raises(ValueError, match="multiples of 8"):
    get_method(config)
  with pytest.raises(ValueError, match="preset"):
    disentangle_config.get_config("fast")


@pytest.mark.slow  # ~50 s; the contract test trains every method on CI
def test_smoke_training_run(tmp_path):
  from hemijax.training import loop
  config = smoke_training_config(disentangle_config, conv_impl=None)  # the preset picks it
  loop.train(config, tmp_path, progress=False)
  records = metrics_records(tmp_path)
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(np.isfinite(r[k]) for r in train
             for k in ("loss", "reconstruction_l1", "appearance_kl", "cross_entropy"))
  # Validation ran the encode-once, decode-per-subset path on whole volumes.
  assert len(val) == 1 and np.isfinite([val[0]["val_dice_all"], val[0]["val_dice_dropped"]]).all()
  assert (tmp_path / "checkpoints" / "3").is_dir()
