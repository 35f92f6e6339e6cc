"""optax optimisers and learning-rate schedules, as the papers used them, from a config dict."""
from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly")


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  lr = cfg["learning_rate"]
  warmup = int(cfg.get("warmup_steps", 0) or 0)
  name = cfg.get("schedule", "constant")
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
  elif name == "poly":
    # (1 - step / max_steps) ** 0.9, the disentanglement paper's schedule.
    main = optax.polynomial_schedule(lr, 0.0, cfg.get("power", 0.9), max(num_steps - warmup, 1))
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
