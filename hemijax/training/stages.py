"""Which stage, and which optimiser, at global step s: the stages of a method laid end to end.

Stages run in order and share the parameters; each starts a fresh optimiser state. Steps are
counted globally (stage 2 of a 100 + 50 step run covers steps 100..149), so resuming works.
"""
from __future__ import annotations

import jax
import optax

from hemijax.data import sampling
from hemijax.training import optim


def stage_bounds(stages) -> list[tuple[int, int]]:
  """Global [start, end) steps of each stage."""
  bounds, start = [], 0
  for stage in stages:
    bounds.append((start, start + stage.num_steps))
    start += stage.num_steps
  return bounds


def stage_of_checkpoint(stages, step: int) -> int:
  """Index of the stage that wrote a checkpoint at `step` (a stage's last step belongs to it)."""
  for i, (begin, end) in enumerate(stage_bounds(stages)):
    if step <= end and (step > begin or i == 0):
      return i
  return len(stages) - 1


def stage_optimizer(stage) -> optax.GradientTransformation:
  """The stage's optimiser; parameters outside `stage.trainable` get zero updates (frozen)."""
  opt = optim.make_optimizer(stage.optimizer, stage.num_steps)
  if stage.trainable is None:
    return opt
  trainable = set(stage.trainable)
  labels = lambda params: {k: jax.tree.map(lambda _: "train" if k in trainable else "freeze", v)
                           for k, v in params.items()}
  return optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)


def stage_batches(stage, config, load_split, shares=None):
  """`step -> host batch` of a stage: its own batch maker or the config's patch sampler. With
  `shares` (hemijax.training.sharding.BatchShares), the rows of the batch this process feeds."""
  if stage.make_batches is not None:
    make_batch = stage.make_batches(config, load_split)
    offset = stage.step_offset
    whole = (lambda step: make_batch(step - offset)) if offset else make_batch
    if shares is None:
      return whole
    # A method's own batch maker draws the whole batch; each process keeps its rows of it.
    return lambda step: shares.own_rows(whole(step), whole=True)
  if shares is None:
    return sampling.make_patch_batches(config, load_split("train"), step_offset=stage.step_offset)
  make_batch = sampling.make_patch_batches(config, load_split("train"),
                                           step_offset=stage.step_offset, shares=shares.indices,
                                           num_shares=shares.count)
  return lambda step: shares.own_rows(make_batch(step))
