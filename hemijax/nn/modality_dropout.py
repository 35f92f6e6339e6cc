"""Modality-availability samplers: pure functions of a `jax.random` key.

Each sampler takes `available (B, M) bool` (what the subject's files really hold) and returns a mask
that is a subset of it. A subject with at least one available modality always keeps at least one
(or `min_kept`, where it has that many), so no sampler produces an empty set.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Sampler = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (key, available, step) -> mask


def drop_random(key, available, num_drop):
  """Drops `num_drop[b]` modalities chosen uniformly among the available ones of subject b."""
  available = jnp.asarray(available, bool)
  scores = jax.random.uniform(key, available.shape)
  # Unavailable slots sort last, so the first `num_drop` ranks are a uniform draw of available ones.
  scores = jnp.where(available, scores, 2.0)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return available & (ranks >= num_drop[:, None])


def _num_available(available):
  return jnp.sum(available, axis=-1, dtype=jnp.int32)


def hemis_curriculum(key, available, step, *, warmup_steps: int, drop_count_probs: Sequence[float]):
  """HeMIS pseudo-curriculum: all modalities during warm-up, then drop k with P(k) = probs[k].

  `drop_count_probs[k]` is the probability of dropping k modalities (the paper favours 0 or 1);
  k is capped so that at least one available modality stays.
  """
  probs = jnp.asarray(drop_count_probs, jnp.float32)
  count_key, which_key = jax.random.split(key)
  k = jax.random.choice(count_key, probs.shape[0], shape=available.shape[:1], p=probs / probs.sum())
  k = jnp.minimum(k, jnp.maximum(_num_available(available) - 1, 0))
  dropped = drop_random(which_key, available, k)
  return jnp.where(step < warmup_steps, available, dropped)


def truncated_geometric_probs(theta: float, max_dropped: int):
  """P(k dropped) = (1-θ) θ^k / (1-θ^(Nmax+1)), k = 0..Nmax (NumPy, for checks and docs)."""
  k = np.arange(max_dropped + 1)
  return (1 - theta) * theta**k / (1 - theta**(max_dropped + 1))


def truncated_geometric(key, available, step=0, *, theta: float, min_kept: int = 1):
  """Modality dropout with a truncated geometric number of dropped modalities, then uniform which.

  Nmax = (available count) - min_kept per subject; subjects with fewer than `min_kept` keep all.
  """
  del step
  num_slots = available.shape[-1]
  max_dropped = jnp.maximum(_num_available(available) - min_kept, 0)  # (B,)
  k = jnp.arange(num_slots + 1)
  logits = jnp.where(k[None, :] <= max_dropped[:, None], k * jnp.log(theta), -jnp.inf)
  count_key, which_key = jax.random.split(key)
  num_drop = jax.random.categorical(count_key, logits, axis=-1)
  return drop_random(which_key, available, num_drop)


def bernoulli(key, available, step=0, *, p: float = 0.5):
  """Drops each available modality independently with probability p, keeping at least one."""
  del step
  drop_key, keep_key = jax.random.split(key)
  kept = available & ~jax.random.bernoulli(drop_key, p, available.shape)
  # If all were dropped, rescue one available modality chosen uniformly.
  rescue = drop_random(keep_key, available, _num_available(available) - 1)
  return jnp.where(jnp.any(kept, axis=-1, keepdims=True), kept, rescue)


def no_dropout(key, available, step=0):
  del key, step
  return jnp.asarray(available, bool)


def make_sampler(cfg) -> Sampler:
  """Builds `sampler(key, available, step)` from a config dict {'name': ..., params}."""
  name = cfg["name"]
  params = {k: v for k, v in dict(cfg).items() if k != "name"}
  samplers = {
      "none": no_dropout,
      "curriculum": hemis_curriculum,
      "truncated_geometric": truncated_geometric,
      "bernoulli": bernoulli,
  }
  if name not in samplers:
    raise ValueError(f"unknown dropout sampler {name!r}; choose one of {sorted(samplers)}")
  if name == "curriculum":
    params["drop_count_probs"] = tuple(params["drop_count_probs"])
  return functools.partial(samplers[name], **params)
