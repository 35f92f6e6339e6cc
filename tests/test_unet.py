"""U-Net baseline: 2D/3D shapes, zero-filling, masked batch statistics, presets, a smoke run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unet as unet_config
from hemijax.models import get_method
from hemijax.models.unet import BatchNorm, ModalityUNet
from model_helpers import jit_apply, metrics_records, quick_init, smoke_training_config

# conv_impl "xla": the fastest to compile (the lowerings are compared in the layers tests).
SMALL = dict(features=(4, 6, 8), conv_impl="xla")


@pytest.mark.parametrize("spatial", [(8, 12), (8, 8, 4)])
def test_shapes_2d_and_3d(spatial):
  model = ModalityUNet(num_modalities=3, num_classes=5, **SMALL)
  image = jax.random.normal(jax.random.key(0), (2,) + spatial + (3,))
  mask = jnp.ones((2, 3), bool)
  variables = quick_init(model, image, mask)
  apply = jit_apply(model)
  assert apply(variables, image, mask).shape == (2,) + spatial + (5,)
  logits, state = apply(variables, image, mask, train=True, mutable=("batch_stats",))
  assert logits.shape == (2,) + spatial + (5,)
  # Training mode moved the running averages.
  before = jax.tree.leaves(variables["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(state["batch_stats"])))


@pytest.mark.parametrize("train", [False, True])
def test_absent_channels_never_change_the_output(train):
  model = ModalityUNet(num_modalities=4, num_classes=3, **SMALL)
  key_a, key_b = jax.random.split(jax.random.key(0))
  image = jax.random.normal(key_a, (2, 8, 8, 4))
  mask = jnp.array([[True, False, True, False], [False, True, False, False]])
  variables = quick_init(model, image, mask)
  other = jnp.where(mask[:, None, None, :], image, 100 * jax.random.normal(key_b, image.shape))
  jitted = jit_apply(model)
  apply = lambda x: jitted(variables, x, mask, train=train, mutable=("batch_stats",))[0]
  np.testing.assert_array_equal(apply(image), apply(other))
  # ... whereas a present channel does change it (the check can fail).
  changed = image.at[0, ..., 0].add(1.0)
  assert not np.allclose(apply(image), apply(changed))


def test_masked_batch_statistics_ignore_excluded_items():
  bn = BatchNorm()
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 2)) * 3 + 1
  item_mask = jnp.array([True, False, True])
  variables = quick_init(bn, x, False)
  jitted = jit_apply(bn)
  run = lambda x, m: jitted(variables, x, item_mask=m, train=True, mutable=("batch_stats",))
  y, state = run(x, item_mask)
  y2, state2 = run(x.at[1].set(1e3), item_mask)
  np.testing.assert_allclose(y[jnp.array([0, 2])], y2[jnp.array([0, 2])], rtol=1e-6)
  kept = np.asarray(x)[[0, 2]]
  np.testing.assert_allclose(np.asarray(y)[[0, 2]].mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * kept.mean(axis=(0, 1, 2)),
                             rtol=1e-5)
  # No item at all: the running statistics normalise and stay unchanged.
  _, state = run(x, jnp.zeros(3, bool))
  np.testing.assert_array_equal(state["batch_stats"]["mean"], variables["batch_stats"]["mean"])
  np.testing.assert_array_equal(state["batch_stats"]["var"], variables["batch_stats"]["var"])


def test_presets_and_method():
  for preset in ("paper", "demo", "smoke"):
    assert unet_config.get_config(preset).dropout.name == "none"
    with_dropout = unet_config.get_config(preset + "_dropout")
    assert with_dropout.dropout.to_dict() == dict(name="truncated_geometric", theta=0.5,
                                                  min_kept=1)
  with pytest.raises(ValueError, match="unknown preset 'demo_mean'"):
    unet_config.get_config("demo_mean")
  config = unet_config.get_config("demo")
  method = get_method(config)
  assert method.size_multiple == 2 ** (len(config.model.features) - 1) == 8
  assert not method.has_encoder
  config.model.features = ()
  with pytest.raises(ValueError, match="config.model.features"):
    get_method(config)


def test_smoke_training_with_dropout(tmp_path):
  from hemijax.training import loop

  config = smoke_training_config(unet_config, "smoke_dropout")
  config.train.num_steps = 3
  loop.train(config, tmp_path, progress=False)
  records = metrics_records(tmp_path)
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in train)
  assert any(r["modalities_kept"] < 4 for r in train)   # the dropout did drop
  assert [r["step"] for r in records if r["split"] == "val"] == [3]


def test_paper_presets_use_cross_entropy_alone():
  for preset in ("paper", "paper_dropout"):
    loss = unet_config.get_config(preset).loss
    assert (loss.ce_weight, loss.dice_weight) == (1.0, 0.0)
  assert unet_config.get_config("demo").loss.dice_weight == 1.0
