"""Helpers the model tests share (imported as `model_helpers`; pytest puts tests/ on sys.path)."""
import json
import pathlib

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


PHANTOM_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "hemijax"


def smoke_training_config(config_module, preset="smoke", conv_impl="xla"):
  """A config file's preset for a short training run on the shared phantom cache; XLA's
  convolution compiles fastest (the lowerings themselves are compared in test_layers)."""
  config = config_module.get_config(preset)
  config.data.cache_dir = str(PHANTOM_CACHE)
  if conv_impl is not None:
    config.model.conv_impl = conv_impl
  return config


def metrics_records(workdir) -> list[dict]:
  """The lines of a run's metrics.jsonl."""
  return [json.loads(line)
          for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def write_run(workdir, config, variables, step=5):
  """A workdir as the training loop leaves it: config.json, an orbax checkpoint, best.json."""
  from hemijax.training import checkpoints
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints.save_config(workdir, config)
  variables = dict(variables)
  params = variables.pop("params")
  manager = checkpoints.make_manager(workdir)
  checkpoints.save(manager, step, {"step": jnp.int32(step), "params": params,
                                   "model_state": variables, "opt_state": ()})
  manager.close()
  checkpoints.record_best(workdir, step, 0.5)
  return workdir
