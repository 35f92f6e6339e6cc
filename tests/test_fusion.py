"""Property tests of the masked fusion core against NumPy on the selected subset."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from hemijax.nn import fusion

jax.config.update("jax_enable_x64", False)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def stacks(draw, min_available=0):
  """Features (M, K) with a mask (M,), and garbage (NaN/inf/huge) in the masked slots."""
  m = draw(st.integers(1, 6))
  k = draw(st.integers(1, 4))
  x = draw(hnp.arrays(np.float32, (m, k), elements=st.floats(-100, 100, width=32)))
  mask = draw(hnp.arrays(bool, (m,)))
  if mask.sum() < min_available:
    mask[:min_available] = True
  garbage = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
  x = np.where(mask[:, None], x, garbage).astype(np.float32)
  return x, mask


def reference_mean(x, mask):
  sel = x[mask]
  return sel.mean(0) if len(sel) else np.zeros(x.shape[1:], np.float32)


def reference_variance(x, mask):
  sel = x[mask].astype(np.float64)
  return sel.var(0, ddof=1) if len(sel) >= 2 else np.zeros(x.shape[1:])


def check_mean_and_variance(mean_fn, var_fn, x, mask):
  mask_b = mask[:, None]
  np.testing.assert_allclose(mean_fn(jnp.asarray(x), mask_b), reference_mean(x, mask),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(var_fn(jnp.asarray(x), mask_b), reference_variance(x, mask),
                             rtol=1e-4, atol=1e-2)


@SETTINGS
@given(stacks())
def test_matches_numpy_on_selected_subset(data):
  x, mask = data
  check_mean_and_variance(fusion.masked_mean, fusion.masked_variance, x, mask)


@SETTINGS
@given(stacks(), st.randoms(use_true_random=False))
def test_invariant_to_permuting_modalities(data, rnd):
  x, mask = data
  perm = np.arange(len(mask))
  rnd.shuffle(perm)
  for fn in (fusion.masked_mean, fusion.masked_variance, fusion.masked_max):
    a = fn(jnp.asarray(x), mask[:, None])
    b = fn(jnp.asarray(x[perm]), mask[perm][:, None])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@SETTINGS
@given(stacks(), st.integers(1, 3))
def test_invariant_to_masked_garbage_slots(data, extra):
  x, mask = data
  garbage = np.full((extra,) + x.shape[1:], np.nan, np.float32)
  x2 = np.concatenate([x, garbage])
  mask2 = np.concatenate([mask, np.zeros(extra, bool)])
  for fn in (fusion.masked_mean, fusion.masked_variance, fusion.masked_max, fusion.masked_f_mean):
    np.testing.assert_allclose(fn(jnp.asarray(x), mask[:, None]),
                               fn(jnp.asarray(x2), mask2[:, None]), rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)  # each example compiles a gradient: 40 took 23 s
@given(stacks(min_available=1))
def test_gradients_finite_and_zero_on_masked_slots(data):
  x, mask = data
  mask_b = jnp.asarray(mask[:, None])

  def objective(v):
    fused = (fusion.masked_mean(v, mask_b) + fusion.masked_variance(v, mask_b)
             + fusion.masked_max(v, mask_b)
             + fusion.masked_f_mean(v / 100, mask_b, jnp.exp, jnp.log))
    return jnp.sum(fused)

  grad = jax.grad(objective)(jnp.asarray(x))
  assert np.all(np.isfinite(grad))
  assert np.all(grad[~mask] == 0)


def test_one_available_gives_zero_variance_and_finite_gradient():
  x = jnp.array([[3.0], [jnp.nan]])
  mask = jnp.array([[True], [False]])
  assert fusion.masked_variance(x, mask)[0] == 0.0
  assert fusion.masked_mean(x, mask)[0] == 3.0
  g = jax.grad(lambda v: fusion.masked_variance(v, mask).sum() + fusion.masked_mean(v, mask).sum())(x)
  np.testing.assert_array_equal(g, [[1.0], [0.0]])


def test_none_available_returns_zero_without_nan():
  x = jnp.array([[jnp.nan], [jnp.inf]])
  mask = jnp.zeros((2, 1), bool)
  for fn in (fusion.masked_mean, fusion.masked_variance, fusion.masked_max, fusion.masked_f_mean):
    out = jax.jit(fn)(x, mask)
    np.testing.assert_array_equal(out, [0.0])
    assert np.all(np.isfinite(jax.grad(lambda v: fn(v, mask).sum())(x)))


def test_f_mean_exp_is_log_mean_exp():
  x = np.array([[0.5, -1.0], [2.0, 0.0], [9.0, 9.0]], np.float32)
  mask = np.array([True, True, False])[:, None]
  expected = np.log(np.exp(x[:2]).mean(0))
  np.testing.assert_allclose(fusion.masked_f_mean(x, mask, jnp.exp, jnp.log), expected, rtol=1e-6)


def test_moments_concatenates_mean_and_variance_on_channels():
  x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)  # (B, M, S, C)
  mask = fusion.expand_modality_mask(jnp.array([[1, 0, 1], [1, 1, 1]], bool), x.ndim)
  out = fusion.moments(x, mask, axis=1)
  assert out.shape == (2, 4, 4)
  np.testing.assert_allclose(out[..., :2], fusion.masked_mean(x, mask, axis=1))
  np.testing.assert_allclose(out[..., 2:], fusion.masked_variance(x, mask, axis=1))


def test_wrong_mask_shape_is_a_value_error():
  x = jnp.zeros((2, 4, 8))
  with pytest.raises(ValueError, match="does not broadcast"):
    fusion.masked_mean(x, jnp.ones((3, 4, 1), bool))
  with pytest.raises(ValueError, match="boolean"):
    fusion.masked_variance(x, jnp.ones((2, 4, 1)))


# The property tests must be able to fail: run the same check on deliberately wrong fusions.
def zero_filling_mean(x, mask):
  return jnp.mean(jnp.where(mask, x, 0), axis=0)


def biased_variance(x, mask):
  mask = jnp.broadcast_to(mask, x.shape)
  n = jnp.maximum(mask.sum(0), 1)
  mean = jnp.where(mask, x, 0).sum(0) / n
  return jnp.where(mask, (x - mean) ** 2, 0).sum(0) / n


@pytest.mark.parametrize("wrong", ["zero_filling", "biased"])
def test_property_check_catches_wrong_implementations(wrong):
  x = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]], np.float32)
  mask = np.array([True, True, False])
  mean_fn = zero_filling_mean if wrong == "zero_filling" else fusion.masked_mean
  var_fn = biased_variance if wrong == "biased" else fusion.masked_variance
  with pytest.raises(AssertionError):
    check_mean_and_variance(mean_fn, var_fn, x, mask)


def _summed_reference(x, mask, axis):
  """The masked mean and (n-1) variance written with plain `jnp.sum` reductions."""
  w = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  n = jnp.sum(w, axis=axis, keepdims=True)
  mean = jnp.sum(w * x, axis=axis, keepdims=True) / jnp.maximum(n, 1)
  var = jnp.sum(w * (x - mean) ** 2, axis=axis, keepdims=True) / jnp.maximum(n - 1, 1)
  return jnp.concatenate([mean, jnp.where(n > 1, var, 0)], axis=-1).squeeze(axis)


@pytest.mark.parametrize("slots, axis", [(4, 1), (4, -4), (40, 1)])
def test_moments_and_gradient_match_plain_reductions(slots, axis):
  # The modality axis is unrolled up to fusion._UNROLL_SLOTS slots (40 takes jnp.sum's path);
  # values and gradients must not depend on which.
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (2, slots, 3, 4, 5))
  mask = jnp.arange(slots)[None, :, None, None, None] % 3 != 1
  weights = jax.random.normal(keys[1], (2, 3, 4, 10))
  ours = lambda v: jnp.sum(fusion.moments(v, mask, axis=axis) * weights)
  plain = lambda v: jnp.sum(_summed_reference(v, mask, axis) * weights)
  np.testing.assert_allclose(ours(x), plain(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-4, atol=1e-6)


def test_modality_axis_is_not_a_reduction_in_the_compiled_step():
  # XLA:CPU runs a reduction over the modality axis of (B, M, *sp, C) features ~40x slower than
  # the slices' elementwise sum (docs/performance.md), forward and gradient alike.
  x = jnp.ones((1, 4, 8, 8, 8, 6))
  mask = jnp.ones((1, 4, 1, 1, 1, 1), bool)
  fused = lambda v: jnp.sum(fusion.moments(v, mask, axis=1) ** 2)
  for f in (fused, jax.grad(fused)):
    hlo = jax.jit(f).lower(x).as_text()
    reductions = [line for line in hlo.splitlines()
                  if "stablehlo.reduce" in line and "dimensions = [1]" in line]
    assert not reductions, reductions
