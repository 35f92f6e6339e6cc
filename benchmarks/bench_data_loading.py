r"""Data loading against step time, in one run: is the training step kept fed?

  python benchmarks/bench_data_loading.py --config configs/hemis.py:demo [--steps 30]

Times, for the config's dataset and sampler, (a) building one batch on the host (cached memory
maps), (b) one jitted train step, and prints their ratio. The loop samples on a background thread,
so loading is hidden when the ratio is well under 1; the target is < 10 %.
"""
import argparse
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_config  # noqa: E402
from hemijax.data import datasets, sampling  # noqa: E402
from hemijax.models import get_method  # noqa: E402
from hemijax.training import stages as stages_lib, step as step_lib  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/hemis.py:demo")
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  config = load_config(args.config)
  method = get_method(config)
  volumes = datasets.load_split(config, "train")
  make_batch = sampling.make_patch_batches(config, volumes)
  stage = method.training_stages(config)[0]
  optimizer = stages_lib.stage_optimizer(stage)
  state = step_lib.init_state(method, optimizer, jax.random.key(0), make_batch(0))
  train_step = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, 0), donate_argnums=0)
  state, _ = train_step(state, make_batch(0))  # compile
  jax.block_until_ready(state)

  load_times, step_times = [], []
  for s in range(1, args.steps + 1):
    t0 = time.perf_counter()
    batch = make_batch(s)
    t1 = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    t2 = time.perf_counter()
    load_times.append(t1 - t0)
    step_times.append(t2 - t1)
  load, step = np.median(load_times), np.median(step_times)
  print(f"config {args.config}: batch {config.data.batch_size} x {tuple(config.data.patch_size)}")
  print("| batch sampling (host) | train step (jitted) | loading / step |")
  print("|---|---|---|")
  print(f"| {load * 1e3:.1f} ms | {step * 1e3:.1f} ms | {100 * load / step:.1f} % |")


if __name__ == "__main__":
  main()
