"""Modality-availability samplers: subsets of what is available, never empty, right statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemijax.nn import modality_dropout as dropout

AVAILABLE = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]] * 256, bool)

SAMPLERS = {
    "curriculum": dropout.make_sampler(dict(name="curriculum", warmup_steps=10,
                                            drop_count_probs=(0.1, 0.2, 0.3, 0.4))),
    "geometric": dropout.make_sampler(dict(name="truncated_geometric", theta=0.5, min_kept=1)),
    "geometric_keep2": dropout.make_sampler(dict(name="truncated_geometric", theta=0.8, min_kept=2)),
    "bernoulli": dropout.make_sampler(dict(name="bernoulli", p=0.5)),
    "none": dropout.make_sampler(dict(name="none")),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_subset_of_available_and_never_empty(name):
  sampler = jax.jit(SAMPLERS[name])
  for seed in range(5):
    mask = np.asarray(sampler(jax.random.key(seed), jnp.asarray(AVAILABLE), 100))
    assert not np.any(mask & ~AVAILABLE), "a modality missing from the files became available"
    assert np.all(mask.any(-1)), "empty modality set"


def test_min_kept_two_keeps_two_where_possible():
  mask = np.asarray(SAMPLERS["geometric_keep2"](jax.random.key(0), jnp.asarray(AVAILABLE)))
  counts, avail = mask.sum(-1), AVAILABLE.sum(-1)
  assert np.all(counts >= np.minimum(avail, 2))


def test_truncated_geometric_count_distribution():
  theta = 0.5
  available = jnp.ones((20000, 4), bool)
  mask = dropout.truncated_geometric(jax.random.key(1), available, theta=theta, min_kept=1)
  dropped = 4 - np.asarray(mask).sum(-1)
  observed = np.bincount(dropped, minlength=4) / len(dropped)
  expected = dropout.truncated_geometric_probs(theta, 3)
  np.testing.assert_allclose(expected.sum(), 1.0)
  np.testing.assert_allclose(observed, expected, atol=0.015)
  # Which modalities are dropped is uniform.
  np.testing.assert_allclose(np.asarray(mask).mean(0), np.asarray(mask).mean(), atol=0.02)


def test_curriculum_warmup_then_drop_count_distribution():
  available = jnp.ones((20000, 4), bool)
  sampler = SAMPLERS["curriculum"]
  warm = sampler(jax.random.key(2), available, 3)
  assert np.all(np.asarray(warm))
  after = np.asarray(sampler(jax.random.key(2), available, 10))
  observed = np.bincount(4 - after.sum(-1), minlength=4) / len(after)
  # k = 3 of 4 is allowed (one kept); probabilities as configured.
  np.testing.assert_allclose(observed, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_bernoulli_marginal_drop_rate():
  available = jnp.ones((20000, 4), bool)
  mask = np.asarray(dropout.bernoulli(jax.random.key(3), available, p=0.5))
  # P(kept) = 0.5 + P(all dropped) * 1/4 = 0.5 + 1/16 * 1/4.
  np.testing.assert_allclose(mask.mean(), 0.5 + 1 / 64, atol=0.01)


def test_deterministic_given_key():
  a = SAMPLERS["bernoulli"](jax.random.key(7), jnp.asarray(AVAILABLE))
  b = SAMPLERS["bernoulli"](jax.random.key(7), jnp.asarray(AVAILABLE))
  np.testing.assert_array_equal(a, b)


def test_unknown_sampler_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown dropout sampler 'dropall'"):
    dropout.make_sampler(dict(name="dropall"))
