"""URN: shapes, subset independence, finite gradients, encode/decode == __call__, the
fixed-parameter normalisation, the pooled pre-training data, a two-stage smoke run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unet as unet_config
from configs import urn as urn_config
from hemijax.nn import fusion
from hemijax.models import get_method
from hemijax.models import urn
from model_helpers import jit_apply, metrics_records, quick_init, smoke_training_config

M = 4
# conv_impl "xla": the fastest to compile (the lowerings are compared in the layers tests).
SMALL = dict(representation_channels=3, encoder_features=(4, 5), features=(4, 6),
             conv_impl="xla")


def make(spatial=(8, 8), f_mean="identity", batch=2):
  model = urn.URN(num_modalities=M, num_classes=3, f_mean=f_mean, **SMALL)
  image = jax.random.normal(jax.random.key(0), (batch,) + spatial + (M,))
  variables = quick_init(model, image, jnp.ones((batch, M), bool))
  return model, variables, image, jit_apply(model)


@pytest.fixture(scope="module")
def default():
  return make(batch=3)


MASK3 = jnp.array([[True, True, False, True], [True, False, False, True],
                   [False, True, False, True]])


@pytest.mark.parametrize("spatial", [(8, 8), (4, 8, 4)])
def test_shapes_2d_and_3d(default, spatial):
  model, variables, image, apply = default if len(spatial) == 2 else make(spatial, batch=3)
  assert apply(variables, image, MASK3).shape == (3,) + spatial + (3,)
  assert apply(variables, image, method="encode").shape == (3, M) + spatial + (3,)
  synth, _ = apply(variables, image, MASK3, method="pretrain_forward",
                   mutable=("batch_stats",))[0]
  assert synth.shape == image.shape
  assert set(variables["params"]) == {"encoders", "synthesis", "segmenter"}


@pytest.mark.parametrize("train", [False, True])
def test_fused_representation_ignores_dropped_modalities(default, train):
  model, variables, image, apply = default
  mask = jnp.array([[True, False, True, False], [False, True, False, False],
                    [True, True, True, True]])
  other = jnp.where(mask[:, None, None, :], image,
                    50 * jax.random.normal(jax.random.key(5), image.shape))

  def encode_and_fuse(module, x):
    return module.fuse(module.encode(jnp.where(mask[:, None, None, :], x, 0), mask, train), mask)

  fused = jax.jit(lambda x: model.apply(variables, x, method=encode_and_fuse,
                                        mutable=["batch_stats"])[0])
  logits = lambda x: apply(variables, x, mask, train=train, mutable=("batch_stats",))[0]
  np.testing.assert_array_equal(fused(image), fused(other))
  np.testing.assert_array_equal(logits(image), logits(other))
  assert not np.allclose(fused(image), fused(image.at[..., 0].add(1.0)))


@pytest.fixture(scope="module")
def pretrain_value_and_grad(default):
  model, variables, image, _ = default
  available, valid = jnp.ones((3, M), bool), jnp.ones(image.shape[:-1], bool)

  @jax.jit
  def value_and_grad(params, mask, variance_weight):
    def loss(params):
      (synth, features), _ = model.apply({**variables, "params": params}, image, mask, True,
                                         method="pretrain_forward", mutable=["batch_stats"])
      return (urn.synthesis_mse(synth, image, available, valid)
              + variance_weight * urn.masked_variance_term(features, mask, valid))
    return jax.value_and_grad(loss)(params)

  return value_and_grad


@pytest.mark.parametrize("kept,variance_weight", [((0,), 0.0), ((1, 3), 1e-4), ((1, 3), 1.0)])
def test_pretraining_gradients_finite(default, pretrain_value_and_grad, kept, variance_weight):
  _, variables, _, _ = default
  mask = jnp.zeros((3, M), bool).at[:, list(kept)].set(True)
  value, grads = pretrain_value_and_grad(variables["params"], mask, variance_weight)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The segmentation decoder takes no part in pre-training; the encoders of dropped modalities
  # get no gradient either.
  assert all(not np.any(g) for g in jax.tree.leaves(grads["segmenter"]))
  dropped = [i for i in range(M) if i not in kept]
  assert all(not np.any(g[np.array(dropped)]) for g in jax.tree.leaves(grads["encoders"]))
  assert any(np.any(g[np.array(kept)]) for g in jax.tree.leaves(grads["encoders"]))


def test_variance_term_is_zero_for_one_modality_and_matches_numpy_for_two(default):
  model, variables, image, apply = default
  features = apply(variables, image, method="encode")
  one = jnp.zeros((3, M), bool).at[:, 0].set(True)
  two = one.at[:, 2].set(True)
  assert float(urn.masked_variance_term(features, one)) == 0.0
  expected = np.mean(np.var(np.asarray(features)[:, [0, 2]], axis=1, ddof=1))
  assert expected > 0
  np.testing.assert_allclose(urn.masked_variance_term(features, two), expected, rtol=1e-5)


@pytest.mark.parametrize("f_mean", ["identity", "exp"])
def test_encode_decode_equals_call(default, f_mean):
  model, variables, image, apply = default if f_mean == "identity" else make(f_mean=f_mean,
                                                                             batch=3)
  mask = jnp.array([[True, True, False, False], [False, True, True, True],
                    [True, False, False, False]])
  features = apply(variables, image, method="encode")
  np.testing.assert_allclose(apply(variables, features, mask, method="decode"),
                             apply(variables, image, mask), rtol=1e-5, atol=1e-6)
  fused = apply(variables, features, mask, method="fuse")
  f, f_inv = fusion.F_MEANS[f_mean]
  expected = f_inv(jnp.mean(f(features[1, 1:]), axis=0))
  np.testing.assert_allclose(fused[1], expected, rtol=1e-5, atol=1e-6)


def test_fixed_parameter_normalisation_in_training_mode(default):
  model, variables, image, apply = default
  image = image * 5 + 2
  mask = MASK3
  features, state = apply(variables, image, mask, train=True, method="encode",
                          mutable=("batch_stats",))
  assert "normalise" not in variables["params"]["encoders"]   # no learned scale or shift
  for m in range(M):
    items = np.flatnonzero(mask[:, m])
    if not items.size:
      continue
    values = np.asarray(features)[items, m].reshape(-1, features.shape[-1])
    np.testing.assert_allclose(values.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(values.var(0), 1, atol=1e-3)
  # Modality 2 is absent from the whole batch: its running statistics stay as they were.
  before = variables["batch_stats"]["encoders"]["normalise"]
  after = state["batch_stats"]["encoders"]["normalise"]
  np.testing.assert_array_equal(after["mean"][2], before["mean"][2])
  assert not np.array_equal(after["mean"][0], before["mean"][0])


def test_config_errors():
  config = urn_config.get_config("smoke")
  config.pretrain.dropout.min_kept = 1
  with pytest.raises(ValueError, match="config.pretrain.dropout.min_kept"):
    get_method(config)
  config = urn_config.get_config("smoke")
  config.model.f_mean = "max"
  with pytest.raises(ValueError, match="config.model.f_mean"):
    get_method(config)
  with pytest.raises(ValueError, match="unknown preset"):
    urn_config.get_config("demo_dropout")


@pytest.mark.parametrize("preset,encoders_train", [("smoke", False),
                                                    ("smoke_md_pooled_finetuned", True)])
def test_smoke_training_pools_data_and_freezes_by_stage(tmp_path, preset, encoders_train):
  """Pre-training never touches the segmenter; segmentation leaves the synthesis decoders alone
  and trains the encoders only in the fine-tuned reading of the pooled row."""
  from hemijax.inference.predictor import load_run
  from hemijax.training import loop

  config = smoke_training_config(urn_config, preset)
  config.pretrain.num_steps = 2
  config.train.num_steps = 2
  config.train.keep_checkpoints = 4
  healthy = urn.healthy_volumes(config)
  assert len(healthy) == config.pretrain.healthy_subjects
  names = list(config.modalities)
  for vol in healthy:   # T1 and T2 only, in the tumour task's slots
    np.testing.assert_array_equal(vol.available, [n in ("t1", "t2") for n in names])
    assert not vol.label.any()

  loop.train(config, tmp_path, progress=False)
  records = metrics_records(tmp_path)
  assert [(r["step"], r["stage"]) for r in records if r["split"] == "train"] == [
      (1, "pretrain"), (2, "pretrain"), (3, "segmentation"), (4, "segmentation")]
  assert [r["step"] for r in records if r["split"] == "val"] == [4]
  _, _, start = load_run(tmp_path, step=2)
  _, _, end = load_run(tmp_path, step=4)
  for part, changed in (("encoders", encoders_train), ("synthesis", False), ("segmenter", True)):
    pairs = list(zip(jax.tree.leaves(start["params"][part]), jax.tree.leaves(end["params"][part])))
    assert any(not np.array_equal(a, b) for a, b in pairs) == changed, part
  stats_moved = not np.array_equal(start["batch_stats"]["encoders"]["normalise"]["mean"],
                                   end["batch_stats"]["encoders"]["normalise"]["mean"])
  assert stats_moved == encoders_train


def test_synthesis_psnr_rows_and_values(default, tmp_path):
  import types

  from hemijax.models.urn import synthesis
  from hemijax.models import base

  model, variables, _, apply = default
  method = base.Method(name="urn", model=model, loss_fn=None,
                       modalities=("flair", "t1", "t1ce", "t2"), num_classes=3, spatial_dims=2,
                       size_multiple=2)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(8, 8, 3, M)).astype(np.float32)
  brain = np.zeros((8, 8, 3), bool)
  brain[1:7, 2:8] = True
  full = types.SimpleNamespace(case_id="a", image=image, available=np.ones(M, bool), brain=brain)
  partial = types.SimpleNamespace(case_id="b", image=image * [1, 1, 0, 1],
                                  available=np.array([True, True, False, True]), brain=brain)
  rows = synthesis.synthesis_psnr((method, variables), [full, partial])
  # Every held modality from every non-empty subset lacking it: 4*3 + 6*2 + 4*1 with all four
  # held, 3*2 + 3*1 with three.
  assert sum(r["case_id"] == "a" for r in rows) == 28
  assert sum(r["case_id"] == "b" for r in rows) == 9
  assert all(r["target"] not in r["subset"].split("+") for r in rows)
  assert not any(r["target"] == "t1ce" for r in rows if r["case_id"] == "b")

  # One value recomputed by hand: T2 synthesised from FLAIR + T1, slice by slice.
  mask = jnp.array([[True, True, False, False]] * 3)
  slices = jnp.moveaxis(jnp.asarray(image), 2, 0)                    # (Z, X, Y, M)
  features = apply(variables, slices, method="encode")
  synth = np.asarray(apply(variables, features, mask, method="synthesize"))[..., 3]
  synth = np.moveaxis(synth, 0, 2)
  truth = image[..., 3][brain]
  mse = np.mean((synth[brain] - truth) ** 2)
  expected = 10 * np.log10((truth.max() - truth.min()) ** 2 / mse)
  row = next(r for r in rows if r["case_id"] == "a" and r["subset"] == "flair+t1"
             and r["target"] == "t2")
  np.testing.assert_allclose(row["psnr"], expected, rtol=1e-4)

  summary = synthesis.summarise(rows, method.modalities)
  assert len(summary["subsets"]) == 14
  markdown = synthesis.synthesis_markdown(summary)
  assert markdown.count("\n| ") == 14 + 2   # header, 14 subsets, mean row
  synthesis.write_synthesis_report(tmp_path, rows, method.modalities)
  assert (tmp_path / "synthesis.md").read_text() == markdown
  assert len((tmp_path / "synthesis.csv").read_text().splitlines()) == 1 + len(rows)
  with pytest.raises(ValueError, match="no synthesis decoders"):
    synthesis.check_synthesis(get_method(unet_config.get_config("smoke")))


def test_variants_md_and_md_pooled():
  pooled, md = urn_config.get_config("smoke"), urn_config.get_config("smoke_md")
  assert (pooled.variant, md.variant, md.pretrain.num_steps) == ("md_pooled", "md", 0)
  tuned = urn_config.get_config("smoke_md_pooled_finetuned")
  assert tuned.pretrain.num_steps == pooled.pretrain.num_steps > 0
  assert [e.__name__ for e in get_method(tuned).evaluators] == ["synthesis_evaluator"]
  assert pooled.pretrain.num_steps > 0
  assert urn_config.get_config("paper_md").loss.dice_weight == 0.0   # the paper: cross-entropy
  # Only the pre-trained variant has trained synthesis decoders to report on.
  assert [e.__name__ for e in get_method(pooled).evaluators] == ["synthesis_evaluator"]
  assert get_method(md).evaluators == ()
  md.pretrain.num_steps = 5
  with pytest.raises(ValueError, match="config.pretrain.num_steps"):
    get_method(md)
  md.variant = "joint"
  with pytest.raises(ValueError, match="config.variant"):
    get_method(md)


@pytest.mark.parametrize("preset,encoders_learn", [("smoke_md", True), ("smoke", False)])
def test_segmentation_trains_encoders_only_without_pretraining(preset, encoders_learn):
  config = urn_config.get_config(preset)
  config.model.conv_impl = "xla"
  method = get_method(config)
  stages = method.training_stages(config)
  assert [s.name for s in stages] == (["segmentation"] if encoders_learn else
                                      ["pretrain", "segmentation"])
  image = jax.random.normal(jax.random.key(0), (2, 8, 8, M))
  label = (image[..., 0] > 0.5).astype(jnp.int32)
  batch = {"image": image, "modality_mask": jnp.ones((2, M), bool), "label": label,
           "valid": jnp.ones((2, 8, 8), bool)}
  variables = quick_init(method.model, image, batch["modality_mask"])
  state = {k: v for k, v in variables.items() if k != "params"}
  # Jitted: op by op, the vmapped encoders' many small operations take far longer.
  grads, (_, new_state) = jax.jit(jax.grad(stages[-1].loss_fn, has_aux=True))(
      variables["params"], state, batch, jax.random.key(1), 0)
  encoder_grads = jax.tree.leaves(grads["encoders"])
  assert any(np.any(g != 0) for g in encoder_grads) == encoders_learn
  assert all(np.all(np.isfinite(g)) for g in encoder_grads)
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads["segmenter"]))
  # End to end, the encoders' batch statistics are updated too; frozen, they stay.
  before = state["batch_stats"]["encoders"]["normalise"]["mean"]
  after = new_state["batch_stats"]["encoders"]["normalise"]["mean"]
  assert (not np.array_equal(before, after)) == encoders_learn
