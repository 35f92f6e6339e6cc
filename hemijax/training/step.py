"""The train step: one jitted function over a plain pytree state, with donated buffers.

state = {"step": int32, "params": ..., "model_state": ..., "opt_state": ...}. Randomness is
`fold_in(key(seed), step)`, so a resumed run draws exactly what an uninterrupted one would.
A non-finite loss leaves the state unchanged (the loop then stops), so no NaN is ever saved.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def init_state(method, optimizer, key, example_batch) -> dict:
  variables = method.init(key, example_batch["image"], example_batch["modality_mask"])
  params = variables.pop("params")
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "model_state": variables,
      "opt_state": optimizer.init(params),
  }


def make_train_step(loss_fn, optimizer, seed: int, augment=None):
  """`augment(key, batch) -> batch` (hemijax.nn.augment.make_augment), if given, runs first."""
  base_key = jax.random.key(seed)

  def train_step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    if augment is not None:
      # Its own stream: the loss keeps `key`, so a run without augmentation draws what it drew.
      batch = augment(jax.random.fold_in(key, 1), batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, model_state)), grads = grad_fn(
        state["params"], state["model_state"], batch, key, state["step"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new = {"step": state["step"] + 1, "params": params, "model_state": model_state,
           "opt_state": opt_state}
    # Keep the last good state if anything went non-finite.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), finite=finite)
    return new, metrics

  return train_step
