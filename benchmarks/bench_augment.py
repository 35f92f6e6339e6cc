r"""The cost of data augmentation inside the jitted train step, in one run.

  python benchmarks/bench_augment.py                                  # HeMIS demo
  python benchmarks/bench_augment.py --config configs/unet.py:demo --repeats 30

Builds the config's first training stage on a batch of its own sampler and times, alternating the
two round by round, the jitted train step without augmentation and with the config's
`config.augment` (forced on, so a `smoke` config can be measured too); also the jitted
augmentation alone. Prints medians and the overhead ratio; the target is <= 10 % on CPU.
"""
import argparse
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_config, time_interleaved, time_jitted  # noqa: E402
from hemijax.data import datasets  # noqa: E402
from hemijax.models import get_method  # noqa: E402
from hemijax.nn import augment as augment_lib  # noqa: E402
from hemijax.training import stages as stages_lib, step as step_lib  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/hemis.py:demo")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr, flush=True)

  config = load_config(args.config)
  augment_config = (config.augment.copy_and_resolve_references() if "augment" in config
                    else augment_lib.default_config())
  augment_config.enabled = True
  augment = augment_lib.make_augment(augment_config)

  method = get_method(config)
  stage = method.training_stages(config)[0]
  make_batch = stages_lib.stage_batches(stage, config,
                                        lambda split: datasets.load_split(config, split))
  batch = jax.device_put(make_batch(0))
  optimizer = stages_lib.stage_optimizer(stage)
  state = step_lib.init_state(method, optimizer, jax.random.key(0), batch)
  plain = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, 0))
  augmented = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, 0, augment=augment))
  timings = time_interleaved({"plain": (plain, (state, batch)),
                              "augmented": (augmented, (state, batch))},
                             warmup=args.warmup, repeats=args.repeats, log=log)
  alone = time_jitted(jax.jit(augment), jax.random.key(0), batch, warmup=args.warmup,
                      repeats=args.repeats)

  t_plain, t_aug = timings["plain"].median, timings["augmented"].median
  shapes = {k: tuple(v.shape) for k, v in batch.items()} if "image" in batch else "nested"
  print(f"# bench_augment `{args.config}` stage {stage.name}, jax {jax.__version__} on "
        f"{jax.default_backend()}; medians of {args.repeats} rounds, cases alternated")
  print(f"batch: {shapes}")
  print("| train step, no augmentation | with augmentation | overhead | augmentation alone |")
  print("|---:|---:|---:|---:|")
  print(f"| {t_plain * 1e3:.1f} ms | {t_aug * 1e3:.1f} ms | {100 * (t_aug / t_plain - 1):+.1f} % "
        f"| {alone.median * 1e3:.1f} ms |")


if __name__ == "__main__":
  main()
