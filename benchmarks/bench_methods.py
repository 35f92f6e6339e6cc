r"""Each method's demo config with hemijax's convolution against XLA's (= flax.linen.Conv), in one run.

  python benchmarks/bench_methods.py                       # every method's demo config
  python benchmarks/bench_methods.py --configs configs/hemis.py:demo,configs/joint.py:demo
  python benchmarks/bench_methods.py --impls auto,xla,planes,slots   # auto against each lowering

For every config, builds the method once per `config.model.conv_impl` in `--impls` (default
"auto", what every config uses, and "xla": `lax.conv_general_dilated`, what `flax.linen.Conv`
lowers to) and times, alternating them round by round: the jitted training step of every
training stage on a batch of the stage's own sampler, and inference on one whole validation
volume with all modalities (2D models slice by slice, 3D by the config's sliding window). Prints median seconds, the speed-up, voxels/s
XLA's FLOP count of the training step (its cost analysis) with the rate achieved, and XLA's buffer
assignment of the training step. The phantom data of each config is generated
(cached) if it is not there yet.
"""
import argparse
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (executable_flops, executable_memory, load_config,  # noqa: E402
                               time_interleaved)
from hemijax import runtime  # noqa: E402
from hemijax.inference import sliding_window as inference  # noqa: E402
from hemijax.data import datasets  # noqa: E402
from hemijax.models import get_method  # noqa: E402
from hemijax.nn.conv import IMPLS as IMPLS_ALLOWED, resolve_impl  # noqa: E402
from hemijax.training import stages as stages_lib, step as step_lib  # noqa: E402

DEMOS = ("configs/hemis.py:demo", "configs/unet.py:demo_dropout", "configs/mlp_impute.py:demo",
         "configs/urn.py:demo", "configs/pimms.py:demo_soft", "configs/disentangle.py:demo",
         "configs/joint.py:demo")
IMPLS = ("auto", "xla")


def build_cases(spec: str, impls=IMPLS):
  """{stage: (train cases, XLA buffer bytes, voxels per batch, XLA FLOPs per step)}, inference
  cases, volume voxels."""
  stages, infer_cases = {}, {}
  for impl in impls:
    config = load_config(spec)
    config.model.conv_impl = impl
    method = get_method(config)
    split_cache = {}

    def load_split(split, config=config):
      if split not in split_cache:
        split_cache[split] = datasets.load_split(config, split)
      return split_cache[split]

    stages_of_method = method.training_stages(config)
    for stage, (begin, _) in zip(stages_of_method, stages_lib.stage_bounds(stages_of_method)):
      make_batch = stages_lib.stage_batches(stage, config, load_split)
      batch = jax.device_put(make_batch(begin))  # batch makers count global steps
      optimizer = stages_lib.stage_optimizer(stage)
      if stage is stages_of_method[0]:   # as the loop: initialised from the first stage's batch
        state = step_lib.init_state(method, optimizer, jax.random.key(0), batch)
      else:
        state = dict(state, opt_state=optimizer.init(state["params"]))
      train_step = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, 0))
      cases, memory, _, flops = stages.setdefault(stage.name,
                                                  ({}, {}, _image_voxels(batch), {}))
      cases[impl] = (train_step, (state, batch))
      compiled = train_step.lower(state, batch).compile()  # once for both analyses
      memory[impl] = executable_memory(compiled)["peak"]
      flops[impl] = executable_flops(compiled)

    volume = load_split("val")[0]
    variables = {"params": state["params"], **state["model_state"]}
    forward = inference.make_window_forward(method, variables)
    infer = lambda method=method, variables=variables, volume=volume, forward=forward, \
        config=config: inference.predict_probabilities(
            method, variables, volume.image, volume.available[None],
            inference.WindowSettings.from_config(config), forward=forward)
    infer_cases[impl] = (infer, ())
  return stages, infer_cases, int(np.prod(volume.image.shape[:3]))


def _image_voxels(batch) -> int:
  """Voxels of the batch's images or voxel samples (every such array of a nested batch)."""
  return sum(int(np.prod(x.shape[:-1])) for path, x in jax.tree_util.tree_leaves_with_path(batch)
             if any(k in jax.tree_util.keystr(path) for k in ("image", "voxels")))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(DEMOS))
  parser.add_argument("--impls", default=",".join(IMPLS),
                      help="conv_impl values; the first is compared with each of the others")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  # As the entry points do; HEMIJAX_MALLOC=default measures glibc's default.
  allocator = ("freed memory reused (hemijax.runtime)" if runtime.reuse_freed_memory()
               else "glibc default")
  impls = tuple(args.impls.split(","))
  bad = [i for i in impls if i not in IMPLS_ALLOWED]
  if len(impls) < 2 or bad:
    parser.error(f"--impls: want two or more of {IMPLS_ALLOWED}, got {args.impls!r}")
  first, others = impls[0], impls[1:]
  log = lambda m: print(m, file=sys.stderr, flush=True)
  train_cols = " | ".join(f"{i} s" for i in impls)
  ratio_cols = " | ".join(f"{first} speed-up over {o}" for o in others)
  lines = [f"| config, stage | train step: {train_cols} | {ratio_cols} | voxels/s ({first}) "
           f"| GFLOP per step, XLA's count ({first}) | GFLOP/s ({first}) "
           f"| XLA buffers {' / '.join(impls)} | inference, one volume: {train_cols} | "
           f"{ratio_cols} |",
           "|---|" + "---:|" * (2 * len(impls) + 2 * len(others) + 4)]
  for spec in args.configs.split(","):
    log(f"{spec}")
    stages, infer_cases, volume_voxels = build_cases(spec, impls)
    infer = time_interleaved(infer_cases, repeats=args.repeats, log=log)
    for i, (stage, (cases, memory, voxels, flops)) in enumerate(stages.items()):
      train = time_interleaved(cases, repeats=args.repeats, log=log)
      t = {k: train[k].median for k in impls}
      if i == 0:
        t_i = {k: infer[k].median for k in impls}
        inference_cells = (" | ".join(f"{t_i[k]:.2f}" for k in impls) + " | "
                           + " | ".join(f"{t_i[o] / t_i[first]:.2f}x" for o in others))
      else:
        inference_cells = " | ".join([""] * (len(impls) + len(others)))
      lines.append(
          f"| `{spec}` {stage} | " + " | ".join(f"{t[k]:.3f}" for k in impls) + " | "
          + " | ".join(f"{t[o] / t[first]:.2f}x" for o in others)
          + f" | {voxels / t[first]:,.0f} | {flops[first] / 1e9:.2f} | "
          + f"{flops[first] / t[first] / 1e9:.1f} | "
          + " / ".join(f"{memory[k] / 2**20:,.0f}" for k in impls)
          + f" MiB | {inference_cells} |")
  resolved = ", ".join(f"{nd}D layers {resolve_impl('auto', nd)}" for nd in (1, 2, 3))
  print(f"# bench_methods, jax {jax.__version__} on {jax.default_backend()}; medians of "
        f"{args.repeats} rounds, cases alternated; \"auto\" resolves to "
        f"{resolved} here; "
        f"allocator: {allocator}")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
