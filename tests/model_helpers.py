"""Helpers the model tests share (imported as `model_helpers`; pytest puts tests/ on sys.path)."""
import jax
import jax.numpy as jnp
import numpy as np


def quick_init(model, *args, seed=0, **kwargs):
  """`model.init`'s variables with NumPy-drawn weights: no jax.random programs to compile (slow on
  CPU); batch statistics and scales/shifts start as flax's do."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("mean",) or name.startswith("bias"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name in ("var", "scale"):
      return jnp.ones(leaf.shape, leaf.dtype)
    std = np.sqrt(2.0 / np.prod(leaf.shape[-4:-1]))
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def jit_apply(model):
  return jax.jit(model.apply, static_argnames=("train", "method", "mutable"))
