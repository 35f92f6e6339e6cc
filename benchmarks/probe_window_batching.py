r"""3D sliding-window evaluation of one volume on the phantom's grid (91 x 109 x 91, random values
and parameters), all 15 subsets from shared encodings, with the windows of a call run one at a
time inside it (hemijax's rule for 3D models on CPU) against batched; outputs compared, then
timed alternated.

  python benchmarks/probe_window_batching.py [--config configs/disentangle.py:demo] [--repeats 2]

Kept as the record of a setting tried and not changed (docs/performance.md, "Tried and not
adopted").
"""
import argparse
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import load_config  # noqa: E402
from hemijax.evaluation import subsets as evaluation  # noqa: E402
from hemijax.inference import sliding_window as inference  # noqa: E402
from hemijax.models import get_method  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/disentangle.py:demo")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  config = load_config(args.config)
  method = get_method(config)
  modalities = len(method.modalities)
  volume = np.random.default_rng(0).normal(size=(91, 109, 91, modalities)).astype(np.float32)
  example = np.zeros((1,) + tuple(config.data.patch_size) + (modalities,), np.float32)
  variables = method.init(jax.random.key(0), example, np.ones((1, modalities), bool))
  masks = inference.subset_masks(evaluation.all_subsets(method.modalities), method.modalities)
  roi = tuple(config.eval.roi_size or config.data.patch_size)
  cases = {}
  for name, one_at_a_time, batch in (("one at a time, 4 per call", True, 4),
                                     ("batched, 4 per call", False, 4),
                                     ("batched, 8 per call", False, 8)):
    forward = inference.make_window_forward(method, variables, one_window_at_a_time=one_at_a_time)
    settings = inference.WindowSettings(roi=roi, overlap=config.eval.overlap, batch_size=batch)
    run = lambda forward=forward, settings=settings: inference.predict_probabilities(
        method, variables, volume, masks, settings, forward=forward)
    cases[name] = (run, run())  # the first call compiles
  reference = next(iter(cases.values()))[1]
  for name, (_, probabilities) in cases.items():
    changed = int((probabilities.argmax(-1) != reference.argmax(-1)).sum())
    print(f"{name}: max |probability difference| {np.abs(probabilities - reference).max():.2e}, "
          f"{changed} voxel labels differ (of {reference[..., 0].size})")
  times = {name: [] for name in cases}
  for _ in range(args.repeats):
    for name, (run, _) in cases.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  print(f"# probe_window_batching {args.config}, jax {jax.__version__} on {jax.default_backend()}")
  for name, seconds in times.items():
    print(f"{name:28s} best {min(seconds):.1f} s  ({', '.join(f'{s:.1f}' for s in seconds)})")


if __name__ == "__main__":
  main()
