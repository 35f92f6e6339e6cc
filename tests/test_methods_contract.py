"""The contract every registered method keeps (hemijax.models.base), at smoke sizes on a fixed
synthetic batch: it initialises; a few steps of its first stage lower that stage's loss; every
subset of modalities decodes, never reading an absent slot (with an encoder: encode once, decode
each subset = the full forward pass); its variables survive a checkpoint round trip exactly."""
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemijax.models import METHODS, get_method
from hemijax.training import checkpoints
from hemijax.training import stages as stages_lib
from hemijax.training import step as step_lib
from model_helpers import quick_init

# Every registered method at its smoke preset, and the variants that change the network and the
# first stage's loss.
CASES = [f"{name}:smoke" for name in METHODS] + [
    "pimms:smoke_hemis", "pimms:smoke_online", "joint:smoke_tissue_only", "joint:smoke_lesion_only"]
BATCH = 2
STEPS = 4


def smoke_config(case):
  name, preset = case.split(":")
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  config.model.conv_impl = "xla"   # the fastest to compile; test_layers compares the lowerings
  return config


def spatial_shape(method):
  side = 8 if method.spatial_dims == 3 else 16
  assert side % method.size_multiple == 0
  return (side,) * method.spatial_dims


def labelled_images(rng, spatial, num_modalities, num_classes, modality_mask):
  """Nested regions labelled 0..C-1, each class a different intensity in every modality (plus
  noise); absent modalities are zeros, as the batch contract says."""
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial], indexing="ij"))
  radius = np.sqrt(np.sum(grid**2, axis=0))
  label = np.clip(((1.2 - radius) * num_classes).astype(np.int32), 0, num_classes - 1)
  label = np.broadcast_to(label, (BATCH,) + spatial).copy()
  contrast = rng.normal(0, 1, (num_classes, num_modalities))
  image = contrast[label] + rng.normal(0, 0.2, label.shape + (num_modalities,))
  image = np.where(modality_mask[:, *([None] * len(spatial)), :], image, 0).astype(np.float32)
  return {"image": image, "modality_mask": modality_mask, "label": label,
          "valid": np.ones(label.shape, bool)}


def fixed_batch(method, config, spatial):
  """One batch per the contract; the joint model trains on two task-specific sets (its own batch
  maker's structure: a T1-only tissue batch and a T1 + FLAIR lesion batch labelled 0/1)."""
  rng = np.random.default_rng(0)
  m = len(method.modalities)
  mask = np.ones((BATCH, m), bool)
  mask[1, 0] = False
  if method.name != "joint":
    return labelled_images(rng, spatial, m, method.num_classes, mask)
  t1_only = np.array([[n == "t1" for n in method.modalities]] * BATCH)
  tissue = labelled_images(rng, spatial, m, method.num_classes - 1, t1_only)
  lesion = labelled_images(rng, spatial, m, 2, np.ones((BATCH, m), bool))
  return {"tissue": tissue, "lesion": lesion, "image": tissue["image"],
          "modality_mask": tissue["modality_mask"]}


def all_subsets(num_modalities):
  """(2^M - 1, M): every non-empty subset of the modalities, one per row."""
  return np.array([[i in subset for i in range(num_modalities)]
                   for r in range(1, num_modalities + 1)
                   for subset in itertools.combinations(range(num_modalities), r)])


@pytest.fixture(scope="module", params=CASES)
def trained(request):
  """(method, initial state, state after a few steps of the first stage, batch, and the first
  stage's loss before and after those steps)."""
  config = smoke_config(request.param)
  method = get_method(config)
  batch = fixed_batch(method, config, spatial_shape(method))
  stage = method.training_stages(config)[0]
  optimizer = stages_lib.stage_optimizer(stage)
  # `init`'s variables, drawn with NumPy: compiling the initialisers takes most of a minute here.
  variables = quick_init(method.model, batch["image"], batch["modality_mask"])
  params = variables.pop("params")
  initial = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": variables,
             "opt_state": optimizer.init(params)}
  train_step = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, config.seed))
  state, losses = initial, []
  for _ in range(min(STEPS, stage.num_steps)):   # within the stage's learning-rate schedule
    state, metrics = train_step(state, batch)
    assert bool(metrics["finite"]), request.param
    losses.append(float(metrics["loss"]))
  # The trained parameters' loss at step 0: the first step's key, dropout draws and weights.
  _, metrics = train_step(dict(state, step=initial["step"]), batch)
  return method, jax.device_get(initial), jax.device_get(state), batch, (losses[0],
                                                                         float(metrics["loss"]))


def test_init_gives_parameters_and_logits_of_the_task(trained):
  method, initial, _, batch, _ = trained
  abstract = jax.eval_shape(method.init, jax.random.key(0), batch["image"], batch["modality_mask"])
  assert jax.tree.leaves(abstract["params"])
  variables = {"params": initial["params"], **initial["model_state"]}
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  logits = jax.jit(method.apply)(variables, batch["image"], batch["modality_mask"])
  assert logits.shape == batch["image"].shape[:-1] + (method.num_classes,)
  assert np.all(np.isfinite(logits))


def test_first_stage_steps_lower_its_loss_on_a_fixed_batch(trained):
  *_, (before, after) = trained
  assert np.isfinite(before) and after < before


def test_every_subset_decodes_without_reading_absent_slots(trained):
  method, _, state, batch, _ = trained
  variables = {"params": state["params"], **state["model_state"]}
  masks = all_subsets(len(method.modalities))
  # One batch item per subset: the first item's image, absent slots zero (the contract) or NaN.
  image = np.repeat(batch["image"][:1], len(masks), axis=0)
  present = masks[:, *([None] * method.spatial_dims), :]
  zeros, nans = np.where(present, image, 0), np.where(present, image, np.nan)
  apply = jax.jit(method.apply)
  logits = np.asarray(apply(variables, zeros, masks))
  assert logits.shape == image.shape[:-1] + (method.num_classes,)
  assert np.all(np.isfinite(logits))
  np.testing.assert_array_equal(apply(variables, nans, masks), logits)
  # Every subset gives logits of its own: the mask is read. A model that reads only some slots
  # (joint's tissue-only baseline: T1) gives one output per subset of those slots.
  flat = logits.reshape(len(masks), -1)
  slots = getattr(method.model, "input_slots", None)
  read = masks & (np.asarray(slots, bool) if slots is not None else True)
  for i, j in itertools.combinations(range(len(masks)), 2):
    if not read[i].any() or not read[j].any():
      continue  # none of the slots it reads: not a subset this model serves
    if np.array_equal(read[i], read[j]):
      np.testing.assert_array_equal(flat[i], flat[j])
    else:
      assert not np.allclose(flat[i], flat[j]), (masks[i], masks[j])
  if method.has_encoder:
    # Each modality encoded once, every subset decoded from those features.
    features = jax.jit(method.encode)(variables, image[:1])
    features = jax.tree.map(lambda f: jnp.repeat(f, len(masks), axis=0), features)
    decoded = jax.jit(method.decode)(variables, features, masks)
    np.testing.assert_allclose(decoded, logits, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_restores_the_variables_exactly(trained, tmp_path):
  method, _, state, batch, _ = trained
  checkpoints.save(checkpoints.make_manager(tmp_path), int(state["step"]), state)
  # As the predictor does: a fresh manager, the variables' shapes from `init`.
  abstract = jax.eval_shape(method.init, jax.random.key(0), batch["image"], batch["modality_mask"])
  restored = checkpoints.restore_variables(checkpoints.make_manager(tmp_path), int(state["step"]),
                                           abstract)
  variables = {"params": state["params"], **state["model_state"]}
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_conv_impl_reaches_every_convolution(name):
  """`config.model.conv_impl` is the lowering of every convolution of the model (its one conv
  factory): with "matmul" the forward program holds no convolution primitive, with "xla" it does."""
  programs = {}
  for impl in ("xla", "matmul"):
    config = smoke_config(f"{name}:smoke")
    config.model.conv_impl = impl
    method = get_method(config)
    image = jnp.zeros((1,) + spatial_shape(method) + (len(method.modalities),))
    mask = jnp.ones((1, len(method.modalities)), bool)
    variables = jax.eval_shape(method.init, jax.random.key(0), image, mask)
    programs[impl] = str(jax.make_jaxpr(method.apply)(variables, image, mask))
  assert "conv_general_dilated" in programs["xla"]
  assert "conv_general_dilated" not in programs["matmul"]
