import jax
import jax.numpy as jnp
import numpy as np

from hemijax.training import optim


def test_poly_schedule_is_finite_to_the_end_under_jit():
  """(1 - s/n) ** 0.9 reaches exactly 0 at s = n and stays there; never NaN (optax's form was)."""
  schedule = jax.jit(optim.make_schedule({"learning_rate": 0.01, "schedule": "poly"}, 3))
  values = np.array([float(schedule(jnp.int32(s))) for s in range(6)])
  expected = 0.01 * np.clip(1 - np.arange(6) / 3, 0, 1) ** 0.9
  np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-9)
  assert values[3] == 0.0 and np.isfinite(values).all()
