"""HeMIS: one compiled function for every subset; a subset equals a model without the others."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hemijax.models import base
from hemijax.models.hemis import HeMIS

M = 4
SMALL = dict(backend_features=(4, 5), backend_kernel=3, frontend_features=(6,), frontend_kernel=3,
             final_kernel=3)


def subsets(m):
  return [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]


@pytest.fixture(scope="module")
def model_and_params():
  model = HeMIS(num_modalities=M, num_classes=3, **SMALL)
  image = jax.random.normal(jax.random.key(0), (2, 12, 12, M))
  variables = model.init(jax.random.key(1), image, jnp.ones((2, M), bool))
  return model, variables, image


def test_one_compilation_serves_all_15_subsets(model_and_params):
  model, variables, image = model_and_params
  traces = []

  @jax.jit
  def forward(variables, image, mask):
    traces.append(1)
    return model.apply(variables, image, mask)

  outputs = []
  for subset in subsets(M):
    mask = np.zeros((2, M), bool)
    mask[:, list(subset)] = True
    outputs.append(np.asarray(forward(variables, image, jnp.asarray(mask))))
  assert len(traces) == 1
  # 15 different computations, not one reused: each subset gives logits of its own.
  assert len({out.tobytes() for out in outputs}) == 15


@pytest.mark.parametrize("subset", subsets(M))
def test_subset_equals_model_with_others_removed(model_and_params, subset):
  model, variables, image = model_and_params
  mask = np.zeros((2, M), bool)
  mask[:, list(subset)] = True
  # Garbage in the absent slots must not matter.
  noisy = jnp.where(jnp.asarray(mask)[:, None, None, :], image, 1e6)
  padded = model.apply(variables, noisy, jnp.asarray(mask))

  # A model built for |subset| modalities, holding only those modalities' back-end parameters.
  small = HeMIS(num_modalities=len(subset), num_classes=3, **SMALL)
  params = variables["params"]
  sliced = dict(params, backends=jax.tree.map(lambda p: p[np.array(subset)], params["backends"]))
  removed = small.apply({"params": sliced}, image[..., list(subset)],
                        jnp.ones((2, len(subset)), bool))
  np.testing.assert_allclose(padded, removed, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~30 s; 3D layers are checked against lax in test_layers
def test_3d_from_the_same_definition():
  model = HeMIS(num_modalities=2, num_classes=2, **SMALL)
  image = jnp.ones((1, 6, 6, 6, 2))
  variables = model.init(jax.random.key(0), image, jnp.ones((1, 2), bool))
  assert model.apply(variables, image, jnp.array([[True, False]])).shape == (1, 6, 6, 6, 2)


def test_gradients_finite_with_one_modality_and_nan_in_absent_slots():
  model = HeMIS(num_modalities=3, num_classes=2, **SMALL)
  image = jax.random.normal(jax.random.key(0), (1, 8, 8, 3)).at[..., 1:].set(jnp.nan)
  mask = jnp.array([[True, False, False]])
  variables = model.init(jax.random.key(1), image, mask)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, image, mask))))(
      variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_boundary_validation_errors():
  with pytest.raises(ValueError, match="empty modality set"):
    base.check_modality_mask(np.array([[True, False], [False, False]]), 2)
  with pytest.raises(ValueError, match="shape"):
    base.check_modality_mask(np.ones((2, 3), bool), 2)
  with pytest.raises(ValueError, match="shape"):
    base.check_image(np.ones((2, 8, 8, 3)), 4, 2)


# ------------------------------------------------------------------------------------------------
# The paper's training: lr decay, two phases

from configs import hemis as hemis_config
from hemijax.models import hemis
from hemijax.training import optim
from hemijax.training import stages as stages_lib


def test_inverse_time_schedule_is_keras_sgd_decay():
  cfg = {"learning_rate": 1e-3, "schedule": "inverse_time", "decay_rate": 1e-4}
  schedule = jax.jit(optim.make_schedule(cfg, 100))
  steps = np.array([0, 1, 10, 5000, 20000, 123456])
  expected = 1e-3 / (1.0 + 1e-4 * steps)   # Keras: lr * 1 / (1 + decay * iterations)
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6)
  # A later stage's optimiser continues the decay from the updates made before it.
  later = jax.jit(optim.make_schedule(dict(cfg, start_step=20000), 100))
  np.testing.assert_allclose([float(later(s)) for s in steps], 1e-3 / (1.0 + 1e-4 * (steps + 20000)),
                             rtol=1e-6)


def test_paper_preset_decays_the_learning_rate_not_the_weights():
  opt = hemis_config.get_config("paper").optimizer
  assert (opt.name, opt.schedule, opt.decay_rate, opt.weight_decay) == ("sgd", "inverse_time",
                                                                        1e-4, 0.0)
  assert opt.momentum == 0.9 and opt.nesterov


def test_inverse_frequency_weights_give_each_present_class_equal_total_weight():
  labels = jnp.array([[0, 0, 0, 0, 0, 0, 1, 1, 2, 0]])
  valid = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], bool)
  weights = np.asarray(hemis.inverse_frequency_weights(labels, 4, valid))
  np.testing.assert_allclose(weights, [1 / 6, 1 / 2, 1, 0])   # class 3 absent: weight 0
  per_voxel = weights[np.asarray(labels)] * np.asarray(valid)
  totals = [per_voxel[np.asarray(labels) == c].sum() for c in range(3)]
  np.testing.assert_allclose(totals, [1, 1, 1])


def two_phase_config(final_steps=3):
  config = hemis_config.get_config("smoke")
  config.train.final_layer_steps = final_steps
  return config


def test_one_phase_unless_final_layer_steps():
  method = hemis.build(hemis_config.get_config("smoke"))
  assert [s.name for s in method.training_stages(hemis_config.get_config("smoke"))] == ["train"]
  assert hemis.build(hemis_config.get_config("paper")).stages[1].trainable == ("classifier",)


def test_two_phase_stages_sampling_and_trainable(monkeypatch):
  config = two_phase_config()
  stages = hemis.build(config).training_stages(config)
  assert [(s.name, s.num_steps, s.trainable) for s in stages] == [
      ("balanced", config.train.num_steps, None), ("final_layer", 3, ("classifier",))]
  assert stages[1].optimizer["start_step"] == config.train.num_steps
  assert "start_step" not in stages[0].optimizer
  seen = []
  monkeypatch.setattr(hemis.sampling, "make_patch_batches", lambda cfg, volumes: seen.append(
      (cfg.data.sampling, cfg.data.balanced_fraction)))
  for stage in stages:
    stage.make_batches(config, lambda split: [])
  assert seen == [("balanced", 1.0), ("uniform", 1.0)]
  assert config.data.sampling == "balanced" and config.data.balanced_fraction == 0.5  # untouched


def synthetic_batch(num_modalities=4):
  image = jax.random.normal(jax.random.key(3), (2, 32, 32, num_modalities))
  label = (image[..., 0] > 1.0).astype(jnp.int32) + (image[..., 1] > 1.5).astype(jnp.int32)
  return {"image": image, "modality_mask": jnp.ones((2, num_modalities), bool), "label": label,
          "valid": jnp.ones((2, 32, 32), bool)}


def test_balanced_loss_weights_the_rare_class_up():
  config = two_phase_config()
  method = hemis.build(config)
  batch = synthetic_batch(len(config.modalities))
  params = method.init(jax.random.key(0), batch["image"], batch["modality_mask"])["params"]
  balanced, plain = method.training_stages(config)[0].loss_fn, method.loss_fn
  _, (metrics, _) = balanced(params, {}, batch, jax.random.key(1), 0)
  _, (plain_metrics, _) = plain(params, {}, batch, jax.random.key(1), 0)
  assert not np.isclose(metrics["cross_entropy"], plain_metrics["cross_entropy"])


def test_final_layer_phase_changes_only_the_final_layer():
  config = two_phase_config()
  method = hemis.build(config)
  stage = method.training_stages(config)[1]
  batch = synthetic_batch(len(config.modalities))
  params = method.init(jax.random.key(0), batch["image"], batch["modality_mask"])["params"]
  assert set(params) > {"classifier"}
  opt = stages_lib.stage_optimizer(stage)
  opt_state = opt.init(params)
  new = params
  gradient = jax.jit(jax.grad(stage.loss_fn, has_aux=True))  # one compilation for the 3 steps
  for step in range(3):
    grads, _ = gradient(new, {}, batch, jax.random.key(step), step)
    updates, opt_state = opt.update(grads, opt_state, new)
    new = optax.apply_updates(new, updates)
  for name in params:
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name]))]
    assert all(changed) if name == "classifier" else not any(changed), name


@pytest.mark.slow  # ~30 s through the loop; the stage test covers CI
def test_two_phase_smoke_run_trains_only_the_final_layer_in_phase_two(tmp_path):
  from hemijax.inference.predictor import load_run
  from hemijax.training import loop
  from model_helpers import metrics_records, smoke_training_config

  config = smoke_training_config(hemis_config)
  config.train.update(num_steps=2, final_layer_steps=2, keep_checkpoints=4, checkpoint_every=2,
                      eval_every=2)
  loop.train(config, tmp_path, progress=False)
  assert [(r["step"], r["stage"]) for r in metrics_records(tmp_path) if r["split"] == "train"] == [
      (1, "balanced"), (2, "balanced"), (3, "final_layer"), (4, "final_layer")]
  _, _, end_of_phase_one = load_run(tmp_path, step=2)
  _, _, end = load_run(tmp_path, step=4)
  for name, before in end_of_phase_one["params"].items():
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(end["params"][name]))
    assert any(not np.array_equal(a, b) for a, b in pairs) == (name == hemis.FINAL_LAYER), name
