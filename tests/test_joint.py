"""Joint lesion + tissue model: hetero-modal first stage, loss decomposition, data, smoke training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import joint as joint_config
from hemijax.nn import losses
from hemijax.data.tasks import get_task
from hemijax.models import get_method, joint
from model_helpers import metrics_records

T1_ONLY = np.array([[True, False]])
BOTH = np.array([[True, True]])
SMALL = dict(features=(3, 4), dilations=(1, 2), blocks_per_stage=1, head_features=4)
LESION = 4
WEIGHTS = joint.class_weights(5, LESION)


def numpy_variables(model, *inputs, seed=0):
  """Variables drawn with NumPy: no PRNG compilation, which dominates these tests on CPU."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)


class Net:
  """A small model with jitted forward / encode / decode (one compilation each)."""

  def __init__(self, **kwargs):
    self.model = joint.HeteroModalHighResNet(num_modalities=2, num_classes=5, **kwargs)
    self.image = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 6, 2)), jnp.float32)
    self.variables = numpy_variables(self.model, self.image, BOTH)
    apply = lambda *args, method=None: jax.jit(functools.partial(self.model.apply, method=method))
    self.forward = apply()
    self.encode = apply(method="encode")
    self.decode = apply(method="decode")


@pytest.fixture(scope="module")
def net():
  return Net(**SMALL)


# ----------------------------------------------------------------------------------------------
# Network: per-modality first stage, masked mean

def test_absent_flair_values_do_not_matter(net):
  variables, image = net.variables, net.image
  clean = net.forward(variables, image.at[..., 1].set(0.0), T1_ONLY)
  garbage = net.forward(variables, image.at[..., 1].set(jnp.nan), T1_ONLY)
  huge = net.forward(variables, image.at[..., 1].set(1e6), T1_ONLY)
  assert np.all(np.isfinite(garbage))
  np.testing.assert_array_equal(clean, garbage)
  np.testing.assert_array_equal(clean, huge)


def test_t1_plus_flair_decodes_the_mean_of_the_two_branches(net):
  variables, image = net.variables, net.image
  features = net.encode(variables, image)
  assert features.shape[:2] == (1, 2)
  both = net.decode(variables, features, BOTH)
  # The mean placed in the T1 slot, garbage in the FLAIR slot, decoded from T1 alone.
  mean = features.mean(axis=1, keepdims=True)
  as_t1 = jnp.concatenate([mean, jnp.full_like(mean, 1e6)], axis=1)
  np.testing.assert_allclose(net.decode(variables, as_t1, T1_ONLY), both, rtol=1e-5, atol=1e-5)
  # The FLAIR branch is used when present: T1 alone gives other logits.
  t1 = net.decode(variables, features, T1_ONLY)
  assert np.max(np.abs(np.asarray(t1) - np.asarray(both))) > 1e-3
  np.testing.assert_allclose(net.forward(variables, image, BOTH), both, rtol=1e-5, atol=1e-5)


def test_t1_only_prediction_has_no_gradient_into_the_flair_branch():
  tiny = Net(features=(2, 2), dilations=(1, 2), blocks_per_stage=1, head_features=2)
  model, variables, image = tiny.model, tiny.variables, tiny.image
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, image, T1_ONLY) ** 2)))(
      variables["params"])
  stage = jax.tree.leaves(grads["modality_stage"])
  assert all(np.all(np.asarray(g)[1] == 0) for g in stage)
  assert any(np.any(np.asarray(g)[0] != 0) for g in stage)


@pytest.mark.parametrize("shape, dilation", [((1, 7, 6, 5, 3), 2), ((2, 9, 5, 3), 4)])
def test_subgrid_dilated_convolution_equals_the_dilated_convolution(shape, dilation):
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
  fast = joint.ResidualBlock(features=4, dilation=dilation, norm="none", space_to_batch=True)
  plain = joint.ResidualBlock(features=4, dilation=dilation, norm="none", space_to_batch=False)
  variables = numpy_variables(plain, x)
  np.testing.assert_allclose(jax.jit(fast.apply)(variables, x), jax.jit(plain.apply)(variables, x),
                             rtol=1e-5, atol=1e-5)
  split = joint.split_subgrids(x, dilation)
  assert split.shape[0] == shape[0] * dilation ** (len(shape) - 2)
  np.testing.assert_array_equal(joint.merge_subgrids(split, dilation, shape[0], shape[1:-1]), x)


def test_task_specific_heads_only_predict_their_classes():
  for classes in ((0, 1, 2, 3), (0, LESION)):
    tiny = Net(features=(2,), dilations=(1,), blocks_per_stage=1, head_features=2,
               head_classes=classes)
    probs = jax.nn.softmax(tiny.forward(tiny.variables, tiny.image, BOTH), axis=-1)
    absent = [c for c in range(5) if c not in classes]
    assert np.all(np.asarray(probs)[..., absent] == 0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loss

def test_class_weights():
  np.testing.assert_allclose(WEIGHTS, [1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 2])
  np.testing.assert_allclose(joint.class_weights(3, 1), [1 / 4, 1 / 2, 1 / 4])
  assert WEIGHTS.sum() == pytest.approx(1.0)
  # Given weights are normalised to sum 1 (Eq. 6).
  np.testing.assert_allclose(joint.class_weights(3, 2, (1.0, 1.0, 2.0)), [1 / 4, 1 / 4, 1 / 2])
  for bad in ((1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
    with pytest.raises(ValueError, match=r"config\.loss\.class_weights"):
      joint.class_weights(3, 2, bad)


def test_paper_label_space_and_class_weights():
  """The paper's label space (tissue6: six tissue classes, CSF outside the ventricles as
  background) and ω = 1/16 per tissue class, 1/2 for the lesion, Σ ω = 1 (1/8 for background)."""
  paper = joint_config.get_config("paper")
  assert paper.task == "tissue6"
  task = get_task("tissue6")
  assert task.class_names == ("background", "wm", "gm", "basal_ganglia", "ventricles",
                              "cerebellum", "brainstem", "lesion")
  assert "csf" not in task.class_names and "csf" not in task.regions
  lesion = task.class_names.index("lesion")
  weights = joint.class_weights(task.num_classes, lesion, paper.loss.class_weights)
  assert weights.sum() == pytest.approx(1.0)
  assert weights[lesion] == pytest.approx(1 / 2) and weights[0] == pytest.approx(1 / 8)
  np.testing.assert_allclose(np.delete(weights, [0, lesion]), 1 / 16)
  # The model predicts the 8 classes; the loss runs on a tissue6 batch (labels 0..6, lesion 7).
  config = smoke_config(task="tissue6", **{"loss.class_weights": tuple(paper.loss.class_weights)})
  method = get_method(config)
  assert method.num_classes == 8
  batch = hand_batch()
  batch["tissue"]["label"] = np.random.default_rng(1).integers(0, 7, (1, 6, 6, 6)).astype(np.int32)
  params = numpy_variables(method.model, batch["image"], batch["modality_mask"])["params"]
  loss, (metrics, _) = jax.jit(method.loss_fn)(params, {}, batch, jax.random.key(0), jnp.int32(9))
  assert np.isfinite(float(loss)) and float(metrics["consistency_active"]) == 1
  # L^t's weights: background + six tissue classes = 1/2 of the loss at most.
  assert 0 < float(metrics["tissue_loss"]) <= 0.5 and 0 < float(metrics["lesion_loss"]) <= 0.5


def random_probs(rng, shape):
  return jax.nn.softmax(jnp.asarray(rng.normal(size=shape), jnp.float32), axis=-1)


def one_hot(classes, n=5):
  return jnp.asarray(np.eye(n, dtype=np.float32)[np.asarray(classes)])


def test_tissue_term_on_hand_made_input():
  labels = jnp.array([[1, 2]])                 # two voxels: csf, gm
  probs = one_hot([[1, 3]])                    # csf right, gm predicted as wm
  # Background: no voxel either way (J = 1); csf: J = 1; gm: J = 0; wm: J = 0.
  term = joint.tissue_term(probs, labels, None, WEIGHTS, LESION)
  assert float(term) == pytest.approx(2 / 8, abs=1e-4)
  # The lesion channel is not part of the tissue term.
  moved = probs.at[..., LESION].set(0.7)
  assert float(joint.tissue_term(moved, labels, None, WEIGHTS, LESION)) == pytest.approx(float(term))


def test_lesion_term_on_hand_made_input():
  probs = jnp.zeros((1, 2, 5)).at[..., LESION].set(0.5).at[..., 0].set(0.5)
  lesion = jnp.array([[True, False]])
  # Eq. 6: J = sum p t / sum (t^2 + p^2 - p t) = 0.5 / ((1 + 0.25 - 0.5) + 0.25) = 1/2; weight 1/2.
  term = joint.lesion_term(probs, lesion, None, WEIGHTS, LESION)
  assert float(term) == pytest.approx(0.5 * (1 - 1 / 2), abs=1e-4)
  # The soft-union form: J = 0.5 / (1 + 0.5) = 1/3.
  soft_union = joint.lesion_term(probs, lesion, None, WEIGHTS, LESION, "soft_union")
  assert float(soft_union) == pytest.approx(0.5 * (1 - 1 / 3), abs=1e-4)
  # Only the lesion class is scored: how the rest is split among tissues does not matter.
  other = probs.at[..., 0].set(0.0).at[..., 2].set(0.5)
  assert float(joint.lesion_term(other, lesion, None, WEIGHTS, LESION)) == pytest.approx(float(term))
  # Voxels outside `valid` never count.
  valid = jnp.array([[True, False]])
  assert float(joint.lesion_term(probs, lesion, valid, WEIGHTS, LESION)) == pytest.approx(
      0.5 * (1 - 0.5 / 0.75), abs=1e-4)


def test_terms_add_up_to_the_full_weighted_jaccard():
  rng = np.random.default_rng(3)
  probs = random_probs(rng, (2, 4, 4, 5))
  labels = jnp.asarray(rng.integers(0, 5, (2, 4, 4)))
  # L = L^t + L^l on a fully labelled input (lesion voxels are in no tissue class).
  full = losses.probabilistic_jaccard(probs, one_hot(labels), None, WEIGHTS) * WEIGHTS.sum()
  tissue = joint.tissue_term(probs, labels, None, WEIGHTS, LESION)
  lesion = joint.lesion_term(probs, labels == LESION, None, WEIGHTS, LESION)
  np.testing.assert_allclose(tissue + lesion, full, rtol=1e-5)
  assert 0 < float(lesion) < float(full)


def numpy_eq6(probs, target, valid, class_weights):
  """Dorent et al. 2019, Eq. 6: 1 - sum_c w_c sum_j g p / sum_j (g^2 + p^2 - g p), sum_c w_c = 1."""
  p = np.asarray(probs, np.float64).reshape(-1, probs.shape[-1])
  g = np.asarray(target, np.float64).reshape(p.shape)
  keep = np.asarray(valid, bool).reshape(-1)
  p, g = p[keep], g[keep]
  w = np.asarray(class_weights, np.float64) / np.sum(class_weights)
  jaccard = np.sum(g * p, axis=0) / np.sum(g**2 + p**2 - g * p, axis=0)
  return 1 - np.sum(w * jaccard)


@pytest.mark.parametrize("soft_target", [False, True])
def test_probabilistic_jaccard_is_eq6(soft_target):
  rng = np.random.default_rng(4)
  probs = random_probs(rng, (2, 3, 3, 3, 5))
  target = (random_probs(rng, (2, 3, 3, 3, 5)) if soft_target
            else one_hot(rng.integers(0, 5, (2, 3, 3, 3))))
  valid = rng.uniform(size=(2, 3, 3, 3)) < 0.7
  weights = np.array([1.0, 2.0, 3.0, 0.5, 4.0], np.float32)   # normalised to sum 1 by the loss
  ours = losses.probabilistic_jaccard(probs, target, valid, weights)
  np.testing.assert_allclose(ours, numpy_eq6(probs, target, valid, weights), rtol=1e-5)
  # The other readings give other numbers on the same input.
  for form in ("soft_union", "min_max"):
    other = losses.probabilistic_jaccard(probs, target, valid, weights, form=form)
    assert abs(float(other) - float(ours)) > 1e-3
  with pytest.raises(ValueError, match="unknown form"):
    losses.probabilistic_jaccard(probs, target, form="dice")


def test_min_max_equals_soft_union_on_one_hot_targets():
  rng = np.random.default_rng(5)
  probs = random_probs(rng, (1, 3, 3, 3, 5))
  target = one_hot(rng.integers(0, 5, (1, 3, 3, 3)))
  np.testing.assert_allclose(losses.probabilistic_jaccard(probs, target, None, WEIGHTS, "min_max"),
                             losses.probabilistic_jaccard(probs, target, None, WEIGHTS, "soft_union"),
                             rtol=1e-5)


def test_consistency_term_zero_when_equal_and_hand_made_value():
  probs = random_probs(np.random.default_rng(6), (2, 4, 4, 5))
  same = joint.consistency_term(probs, probs, None, WEIGHTS, LESION)
  assert float(same) == pytest.approx(0.0, abs=1e-6)
  assert float(joint.consistency_term(probs, probs, None, WEIGHTS, LESION, form="min_max")) \
      == pytest.approx(0.0, abs=1e-6)
  # The soft-union form is not zero on equal soft inputs.
  assert float(losses.probabilistic_jaccard(probs, probs, form="soft_union")) > 0.1
  # One voxel, Eq. 6: gm 0.5 vs 1.0 -> J = 0.5 / (1 + 0.25 - 0.5) = 2/3; wm 0.5 vs 0 -> J = 0;
  # csf, background 0 vs 0 -> J = 1.
  full = jnp.array([[[0.0, 0.0, 0.5, 0.5, 0.0]]])
  t1 = jnp.array([[[0.0, 0.0, 1.0, 0.0, 0.0]]])
  term = joint.consistency_term(full, t1, None, WEIGHTS, LESION)
  assert float(term) == pytest.approx((1 / 3 + 1.0) / 8, abs=1e-4)
  # min_max: gm J = 0.5 / 1 = 0.5.
  fuzzy = joint.consistency_term(full, t1, None, WEIGHTS, LESION, form="min_max")
  assert float(fuzzy) == pytest.approx((0.5 + 1.0) / 8, abs=1e-4)
  # The lesion channel is not part of it.
  assert float(joint.consistency_term(full.at[..., LESION].set(0.9), t1, None, WEIGHTS, LESION)) \
      == pytest.approx(float(term))


def test_consistency_stop_gradient_keeps_the_value_and_freezes_the_target():
  rng = np.random.default_rng(7)
  full, t1 = random_probs(rng, (1, 3, 3, 5)), random_probs(rng, (1, 3, 3, 5))
  term = lambda f, t, stop: joint.consistency_term(f, t, None, WEIGHTS, LESION, stop)
  assert float(term(full, t1, True)) == pytest.approx(float(term(full, t1, False)))
  grad_target = lambda stop: jax.grad(term, argnums=1)(full, t1, stop)
  assert np.all(np.asarray(grad_target(True)) == 0)
  assert np.any(np.asarray(grad_target(False)) != 0)
  assert np.any(np.asarray(jax.grad(term)(full, t1, True)) != 0)


def smoke_config(**changes):
  config = joint_config.get_config("smoke")
  config.model.update(features=(2, 3), dilations=(1, 2), head_features=3)
  for key, value in changes.items():
    *parents, name = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[name] = value
  return config


def hand_batch(same_flair=False):
  rng = np.random.default_rng(0)
  shape = (1, 6, 6, 6)
  t1 = rng.normal(size=shape).astype(np.float32)
  flair = t1 if same_flair else rng.normal(size=shape).astype(np.float32)
  tissue = {"image": np.stack([t1, np.zeros_like(t1)], -1), "modality_mask": T1_ONLY,
            "label": rng.integers(0, 4, shape).astype(np.int32), "valid": np.ones(shape, bool)}
  lesion = {"image": np.stack([t1, flair], -1), "modality_mask": BOTH,
            "label": (rng.uniform(size=shape) < 0.2).astype(np.int32), "valid": np.ones(shape, bool)}
  return {"tissue": tissue, "lesion": lesion, "image": lesion["image"], "modality_mask": BOTH}


@pytest.fixture(scope="module")
def joint_loss():
  config = smoke_config(**{"loss.consistency_start": 5, "loss.consistency_weight": 2.0})
  method = get_method(config)
  batch = hand_batch()
  params = numpy_variables(method.model, batch["image"], batch["modality_mask"])["params"]
  loss_fn = jax.jit(method.loss_fn)
  return method, params, batch, loss_fn


def test_consistency_skipped_before_the_start_step(joint_loss):
  method, params, batch, loss_fn = joint_loss
  key = jax.random.key(0)
  before, (m_before, _) = loss_fn(params, {}, batch, key, jnp.int32(4))
  after, (m_after, _) = loss_fn(params, {}, batch, key, jnp.int32(5))
  assert float(m_before["consistency_loss"]) == 0.0 and float(m_before["consistency_active"]) == 0
  assert float(before) == pytest.approx(float(m_before["tissue_loss"] + m_before["lesion_loss"]))
  assert float(m_after["consistency_loss"]) > 0 and float(m_after["consistency_active"]) == 1
  assert float(after) == pytest.approx(float(m_after["tissue_loss"] + m_after["lesion_loss"]
                                             + 2.0 * m_after["consistency_loss"]), rel=1e-5)
  assert float(m_after["tissue_loss"]) == pytest.approx(float(m_before["tissue_loss"]))


def test_consistency_zero_when_flair_adds_nothing(joint_loss):
  method, params, batch, loss_fn = joint_loss
  # Identical branches and FLAIR == T1: h(T1, FLAIR) == h(T1), so R^t_1 = 0 even when active.
  same = dict(params, modality_stage=jax.tree.map(lambda p: jnp.stack([p[0], p[0]]),
                                                  params["modality_stage"]))
  _, (metrics, _) = loss_fn(same, {}, hand_batch(same_flair=True), jax.random.key(0), jnp.int32(9))
  assert float(metrics["consistency_active"]) == 1
  assert float(metrics["consistency_loss"]) == pytest.approx(0.0, abs=1e-6)


def test_task_specific_losses_use_their_term_only():
  batch = hand_batch()
  for variant, term in (("tissue_only", "tissue_loss"), ("lesion_only", "lesion_loss")):
    method = get_method(smoke_config(variant=variant))
    params = numpy_variables(method.model, batch["image"], batch["modality_mask"])["params"]
    loss, (metrics, _) = jax.jit(method.loss_fn)(params, {}, batch, jax.random.key(0),
                                                 jnp.int32(10))
    assert set(k for k in metrics if k.endswith("_loss")) == {term}
    assert float(loss) == pytest.approx(float(metrics[term]))


def test_tissue_only_baseline_reads_t1_only():
  method = get_method(smoke_config(variant="tissue_only"))
  batch = hand_batch()
  variables = numpy_variables(method.model, batch["image"], batch["modality_mask"])
  forward = jax.jit(method.model.apply)
  image = jnp.asarray(batch["image"])
  with_flair = forward(variables, image, BOTH)
  other_flair = forward(variables, image.at[..., 1].set(image[..., 1] * 5.0 + 3.0), BOTH)
  np.testing.assert_array_equal(with_flair, other_flair)
  np.testing.assert_array_equal(with_flair, forward(variables, image, T1_ONLY))
  # The joint model does read FLAIR.
  joint_model = get_method(smoke_config()).model
  joint_variables = numpy_variables(joint_model, image, BOTH)
  joint_forward = jax.jit(joint_model.apply)
  assert np.max(np.abs(np.asarray(joint_forward(joint_variables, image, BOTH))
                       - np.asarray(joint_forward(joint_variables, image, T1_ONLY)))) > 1e-4


@pytest.mark.parametrize("change, needle", [
    ({"variant": "both"}, "config.variant"),
    ({"task": "wmh"}, "config.task"),
    ({"loss.class_weights": (1.0, 2.0)}, "config.loss.class_weights"),
    ({"model.norm": "batch"}, "config.model.norm"),
    ({"model.modality_stages": 3}, "config.model.modality_stages"),
    ({"loss.consistency_weight": -1.0}, "config.loss.consistency_weight"),
    ({"loss.consistency_form": "dice"}, "config.loss.consistency_form"),
    ({"data.tissue_set.modalities": ("t2",)}, "config.data.tissue_set.modalities"),
])
def test_bad_config_is_one_clear_error(change, needle):
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    get_method(smoke_config(**change))


def test_presets_build():
  for preset in ("paper", "demo", "smoke"):
    config = joint_config.get_config(preset)
    assert config.task == ("tissue6" if preset == "paper" else "tissue")
    assert config.data.phantom_lesions
    assert get_method(config).name == "joint"
  assert joint_config.get_config("paper").optimizer.learning_rate == 5e-3
  paper = joint_config.get_config("paper")
  assert paper.loss.consistency_start == 5000
  assert tuple(paper.data.patch_size) == (120, 120, 40) and paper.data.batch_size == 1
  assert paper.loss.jaccard_form == paper.loss.consistency_form == "eq6"
  # Variants: config.variant, named after the preset or not (the default).
  assert joint_config.get_config("smoke").variant == "joint"
  lesion_only = joint_config.get_config("demo_lesion_only")
  assert lesion_only.variant == "lesion_only" and lesion_only.preset == "demo_lesion_only"
  assert lesion_only.model.to_dict() == joint_config.get_config("demo").model.to_dict()
  with pytest.raises(ValueError, match="unknown preset 'demo_both'"):
    joint_config.get_config("demo_both")


# ----------------------------------------------------------------------------------------------
# Data and a smoke run (phantoms generated once into a temporary cache)

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  from hemijax.training import loop
  cache = tmp_path_factory.mktemp("cache")
  # Three subjects per set (one training case each); one window per validation volume.
  config = smoke_config(**{
      "data.cache_dir": str(cache), "data.phantom_subjects": 3, "data.tissue_set.subjects": 3,
      "data.lesion_set.subjects": 3, "eval.roi_size": (64, 64, 64), "train.num_steps": 3,
      "train.eval_every": 3, "loss.consistency_start": 1})
  workdir = tmp_path_factory.mktemp("runs") / "joint"
  last = loop.train(config, workdir, progress=False)
  return config, workdir, last


def test_batches_come_from_the_two_task_specific_sets(smoke_run):
  config, _, _ = smoke_run
  make_batch = joint.make_batches(config, None)
  batch = make_batch(7)
  assert batch["tissue"]["modality_mask"].tolist() == [[True, False]] * config.data.batch_size
  assert batch["lesion"]["modality_mask"].tolist() == [[True, True]] * config.data.batch_size
  assert np.all(batch["tissue"]["image"][..., 1] == 0)
  assert set(np.unique(batch["tissue"]["label"])) <= {0, 1, 2, 3}
  # Lesion patches are centred in the dilated lesion map: every one holds lesion voxels.
  lesion = batch["lesion"]["label"]
  assert set(np.unique(lesion)) <= {0, 1}
  assert all(lesion[b].any() for b in range(len(lesion)))
  again = make_batch(7)
  other = make_batch(8)
  for which in ("tissue", "lesion"):
    np.testing.assert_array_equal(batch[which]["image"], again[which]["image"])
  assert not np.array_equal(batch["lesion"]["image"], other["lesion"]["image"])


def test_training_sets_and_the_evaluation_set_differ(smoke_run):
  from hemijax.data import datasets
  config, _, _ = smoke_run
  evaluation = datasets.load_split(config, "val")
  assert any((v.label == LESION).any() for v in evaluation)  # fully annotated: lesions and tissues
  assert all(v.available.tolist() == [True, True] for v in evaluation)
  roots = {datasets.dataset_root(config)} | {
      datasets.dataset_root(joint.set_config(config, w)) for w in joint.SETS}
  assert len(roots) == 3


def test_smoke_training_logs_every_term(smoke_run):
  _, workdir, last = smoke_run
  records = metrics_records(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert [r["consistency_active"] for r in train] == [0.0, 1.0, 1.0]
  assert train[0]["consistency_loss"] == 0.0 and train[-1]["consistency_loss"] > 0
  assert all(np.isfinite(r["loss"]) for r in train)
  val = [r for r in records if r["split"] == "val"]
  assert val and np.isfinite([val[-1]["val_dice_all"], val[-1]["val_dice_dropped"]]).all()
  assert (workdir / "checkpoints").is_dir() and last["step"] == 3
