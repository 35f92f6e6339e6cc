"""PIMMS: mapping math, permutation invariance, padding scans, one compilation for any N, stages,
training (frozen classifier, online λ(i)) and prediction from unnamed scans."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pimms as pimms_config
from hemijax.inference import sliding_window as inference
from hemijax.models.pimms import unnamed_inputs as unlabeled
from hemijax.data import datasets, preprocess
from hemijax.inference.predictor import Predictor
from hemijax.data.tasks import get_task
from hemijax.models import pimms
from hemijax.models.hemis import HeMIS
from hemijax.nn import losses
from hemijax.training import loop
from hemijax.training import stages as stages_lib
from hemijax.training import step as step_lib
from model_helpers import smoke_training_config

VARIANTS = pimms.VARIANTS
M = 3  # wmh: t1, t2, flair


def smoke_config(variant):
  return pimms_config.get_config(f"smoke_{variant}")


def init_variables(method, seed=0):
  """Random parameters of the model's shapes, drawn with NumPy (He-like scale): the properties
  tested hold for any parameters, and this skips compiling the initialisers (slow on CPU)."""
  shapes = jax.eval_shape(lambda key: method.init(key, jnp.zeros((1, 12, 12, M)),
                                                  jnp.ones((1, M), bool)), jax.random.key(0))
  rng = np.random.default_rng(seed)
  fan_in = lambda shape: int(np.prod(shape[:-1])) if len(shape) > 1 else 100
  return jax.tree.map(lambda s: jnp.asarray(
      rng.normal(0, np.sqrt(2 / fan_in(s.shape)), s.shape), s.dtype), shapes)


@pytest.fixture(scope="module", params=VARIANTS)
def built(request):
  """(variant, method, variables, jitted apply) at smoke size, random initial parameters."""
  method = pimms.build(smoke_config(request.param))
  variables = init_variables(method)
  return request.param, method, variables, jax.jit(functools.partial(apply, method))


def random_scans(key, batch=2, size=12, n=4):
  image = jax.random.normal(key, (batch, size, size, n))
  # Scans with different contrast statistics, so the classifier's outputs differ between them.
  return image * jnp.arange(1, n + 1) + jnp.arange(n) * 0.5


def scan_labels(batch, n):
  return jnp.broadcast_to(jnp.arange(n) % M, (batch, n))


def apply(method, variables, image, mask, labels=None):
  kwargs = {"scan_modality": labels} if method.model.variant == "hemis" else {}
  return method.model.apply(variables, image, mask, **kwargs)


# ---------------------------------------------------------------------------------------------
# The segmentation loss: Dice per example (why single modalities learned nothing)


def numpy_soft_dice_per_example(probs, labels, smooth=1e-5):
  """1 - mean over examples and foreground classes of (2 sum p g + s) / (sum p + sum g + s)."""
  dice = []
  for p, y in zip(probs, labels):
    for c in range(1, p.shape[-1]):
      g = (y == c).astype(np.float64)
      dice.append((2 * np.sum(p[..., c] * g) + smooth) / (np.sum(p[..., c]) + np.sum(g) + smooth))
  return 1.0 - np.mean(dice)


def test_per_example_dice_is_the_mean_of_each_examples_dice():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(3, 5, 4))
  labels[2] = 0   # an example without foreground scores 1 only if it predicts none
  probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  got = losses.soft_dice(jnp.asarray(logits), jnp.asarray(labels), reduction="example")
  np.testing.assert_allclose(got, numpy_soft_dice_per_example(probs, labels), rtol=1e-5)
  pooled = losses.soft_dice(jnp.asarray(logits), jnp.asarray(labels))
  assert abs(float(pooled) - float(got)) > 1e-3   # the default pools the batch: another number
  with pytest.raises(ValueError, match="reduction"):
    losses.soft_dice(jnp.asarray(logits), jnp.asarray(labels), reduction="case")


def test_pooled_dice_pushes_an_undecided_example_to_predict_nothing():
  """The mechanism behind PIMMS' empty single-modality predictions. Example 0 (all modalities) is
  segmented well; example 1 (one modality) does not yet separate its lesions: p = 0.05 everywhere.
  With Dice pooled over the batch, each of its background voxels is pushed down by 2 I / (P + G)^2
  with the *batch's* intersection I, which example 0 makes large, while its lesion voxels are
  pushed up by only 2 (P + G - I) / (P + G)^2: the net gradient lowers all of example 1's lesion
  logits, towards predicting nothing. Per example, I, P and G are example 1's own (I about 0), so
  its lesions are pushed up and it keeps learning."""
  n, lesions = 100, 10
  labels = np.zeros((2, n), np.int32)
  labels[:, :lesions] = 1
  p0 = np.where(labels[0] == 1, 0.9, 0.01)
  logit = lambda p: np.log(p) - np.log1p(-p)
  base = np.stack([logit(p0), np.full(n, logit(0.05))]).astype(np.float32)

  def loss(offset, reduction):
    # `offset` shifts example 1's lesion logit at every voxel.
    lesion_logits = jnp.asarray(base).at[1].add(offset)
    logits = jnp.stack([jnp.zeros_like(lesion_logits), lesion_logits], axis=-1)
    return losses.soft_dice(logits, jnp.asarray(labels), reduction=reduction)

  pooled = float(jax.grad(loss)(0.0, "batch"))
  per_example = float(jax.grad(loss)(0.0, "example"))
  assert pooled > 0 and per_example < 0, (pooled, per_example)
  # NumPy: the sums over example 1's voxels, times dp/dz = p (1 - p), as in the docstring.
  I = 0.9 * lesions + 0.05 * lesions
  P = 0.9 * lesions + 0.01 * (n - lesions) + 0.05 * n
  G = 2.0 * lesions
  by_hand = ((n - lesions) * 2 * I - lesions * 2 * (P + G - I)) / (P + G) ** 2 * 0.05 * 0.95
  np.testing.assert_allclose(pooled, by_hand, rtol=1e-4)


def test_presets_use_per_example_dice():
  """The fix: every PIMMS preset computes Dice per example (as NiftyNet averages its per-image
  losses over the batch); the default of the shared loss stays pooled."""
  for preset in ("paper", "demo", "smoke"):
    assert pimms_config.get_config(preset).loss.dice_reduction == "example"
  config = smoke_config("hemis")
  config.loss.dice_reduction = "per_case"
  with pytest.raises(ValueError, match=r"config\.loss\.dice_reduction"):
    pimms.build(config)


# ---------------------------------------------------------------------------------------------
# Mapping math


def test_soft_and_hard_mapping_on_hand_made_s():
  # S_mn for 3 scans (rows of `probs` are scans n, columns modalities m); scan 2 is padding.
  probs = jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]]])
  scan_mask = jnp.array([[True, True, False]])
  x = jnp.array([1.0, 10.0, 100.0]).reshape(1, 1, 1, 3)       # one voxel, scan values 1, 10, 100
  soft = pimms.map_to_slots(x, pimms.scan_assignment(probs, scan_mask, hard=False))
  np.testing.assert_allclose(soft[0, 0, 0], [0.7 * 1 + 0.1 * 10, 0.2 * 1 + 0.3 * 10,
                                             0.1 * 1 + 0.6 * 10], rtol=1e-6)
  hard = pimms.map_to_slots(x, pimms.scan_assignment(probs, scan_mask, hard=True))
  np.testing.assert_array_equal(hard[0, 0, 0], [1.0, 0.0, 10.0])
  # Slot 1 is the argmax of the padding scan only: unavailable.
  np.testing.assert_array_equal(pimms.slot_availability(probs, scan_mask), [[True, False, True]])


def test_hard_mapping_sums_scans_of_the_same_modality():
  probs = jnp.array([[[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]])
  x = jnp.array([2.0, 3.0]).reshape(1, 1, 2)
  assignment = pimms.scan_assignment(probs, jnp.array([[True, True]]), hard=True)
  np.testing.assert_array_equal(pimms.map_to_slots(x, assignment)[0, 0], [0.0, 5.0, 0.0])
  np.testing.assert_array_equal(pimms.slot_availability(probs, jnp.array([[True, True]])),
                                [[False, True, False]])


def test_soft_availability_rules():
  probs = jnp.array([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]], [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]])
  scan_mask = jnp.array([[True, True], [False, False]])
  np.testing.assert_array_equal(pimms.slot_availability(probs, scan_mask, "all"),
                                [[True] * 3, [False] * 3])
  np.testing.assert_array_equal(pimms.slot_availability(probs, scan_mask, "argmax"),
                                [[True, False, False], [False] * 3])


@pytest.mark.parametrize("rule", ["all", "argmax"])
def test_soft_mapping_gradient_reaches_every_slot(rule):
  """Eq. 1 feeds every slot its weighted sum: d loss / d S_mn is non-zero for slots no scan's
  argmax picks (the "argmax" rule, kept as an option, zeroes them)."""
  config = smoke_config("soft")
  config.model.soft_availability = rule
  method = pimms.build(config)
  variables = init_variables(method)
  image = random_scans(jax.random.key(2), batch=1, n=2)
  scan_mask = jnp.array([[True, True]])
  # Both scans' argmax is slot 0: slots 1 and 2 get soft mass only.
  logits = jnp.array([[[2.0, 0.5, -0.5], [1.5, 0.0, 1.0]]])

  def loss_of_probs(probs):
    out = method.model.apply(variables, image, scan_mask, probs, method="segment_mapped")
    return jnp.sum(jax.nn.log_softmax(out, axis=-1)[..., 1])

  grad_probs = jax.jit(jax.grad(loss_of_probs))(jax.nn.softmax(logits, axis=-1))
  per_slot = np.abs(np.asarray(grad_probs)).sum(axis=(0, 1))
  if rule == "all":
    assert np.all(per_slot > 0), per_slot
    grad_logits = jax.jit(jax.grad(lambda z: loss_of_probs(jax.nn.softmax(z, axis=-1))))(logits)
    assert np.all(np.abs(np.asarray(grad_logits)) > 0)
  else:
    assert per_slot[0] > 0 and np.all(per_slot[1:] == 0), per_slot


def test_shuffle_into_scans_moves_slots_exactly():
  image = jax.random.normal(jax.random.key(0), (4, 5, 5, M))
  kept = jnp.array([[True, False, True]] * 4)
  shuffle = jax.jit(pimms.shuffle_into_scans)
  scans, scan_mask, perm = shuffle(image, kept, jax.random.key(1))
  for b in range(4):
    assert sorted(np.asarray(perm[b]).tolist()) == list(range(M))
    np.testing.assert_array_equal(scans[b], image[b][..., perm[b]])
    np.testing.assert_array_equal(scan_mask[b], kept[b][perm[b]])
  assert len({tuple(np.asarray(p)) for p in perm}) > 1  # per-example permutations
  again = shuffle(image, kept, jax.random.key(1))[2]
  np.testing.assert_array_equal(perm, again)


def test_pad_scans_raises_past_the_maximum():
  image, mask = pimms.pad_scans(np.ones((2, 4, 4, 2), np.float32), np.ones((2, 2), bool), 4)
  assert image.shape == (2, 4, 4, 4) and mask.tolist() == [[True, True, False, False]] * 2
  with pytest.raises(ValueError, match="max_scans"):
    pimms.pad_scans(np.ones((1, 4, 4, 5)), np.ones((1, 5), bool), 4)


# ---------------------------------------------------------------------------------------------
# Invariances


def test_permuting_scans_changes_nothing_but_rounding(built):
  variant, method, variables, forward = built
  image = random_scans(jax.random.key(1))
  mask = jnp.array([[True, True, True, False], [True, False, True, True]])
  labels = scan_labels(2, 4)
  out = forward(variables, image, mask, labels)
  for seed in range(3):
    perm = np.random.default_rng(seed).permutation(4)
    permuted = forward(variables, image[..., perm], mask[:, perm], labels[:, perm])
    np.testing.assert_allclose(permuted, out, rtol=1e-5, atol=1e-5)
  # Not vacuous: the scans do matter.
  dropped = forward(variables, image, mask.at[:, 0].set(False), labels)
  assert np.max(np.abs(dropped - out)) > 1e-4


def test_masked_padding_scan_changes_nothing(built):
  variant, method, variables, forward = built
  image = random_scans(jax.random.key(2))
  mask = jnp.array([[True, True, True, True], [True, False, True, True]])
  labels = scan_labels(2, 4)
  garbage = jnp.full(image.shape, jnp.nan)
  out = forward(variables, image[..., :3], mask[:, :3], labels[:, :3])
  # The 4th scan is padding: masked, full of NaN.
  padded = forward(variables, jnp.concatenate([image[..., :3], garbage[..., 3:]], -1),
                   mask.at[:, 3].set(False), labels)
  np.testing.assert_allclose(padded, out, rtol=1e-6, atol=1e-6)


def test_one_jitted_function_for_any_number_of_scans():
  method = pimms.build(smoke_config("soft"))
  max_scans = smoke_config("soft").model.max_scans
  variables = init_variables(method)
  traces = []

  @jax.jit
  def forward(variables, image, mask):
    traces.append(1)
    return method.apply(variables, image, mask)

  image = random_scans(jax.random.key(3), batch=1, n=max_scans)
  outputs = []
  for n in range(1, max_scans + 1):
    padded, mask = pimms.pad_scans(image[..., :n], jnp.ones((1, n), bool), max_scans)
    assert padded.shape[-1] == max_scans
    outputs.append(forward(variables, padded, mask))
  assert len(traces) == 1
  # Each N is really a different input (padding scans are ignored, not the real ones).
  assert all(np.max(np.abs(a - b)) > 1e-6 for a, b in zip(outputs, outputs[1:]))


def test_hemis_variant_reads_scans_in_slot_order_without_labels():
  """Without labels the hemis variant reads scan n as modality n (evaluation's slot order) and
  is the HeMIS segmenter on the slots; with labels it follows them (see the permutation test)."""
  method = pimms.build(smoke_config("hemis"))
  variables = init_variables(method)
  assert "modality_classifier" not in variables["params"]
  image = random_scans(jax.random.key(4), n=M)
  mask = jnp.array([[True, False, True], [False, True, True]])
  m = smoke_config("hemis").model
  segmenter = HeMIS(num_modalities=M, num_classes=2, backend_features=m.backend_features,
                    backend_kernel=m.backend_kernel, frontend_features=m.frontend_features,
                    frontend_kernel=m.frontend_kernel, final_kernel=m.final_kernel)
  hemis = jax.jit(segmenter.apply)({"params": variables["params"]["segmenter"]}, image, mask)
  np.testing.assert_allclose(jax.jit(method.apply)(variables, image, mask), hemis, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="scan_modality"):
    method.apply(variables, image[..., :2], mask[:, :2])


# ---------------------------------------------------------------------------------------------
# Configs, stages and training


@pytest.mark.parametrize("variant", VARIANTS)
def test_presets_select_the_variant_and_stages(variant):
  config = smoke_config(variant)
  assert config.variant == variant and config.preset == f"smoke_{variant}"
  method = pimms.build(config)
  stages = method.training_stages(config)
  if variant in ("soft", "hard"):
    assert [s.name for s in stages] == ["classifier", "segmentation"]
    assert stages[0].trainable == (pimms.CLASSIFIER,) and stages[1].trainable == (pimms.SEGMENTER,)
    assert stages[0].num_steps == config.classifier.num_steps
  else:
    assert len(stages) == 1 and stages[0].trainable is None


def test_config_errors_name_the_option():
  assert pimms_config.get_config("paper").variant == "soft"
  paper = pimms_config.get_config("paper")
  assert sum(paper.model.classifier_blocks) * 2 + 2 == 36
  assert tuple(paper.data.patch_size) == (100, 100) and paper.classifier.batch_size == 64
  assert paper.loss.class_weight_decay == 1e-4 and paper.model.soft_availability == "all"
  # The demo scales γ to its run length: λ falls to exp(-5) by the last step.
  demo = pimms_config.get_config("demo_online")
  assert demo.loss.class_weight_decay * demo.train.num_steps == pytest.approx(5.0)
  config = smoke_config("soft")
  config.model.soft_availability = "max"
  with pytest.raises(ValueError, match=r"config\.model\.soft_availability"):
    pimms.build(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, M)), jnp.ones((1, M), bool))
  config = smoke_config("soft")
  config.classifier.batch_size = 0
  with pytest.raises(ValueError, match=r"config\.classifier\.batch_size"):
    pimms.build(config)
  with pytest.raises(ValueError, match="unknown preset 'demo_median'"):
    pimms_config.get_config("demo_median")
  config = smoke_config("soft")
  config.variant = "median"
  with pytest.raises(ValueError, match=r"config\.variant"):
    pimms.build(config)
  # The variant lives in config.variant, not among the network's settings.
  config = smoke_config("soft")
  config.model.variant = "hard"
  with pytest.raises(ValueError, match=r"config\.model\.variant: not a setting of PIMMS"):
    pimms.build(config)


def test_classifier_stage_draws_batches_of_its_own_size():
  from hemijax.data.preprocess import GridTransform, Volume
  shape = (20, 20, 6)
  rng = np.random.default_rng(0)
  t = GridTransform(shape, np.eye(4), (0, 0, 0), shape, (1.0, 1.0, 1.0), shape, np.eye(4))
  volume = Volume("v", rng.normal(size=shape + (M,)).astype(np.float32), np.ones(M, bool),
                  np.zeros(shape, np.int32), np.ones(shape, bool), (1.0, 1.0, 1.0), t)
  config = smoke_config("soft")
  config.data.sampling = "uniform"
  config.classifier.batch_size = 5
  classifier_stage, segmentation_stage = pimms.build(config).training_stages(config)
  load_split = lambda split: [volume]
  assert stages_lib.stage_batches(classifier_stage, config, load_split)(0)["image"].shape[0] == 5
  segmentation = stages_lib.stage_batches(segmentation_stage, config, load_split)(3)
  assert segmentation["image"].shape[0] == config.data.batch_size == 2


def synthetic_batch(seed, batch=2, size=16):
  """A batch in the slot order of the config: a bright blob (label 1) seen differently per slot."""
  rng = np.random.default_rng(seed)
  label = np.zeros((batch, size, size), np.int32)
  label[:, 5:9, 6:10] = 1
  contrast = np.array([-1.0, 1.5, 2.5])  # t1 dark, t2 and flair bright lesion
  image = rng.normal(0, 0.3, (batch, size, size, M)).astype(np.float32)
  image += label[..., None] * contrast + np.arange(M) * 0.3
  return {"image": image, "modality_mask": np.ones((batch, M), bool), "label": label,
          "valid": np.ones((batch, size, size), bool)}


def run_stages(method, config, steps_per_stage):
  """Runs every stage for a few steps on synthetic batches -> initial parameters, then the
  parameters and metrics after each stage."""
  stages = method.training_stages(config)
  state, snapshots = None, []
  for stage in stages:
    optimizer = stages_lib.stage_optimizer(stage)
    if state is None:
      params = init_variables(method, config.seed)["params"]
      state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {}}
      initial = jax.device_get(params)
    state = dict(state, opt_state=optimizer.init(state["params"]))
    train_step = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, config.seed))
    metrics = []
    for _ in range(steps_per_stage):
      state, m = train_step(state, synthetic_batch(int(state["step"])))
      metrics.append(jax.device_get(m))
    snapshots.append((jax.device_get(state["params"]), metrics))
  return initial, snapshots


def test_offline_training_freezes_the_classifier_in_the_segmentation_stage():
  config = smoke_config("hard")
  config.optimizer.learning_rate = 1e-2
  config.classifier.optimizer.learning_rate = 1e-2
  method = pimms.build(config)
  init, [(after_classifier, class_metrics), (after_segmentation, seg_metrics)] = run_stages(
      method, config, 4)
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in
                             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(init[pimms.CLASSIFIER], after_classifier[pimms.CLASSIFIER])
  assert not changed(init[pimms.SEGMENTER], after_classifier[pimms.SEGMENTER])
  assert not changed(after_classifier[pimms.CLASSIFIER], after_segmentation[pimms.CLASSIFIER])
  assert changed(after_classifier[pimms.SEGMENTER], after_segmentation[pimms.SEGMENTER])
  assert all(bool(m["finite"]) for m in class_metrics + seg_metrics)
  assert class_metrics[-1]["loss"] < class_metrics[0]["loss"]


def test_online_loss_is_segmentation_plus_decaying_classifier_term_and_deterministic():
  config = smoke_config("online")
  config.loss.class_weight_decay = 0.5
  method = pimms.build(config)
  batch = synthetic_batch(0)
  params = init_variables(method)["params"]
  loss_and_grad = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True))
  for step in (0, 3):
    (loss, (metrics, _)), grads = loss_and_grad(params, {}, batch, jax.random.key(5), step)
    np.testing.assert_allclose(metrics["class_loss_weight"], np.exp(-0.5 * step), rtol=1e-6)
    np.testing.assert_allclose(
        loss, metrics["segmentation_loss"] + np.exp(-0.5 * step) * metrics["classifier_loss"],
        rtol=1e-6)
    # Both parts train: the classifier from L_class and (soft mapping) from L_seg.
    for part in (pimms.CLASSIFIER, pimms.SEGMENTER):
      assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[part]))
  # Same key, same numbers; another key draws other dropouts and scan orders.
  (again, _), _ = loss_and_grad(params, {}, batch, jax.random.key(5), 3)
  assert float(again) == float(loss)
  (other, _), _ = loss_and_grad(params, {}, batch, jax.random.key(6), 3)
  assert float(other) != float(loss)


# ---------------------------------------------------------------------------------------------
# Unnamed scans


def synthetic_scans(seed=0, shape=(18, 20, 6)):
  """Three 3D 'scans' of one sphere brain with different contrasts, zero outside it."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
  brain = np.sum(grid**2, axis=0) < 0.8
  scans = []
  for k in range(M):
    scan = (100 + 40 * k + 30 * grid[k % 2] * (-1)**k + rng.normal(0, 5, shape)) * brain
    scans.append(scan.astype(np.float32))
  return scans


class FakePredictor:
  """What `hemijax.inference.predictor.Predictor` offers to `unlabeled`, without a checkpoint."""

  def __init__(self, **fields):
    self.__dict__.update(fields)


@pytest.fixture(scope="module")
def predictor():
  config = smoke_config("soft")
  method = pimms.build(config)
  variables = init_variables(method)
  return FakePredictor(config=config, method=method, variables=variables,
                       task=get_task(config.task))


def test_unnamed_scans_give_the_named_result_in_any_order(predictor):
  scans = synthetic_scans()
  labels, probs = unlabeled.predict_unlabeled(predictor, scans, np.eye(4),
                                              return_probabilities=True)
  assert labels.shape == scans[0].shape and probs.shape == scans[0].shape + (2,)
  order = [2, 0, 1]
  shuffled = unlabeled.predict_unlabeled(predictor, [scans[i] for i in order], np.eye(4),
                                         return_probabilities=True)[1]
  np.testing.assert_allclose(shuffled, probs, rtol=1e-5, atol=1e-5)
  # The named path (slots in config order, no padding scans) gives the same probabilities.
  names = predictor.config.modalities
  volume = preprocess.preprocess_raw(preprocess.raw_case_from_arrays(dict(zip(names, scans)),
                                                                     np.eye(4)),
                                     "x", names, (0, 1))
  named = inference.predict_probabilities(predictor.method, predictor.variables, volume.image,
                                          volume.available[None])[0]
  padded = preprocess.to_original_grid(volume.transform, named, order=1)
  np.testing.assert_allclose(probs, padded, rtol=1e-5, atol=1e-5)


def test_unnamed_scan_errors_are_clear(predictor):
  with pytest.raises(ValueError, match="at most 4"):
    unlabeled.predict_unlabeled(predictor, synthetic_scans() + synthetic_scans()[:2])
  with pytest.raises(ValueError, match="at least one scan"):
    unlabeled.predict_unlabeled(predictor, [])
  hemis = FakePredictor(config=smoke_config("hemis"))
  with pytest.raises(ValueError, match="hemis"):
    unlabeled.predict_unlabeled(hemis, synthetic_scans())


def test_permutation_report_measures_how_the_prediction_moves_with_the_scan_order(predictor,
                                                                                 monkeypatch):
  names = predictor.config.modalities
  volume = preprocess.preprocess_raw(preprocess.raw_case_from_arrays(
      dict(zip(names, synthetic_scans())), np.eye(4)), "x", names, (0, 1))
  report = unlabeled.permutation_report(predictor, [volume, volume, volume])
  assert report["cases"] == unlabeled.PERMUTATION_CASES == 2
  assert report["orders_compared"] == 2 * 5  # 3 scans: 6 orders, each against the first
  assert report["voxels_compared"] == 10 * np.prod(volume.image.shape[:-1])
  assert report["voxels_label_changed"] == 0
  assert report["max_abs_probability_difference"] < 1e-5
  # A forward that weighs the scans by their position is caught by the same measurement.
  method, forward = unlabeled._slot_forward(predictor)
  ramp = np.arange(1.0, predictor.config.model.max_scans + 1, dtype=np.float32)
  monkeypatch.setattr(unlabeled, "_slot_forward",
                      lambda _: (method, lambda windows, *rest: forward(windows * ramp, *rest)))
  moved = unlabeled.permutation_report(predictor, [volume], cases=1)
  assert moved["max_abs_probability_difference"] > 1e-3


def test_classifier_report_counts_brain_slices(predictor):
  scans = synthetic_scans()
  names = predictor.config.modalities
  volume = preprocess.preprocess_raw(preprocess.raw_case_from_arrays(
      {names[0]: scans[0], names[2]: scans[2]}, np.eye(4)), "x", names, (0, 1))
  report = unlabeled.classifier_report(predictor.method, predictor.variables, [volume])
  brain_slices = int(np.sum(volume.brain.any(axis=(0, 1))))
  assert report["windows"] == 2 * brain_slices and report["scans"] == 2
  # The same numbers, slice by slice through the model's own classifier.
  hits = 0
  for z in np.flatnonzero(volume.brain.any(axis=(0, 1))):
    scans = volume.image[None, :, :, z][..., [0, 2]]
    logits = predictor.method.model.apply(predictor.variables, scans, method="classify")
    hits += int(np.sum(np.argmax(logits[0], -1) == np.array([0, 2])))
  assert report["window_accuracy"] == pytest.approx(hits / report["windows"])
  assert np.sum(report["confusion"]) == report["windows"]
  assert np.sum(np.asarray(report["confusion"])[1]) == 0  # t2 was absent


def test_evaluate_a_trained_offline_workdir_reports_the_classifier_accuracy(tmp_path):
  """Two stages trained (classifier, then segmentation), then evaluate.py's library call: the
  staged checkpoint restores, and the classifier's accuracy on the split is reported."""
  import json

  from hemijax.evaluation.evaluate import evaluate_workdir

  config = smoke_training_config(pimms_config, "smoke_soft")
  config.classifier.num_steps = 2
  config.train.num_steps = 2
  workdir = tmp_path / "run"
  loop.train(config, workdir, progress=False)
  summary = evaluate_workdir(workdir, out=tmp_path / "eval", progress=False)
  report = json.loads((tmp_path / "eval" / "classifier_accuracy.json").read_text())
  # The same checkpoint and split, computed directly from the predictor.
  predictor = Predictor(workdir)
  direct = unlabeled.classifier_report(predictor.method, predictor.variables,
                                       datasets.load_split(predictor.config, "test"),
                                       roi=predictor.config.data.patch_size)
  for key in ("window_accuracy", "volume_accuracy", "windows", "scans", "confusion"):
    assert report[key] == direct[key], key
  assert summary["classifier_accuracy"]["window_accuracy"] == report["window_accuracy"]
  assert report["windows"] > 0   # the comparison above covers some windows
  assert "modality classifier" in (tmp_path / "eval" / "classifier_accuracy.md").read_text()
  assert json.loads((tmp_path / "eval" / "summary.json").read_text())["classifier_accuracy"] == \
      summary["classifier_accuracy"]
  # The scans of the first test cases in every order: the same labels (PIMMS' defining property).
  invariance = json.loads((tmp_path / "eval" / "permutation_invariance.json").read_text())
  assert summary["permutation_invariance"] == invariance
  assert invariance["orders_compared"] > 0 and invariance["voxels_label_changed"] == 0
