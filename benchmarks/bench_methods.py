r"""Each method's demo config with hemijax's convolution against XLA's (= flax.linen.Conv), in one run.

  python benchmarks/bench_methods.py                       # every method's demo config
  python benchmarks/bench_methods.py --configs configs/hemis.py:demo,configs/joint.py:demo

For every config, builds the method twice, `config.model.conv_impl` = "auto" ("planes" on CPU) and
"xla" (`lax.conv_general_dilated`, what `flax.linen.Conv` lowers to), and times, alternating the
two round by round: the jitted training step of every training stage on a batch of the stage's
own sampler, and inference on one whole validation volume with all modalities (2D models slice by
slice, 3D by the config's sliding window). Prints median seconds, the speed-up, voxels/s
and XLA's buffer assignment of the training step. The phantom data of each config is generated
(cached) if it is not there yet.
"""
import argparse
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compiled_memory, load_config, time_interleaved  # noqa: E402
from hemijax.inference import sliding_window as inference  # noqa: E402
from hemijax.data import datasets  # noqa: E402
from hemijax.models import get_method  # noqa: E402
from hemijax.training import stages as stages_lib, step as step_lib  # noqa: E402

DEMOS = ("configs/hemis.py:demo", "configs/unet.py:demo_dropout", "configs/mlp_impute.py:demo",
         "configs/urn.py:demo", "configs/pimms.py:demo_soft", "configs/disentangle.py:demo",
         "configs/joint.py:demo")
IMPLS = ("auto", "xla")


def build_cases(spec: str):
  """{stage: (train cases, XLA buffer bytes, voxels per batch)}, inference cases, volume voxels."""
  stages, infer_cases = {}, {}
  for impl in IMPLS:
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
      cases, memory, _ = stages.setdefault(stage.name, ({}, {}, _image_voxels(batch)))
      cases[impl] = (train_step, (state, batch))
      memory[impl] = compiled_memory(train_step, state, batch)["peak"]

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
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr, flush=True)
  lines = ["| config, stage | train step: hemijax (auto) s | XLA conv s | speed-up | voxels/s (auto) "
           "| XLA buffers auto / xla | inference, one volume: auto s | XLA conv s | speed-up |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for spec in args.configs.split(","):
    log(f"{spec}")
    stages, infer_cases, volume_voxels = build_cases(spec)
    infer = time_interleaved(infer_cases, repeats=args.repeats, log=log)
    i_auto, i_xla = infer["auto"].median, infer["xla"].median
    for i, (stage, (cases, memory, voxels)) in enumerate(stages.items()):
      train = time_interleaved(cases, repeats=args.repeats, log=log)
      t_auto, t_xla = train["auto"].median, train["xla"].median
      inference_cells = (f"{i_auto:.2f} | {i_xla:.2f} | {i_xla / i_auto:.2f}x" if i == 0
                         else " | | ")
      lines.append(
          f"| `{spec}` {stage} | {t_auto:.3f} | {t_xla:.3f} | {t_xla / t_auto:.2f}x | "
          f"{voxels / t_auto:,.0f} | {memory['auto'] / 2**20:,.0f} / "
          f"{memory['xla'] / 2**20:,.0f} MiB | {inference_cells} |")
  print(f"# bench_methods, jax {jax.__version__} on {jax.default_backend()}; medians of "
        f"{args.repeats} rounds, cases alternated; \"auto\" resolves to "
        f"{'planes' if jax.default_backend() == 'cpu' else 'xla'} here")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
