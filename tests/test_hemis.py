"""HeMIS: one compiled function for every subset; a subset equals a model without the others."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
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

  for subset in subsets(M):
    mask = np.zeros((2, M), bool)
    mask[:, list(subset)] = True
    jax.block_until_ready(forward(variables, image, jnp.asarray(mask)))
  assert len(subsets(M)) == 15
  assert len(traces) == 1


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
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, image, mask)))(variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_boundary_validation_errors():
  with pytest.raises(ValueError, match="empty modality set"):
    base.check_modality_mask(np.array([[True, False], [False, False]]), 2)
  with pytest.raises(ValueError, match="shape"):
    base.check_modality_mask(np.ones((2, 3), bool), 2)
  with pytest.raises(ValueError, match="shape"):
    base.check_image(np.ones((2, 8, 8, 3)), 4, 2)
