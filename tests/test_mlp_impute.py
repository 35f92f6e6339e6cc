"""MLP imputation: pattern bookkeeping, one compilation for every subset, vmapped training equals
training one pattern alone, and a smoke run whose second stage leaves the U-Net untouched."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import hemis as hemis_config
from configs import mlp_impute as mlp_config
from configs import unet as unet_config
from hemijax.models import get_method
from hemijax.models import mlp_impute as mi
from model_helpers import (jit_apply, metrics_records, quick_init, smoke_training_config,
                           write_run)

M = 4
# conv_impl "xla": the fastest to compile (the lowerings are compared in the layers tests).
SMALL = dict(hidden=(6, 5), features=(4, 6), conv_impl="xla")


def all_masks(m):
  subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
  masks = np.zeros((len(subsets), m), bool)
  for i, s in enumerate(subsets):
    masks[i, list(s)] = True
  return masks


@pytest.fixture(scope="module")
def model_and_variables():
  model = mi.MLPImputeUNet(num_modalities=M, num_classes=3, **SMALL)
  image = jax.random.normal(jax.random.key(0), (2, 8, 8, M))
  variables = quick_init(model, image, jnp.ones((2, M), bool))
  return model, variables, image


def test_patterns_cover_every_proper_subset():
  masks = mi.pattern_masks(M)
  assert masks.shape == (14, M)
  assert len({tuple(r) for r in masks}) == 14
  assert masks.any(1).all() and not masks.all(1).any()
  np.testing.assert_array_equal(mi.pattern_index(jnp.asarray(masks)), np.arange(14))


def test_one_compilation_serves_every_subset(model_and_variables):
  model, variables, image = model_and_variables
  traces = []

  @jax.jit
  def forward(variables, image, mask):
    traces.append(1)
    return model.apply(variables, image, mask)

  for mask in all_masks(M):
    out = forward(variables, image, jnp.asarray(np.broadcast_to(mask, (2, M))))
    assert np.all(np.isfinite(out))
  assert len(traces) == 1


def test_imputation_uses_the_pattern_mlp_and_keeps_present_channels(model_and_variables):
  model, variables, image = model_and_variables
  mask = jnp.array([[True, False, True, False], [False, True, True, True]])
  noisy = jnp.where(mask[:, None, None, :], image, 1e6)  # absent slots must not matter
  imputed = jax.jit(lambda v, x, k: model.apply(v, x, k, method=lambda m, x, k: m.imputer(x, k)))(
      variables, noisy, mask)
  layer_params = mi.stacked_layers(variables["params"]["imputer"])
  for b in range(2):
    index = int(mi.pattern_index(mask[b:b + 1])[0])
    own = [(w[index], c[index]) for w, c in layer_params]
    expected = mi.mlp_apply(own, jnp.where(mask[b], image[b], 0))
    np.testing.assert_allclose(imputed[b], jnp.where(mask[b], image[b], expected), rtol=1e-5,
                               atol=1e-5)
  # The full set is never imputed: the U-Net sees the image as it is.
  full = jnp.ones((2, M), bool)
  apply = jit_apply(model)
  np.testing.assert_allclose(apply(variables, image, full),
                             apply(variables, image, train=False, method="segment_full"),
                             rtol=1e-6)


def test_3d_shape():
  model = mi.MLPImputeUNet(num_modalities=3, num_classes=2, **SMALL)
  image = jnp.ones((1, 4, 4, 4, 3))
  mask = jnp.array([[True, False, True]])
  variables = quick_init(model, image, mask)
  assert jit_apply(model)(variables, image, mask).shape == (1, 4, 4, 4, 2)


def test_vmapped_training_equals_training_one_pattern_alone():
  model = mi.PatternMLPs(num_modalities=3, hidden=(7, 5))
  initial = quick_init(model, jnp.ones((1, 2, 2, 3)), jnp.ones((1, 3), bool))["params"]
  params = initial
  voxels = jax.random.normal(jax.random.key(1), (64, 3))
  available = jnp.ones((64, 3), bool).at[:5, 2].set(False)
  opt = optax.adam(1e-2)
  pattern = 4   # code 5 = modalities 0 and 2 available
  pattern_mask = jnp.asarray(mi.pattern_masks(3)[pattern])

  @jax.jit
  def step_all(params, opt_state):
    (loss, (metrics, _)), grads = jax.value_and_grad(mi.imputation_loss, has_aux=True)(
        {"imputer": params}, {}, {"voxels": voxels, "available": available}, None, 0)
    updates, opt_state = opt.update(grads["imputer"], opt_state)
    per_pattern = mi.pattern_losses(params, voxels, available)
    return optax.apply_updates(params, updates), opt_state, per_pattern

  @jax.jit
  def step_one(layers, opt_state):
    loss, grads = jax.value_and_grad(mi.pattern_loss)(layers, pattern_mask, voxels, available)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(layers, updates), opt_state, loss

  alone = [(w[pattern], b[pattern]) for w, b in mi.stacked_layers(params)]
  state_all, state_one = opt.init(params), opt.init(alone)
  for _ in range(5):
    params, state_all, per_pattern = step_all(params, state_all)
    alone, state_one, loss = step_one(alone, state_one)
    np.testing.assert_allclose(per_pattern[pattern], loss, rtol=1e-5)
  assert per_pattern[pattern] < mi.pattern_losses(initial, voxels, available)[pattern]  # trained
  for (w, b), (w1, b1) in zip(mi.stacked_layers(params), alone):
    np.testing.assert_allclose(w[pattern], w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[pattern], b1, rtol=1e-5, atol=1e-6)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown preset"):
    mlp_config.get_config("demo_dropout")
  config = mlp_config.get_config("smoke")
  config.impute.hidden = ()
  with pytest.raises(ValueError, match="config.impute.hidden"):
    get_method(config)


def test_smoke_training_runs_both_stages_and_freezes_the_unet(tmp_path):
  from hemijax.inference.predictor import load_run
  from hemijax.training import loop

  config = smoke_training_config(mlp_config)
  config.train.num_steps = 2
  config.impute.num_steps = 2
  config.train.keep_checkpoints = 4
  loop.train(config, tmp_path, progress=False)
  records = metrics_records(tmp_path)
  assert [(r["step"], r["stage"]) for r in records if r["split"] == "train"] == [
      (1, "segmentation"), (2, "segmentation"), (3, "imputation"), (4, "imputation")]
  assert [r["step"] for r in records if r["split"] == "val"] == [4]
  _, _, after_unet = load_run(tmp_path, step=2)
  _, _, after_mlps = load_run(tmp_path, step=4)
  for a, b in zip(jax.tree.leaves(after_unet["params"]["segmenter"]),
                  jax.tree.leaves(after_mlps["params"]["segmenter"])):
    np.testing.assert_array_equal(a, b)
  jax.tree.map(np.testing.assert_array_equal, after_unet["batch_stats"],
               after_mlps["batch_stats"])
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(after_unet["params"]["imputer"]),
      jax.tree.leaves(after_mlps["params"]["imputer"])))


def numpy_mlp(layer_params, x):
  """A voxel-wise MLP in NumPy: dense layers, ReLU between them."""
  for i, (kernel, bias) in enumerate(layer_params):
    x = x @ np.asarray(kernel) + np.asarray(bias)
    if i < len(layer_params) - 1:
      x = np.maximum(x, 0)
  return x


def test_per_modality_mlps_one_single_output_mlp_per_missing_modality_per_pattern():
  model = mi.MLPImputeUNet(num_modalities=M, num_classes=3, per_modality=True, **SMALL)
  image = jax.random.normal(jax.random.key(0), (2, 6, 6, M))
  mask = jnp.array([[True, False, True, False], [False, True, True, True]])
  variables = quick_init(model, image, jnp.ones((2, M), bool))
  layer_params = mi.stacked_layers(variables["params"]["imputer"])
  assert layer_params[-1][0].shape == (mi.num_patterns(M), M, SMALL["hidden"][-1], 1)
  imputed = model.apply(variables, jnp.where(mask[:, None, None, :], image, 1e6), mask,
                        method=lambda m, x, k: m.imputer(x, k))
  for b in range(2):
    p = int(mi.pattern_index(mask[b:b + 1])[0])
    inputs = np.where(mask[b], image[b], 0)
    for m in range(M):
      own = [(w[p, m], c[p, m]) for w, c in layer_params]
      expected = image[b, ..., m] if mask[b, m] else numpy_mlp(own, inputs)[..., 0]
      np.testing.assert_allclose(imputed[b, ..., m], expected, rtol=1e-5, atol=1e-5)

  # Training reaches exactly the (pattern, missing modality) slots: 28 MLPs for 4 modalities.
  voxels = jax.random.normal(jax.random.key(1), (32, M))
  grads = jax.grad(lambda p: mi.imputation_loss({"imputer": p}, {}, {
      "voxels": voxels, "available": jnp.ones((32, M), bool)}, None, 0)[0])(
          variables["params"]["imputer"])
  reached = np.any(np.asarray(grads["kernel_0"]) != 0, axis=(2, 3))   # (patterns, modalities)
  np.testing.assert_array_equal(reached, ~mi.pattern_masks(M))
  assert reached.sum() == 28


def test_paper_preset_uses_the_papers_mlps():
  config = mlp_config.get_config("paper")
  assert config.impute.per_modality and tuple(config.impute.hidden) == (100, 100)
  assert not mlp_config.get_config("demo").impute.per_modality


# One network for both baselines: the MLPs impute into the mean-filling U-Net of a `unet` run.

def unet_variables(config, seed=0):
  """A `unet` model's variables drawn with NumPy, batch statistics too (so that carrying them
  over is visible)."""
  method = get_method(config)
  m = len(config.modalities)
  image = jnp.zeros((1,) + tuple(config.data.patch_size) + (m,))
  variables = quick_init(method.model, image, jnp.ones((1, m), bool), train=False, seed=seed)
  rng = np.random.default_rng(seed + 100)
  variables["batch_stats"] = jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype), variables["batch_stats"])
  return method, variables


def all_modality_logits(workdir, image):
  """A workdir's best checkpoint (evaluation's policy) on `image` with every modality present."""
  from hemijax.inference.predictor import load_run
  _, method, variables = load_run(workdir, step="best")
  mask = jnp.ones((image.shape[0], image.shape[-1]), bool)
  return np.asarray(jax.jit(method.apply)(variables, image, mask))


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
  config = smoke_training_config(unet_config)
  _, variables = unet_variables(config)
  return write_run(tmp_path_factory.mktemp("runs") / "unet", config, variables, step=4), variables


def mlp_from(segmenter_from):
  config = smoke_training_config(mlp_config)
  config.impute.segmenter_from = str(segmenter_from)
  return config


def test_segmenter_from_skips_stage_one_and_trains_only_the_mlps(unet_run):
  source, _ = unet_run
  method = get_method(mlp_from(source))
  segmentation, imputation = method.training_stages(mlp_from(source))
  assert segmentation.num_steps == 0 and imputation.num_steps == 3
  assert imputation.trainable == ("imputer",)
  (where,) = method.parameter_sources
  assert (where.workdir, where.method, where.source_path, where.target_path, where.step) == (
      str(source), "unet", ("unet",), ("segmenter",), "best")
  own = get_method(smoke_training_config(mlp_config))   # smoke: no source, a U-Net of its own
  assert own.parameter_sources == () and own.training_stages(mlp_config.get_config("smoke"))[
      0].num_steps == 6
  for preset, workdir in (("demo", "runs/unet"), ("paper", "runs/unet_paper")):
    assert mlp_config.get_config(preset).impute.segmenter_from == workdir


def test_segmenter_from_puts_the_unet_in_and_both_baselines_predict_the_same(unet_run):
  from hemijax.training import init_from
  source, trained = unet_run
  config = mlp_from(source)
  method = get_method(config)
  image = jax.random.normal(jax.random.key(3), (2, 32, 32, M))
  fresh = quick_init(method.model, image, jnp.ones((2, M), bool), train=False, seed=1)
  variables, (record,) = init_from.start_variables(config, method, fresh)
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]["segmenter"],
                 jax.tree.map(np.asarray, trained[collection]["unet"]))
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["imputer"],
               jax.tree.map(np.asarray, fresh["params"]["imputer"]))
  assert (record["option"], record["into"], record["from"], record["step"]) == (
      "config.impute.segmenter_from", "segmenter", "unet", 4)
  full = jnp.ones((2, M), bool)
  unet_method = get_method(smoke_training_config(unet_config))
  np.testing.assert_array_equal(jax.jit(method.apply)(variables, image, full),
                                jax.jit(unet_method.apply)(trained, image, full))


def test_a_segmenter_of_another_model_config_or_method_is_refused_in_one_line(unet_run, tmp_path):
  from hemijax.training import checkpoints, init_from
  source, _ = unet_run
  config = mlp_from(source)
  config.model.features = (4, 6)
  with pytest.raises(init_from.InitFromError) as error:
    init_from.check(config, get_method(config))
  message = str(error.value)
  assert "\n" not in message and f"config.impute.segmenter_from={source}" in message
  assert "config.model differs" in message and "features" in message
  with pytest.raises(init_from.InitFromError, match="no such run folder.*configs/unet.py:smoke"):
    missing = mlp_from(tmp_path / "nowhere")
    init_from.check(missing, get_method(missing))
  hemis_run = tmp_path / "hemis"
  checkpoints.save_config(hemis_run.mkdir() or hemis_run, smoke_training_config(hemis_config))
  with pytest.raises(init_from.InitFromError, match="a 'hemis' run; this needs a 'unet' run"):
    init_from.check(mlp_from(hemis_run), get_method(mlp_from(hemis_run)))
  config = mlp_from(source)
  config.model.conv_impl = "auto"   # how convolutions are computed: not what the weights mean
  init_from.check(config, get_method(config))


def test_the_training_loop_imputes_into_the_given_unet(unet_run, tmp_path):
  """Stage 1 has 0 steps: the run starts from the U-Net run, trains the MLPs alone, validates
  and checkpoints in stage 2; with every modality its predictions are the U-Net run's."""
  from hemijax.inference.predictor import load_run
  from hemijax.training import init_from, loop
  source, _ = unet_run
  config = mlp_from(source)
  config.impute.num_steps = 2
  loop.train(config, tmp_path, progress=False)
  records = metrics_records(tmp_path)
  assert [(r["step"], r["stage"]) for r in records if r["split"] == "train"] == [
      (1, "imputation"), (2, "imputation")]
  assert [r["step"] for r in records if r["split"] == "val"] == [2]
  (record,) = init_from.read_record(tmp_path)["sources"]
  assert record["source"] == str(source) and record["step"] == 4
  _, _, variables = load_run(tmp_path, step="best")
  _, _, unet_variables_ = load_run(source, step="best")
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]["segmenter"],
                 unet_variables_[collection]["unet"])
  image = jax.random.normal(jax.random.key(4), (2, 32, 32, M))
  np.testing.assert_array_equal(all_modality_logits(tmp_path, image),
                                all_modality_logits(source, image))


@pytest.mark.slow
def test_a_trained_unet_run_and_the_mlp_run_on_it_predict_the_same_with_every_modality(tmp_path):
  """The paper's two baselines through train.py's loop: the U-Net trained, then the MLPs."""
  from hemijax.training import loop
  unet = smoke_training_config(unet_config)
  unet.train.num_steps = 4   # evaluated at steps 3 and 4; the best one is used
  loop.train(unet, tmp_path / "unet", progress=False)
  config = mlp_from(tmp_path / "unet")
  config.impute.num_steps = 2
  loop.train(config, tmp_path / "mlp_impute", progress=False)
  image = jax.random.normal(jax.random.key(5), (2, 32, 32, M))
  np.testing.assert_array_equal(all_modality_logits(tmp_path / "mlp_impute", image),
                                all_modality_logits(tmp_path / "unet", image))


def test_no_step_to_train_is_refused_before_anything_is_written(unet_run, tmp_path):
  from hemijax.training import loop
  source, _ = unet_run
  config = mlp_from(source)
  config.impute.num_steps = 0   # and stage 1 has none: the U-Net comes from the source
  with pytest.raises(ValueError, match="segmentation, imputation.*0 steps in all"):
    loop.train(config, tmp_path / "never", progress=False)
  assert not (tmp_path / "never").exists()
