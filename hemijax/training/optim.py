"""optax optimisers and learning-rate schedules, as the papers used them, from a config dict."""
from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly", "inverse_time")


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  lr = cfg["learning_rate"]
  warmup = int(cfg.get("warmup_steps", 0) or 0)
  name = cfg.get("schedule", "constant")
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
  elif name == "poly":
    # (1 - step / max_steps) ** 0.9, the disentanglement paper's schedule. Written out rather than
    # optax.polynomial_schedule: under jit its base 1 - s * (1 / n) comes out slightly negative
    # at s = n, and a negative base to the power 0.9 is NaN.
    length, power = max(num_steps - warmup, 1), cfg.get("power", 0.9)
    main = lambda count: lr * jnp.clip(1.0 - count / length, 0.0, 1.0) ** power
  elif name == "inverse_time":
    # lr / (1 + decay_rate * t): Keras' SGD `decay` (the HeMIS paper's "decay constant"), a
    # learning-rate decay per update, not a weight decay. optax has no such schedule.
    # `start_step`: the updates already made before this optimiser (a later stage continues the
    # decay where the previous stage left it, as one Keras optimiser would).
    decay_rate = float(cfg.get("decay_rate", 0.0) or 0.0)
    start = int(cfg.get("start_step", 0) or 0)
    if decay_rate < 0:
      raise ValueError(f"config.optimizer.decay_rate: must be >= 0, got {decay_rate}")
    main = lambda count: lr / (1.0 + decay_rate * (count + start))
  else:
    raise ValueError(f"config.optimizer.schedule: unknown schedule {name!r}; choose one of {SCHEDULES}")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  name = cfg["name"]
  schedule = make_schedule(cfg, num_steps)
  decay = cfg.get("weight_decay", 0.0) or 0.0
  if name == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                    nesterov=cfg.get("nesterov", False))
    # L2 decay added to the gradient, as Caffe/Theano-era SGD did.
    return optax.chain(optax.add_decayed_weights(decay), opt) if decay else opt
  if name == "adam":
    opt = optax.adam(schedule)
    return optax.chain(optax.add_decayed_weights(decay), opt) if decay else opt
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=decay)
  raise ValueError(f"config.optimizer.name: unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
