r"""Every-subset evaluation: shared per-modality encodings against independent forward passes.

  python benchmarks/bench_subsets.py --config configs/hemis.py:demo
  python benchmarks/bench_subsets.py --config configs/hemis.py:demo --3d   # 3D HeMIS, 64^3 windows

For one whole volume of the phantom's grid (2 mm MNI: 91 x 109 x 91, four modalities; random
values, random parameters: the work does not depend on them), times `hemijax.inference.sliding_window.
predict_probabilities` over all 15 non-empty subsets (a) as evaluate.py runs it, each window encoded
once per modality and every subset fused and decoded from those features, and (b) as 15
independent forward passes (`make_window_forward(share_encoder=False)`), alternating the two round
by round, and prints their ratio. For HeMIS the back ends hold most of the work (for the demo
network: 2 convolutions of 24 channels per modality against 1 of 48 -> 16 and a 16 -> 4 head), so
sharing them should cost about a third of 15 full passes.
"""
import argparse
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_config, time_interleaved  # noqa: E402
from hemijax.evaluation import subsets as evaluation
from hemijax.inference import sliding_window as inference  # noqa: E402
from hemijax.models import get_method  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/hemis.py:demo")
  parser.add_argument("--shape", default="91,109,91", help="volume size X,Y,Z")
  parser.add_argument("--3d", dest="three_d", action="store_true",
                      help="the config's network as a 3D model (patch 32^3) on 64^3 windows")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)

  config = load_config(args.config)
  roi = None
  if args.three_d:
    config.data.patch_size = (32, 32, 32)
    roi = (64, 64, 64)
  method = get_method(config)
  num_modalities = len(method.modalities)
  if not method.has_encoder:
    sys.exit(f"{config.method}: the model has no separate encoder, so there is nothing to share")
  shape = tuple(int(s) for s in args.shape.split(","))
  volume = np.random.default_rng(0).normal(size=shape + (num_modalities,)).astype(np.float32)
  example = np.zeros((1,) + tuple(config.data.patch_size) + (num_modalities,), np.float32)
  variables = method.init(jax.random.key(0), example, np.ones((1, num_modalities), bool))
  masks = inference.subset_masks(evaluation.all_subsets(method.modalities), method.modalities)

  def run(share):
    forward = inference.make_window_forward(method, variables, share_encoder=share)
    return lambda: inference.predict_probabilities(
        method, variables, volume, masks, inference.WindowSettings(
            roi=roi, overlap=config.eval.overlap, batch_size=config.eval.sw_batch_size),
        forward=forward)

  shared, independent = run(True), run(False)
  np.testing.assert_allclose(shared(), independent(), atol=1e-4)  # also the warm-up (compiles)
  cases = {"shared encodings": (shared, ()), "15 independent forwards": (independent, ())}
  timings = time_interleaved(cases, warmup=0, repeats=args.repeats,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
  ratio = timings["shared encodings"].median / timings["15 independent forwards"].median
  kind = f"3D, {roi} windows" if roi else f"{method.spatial_dims}D"
  print(f"# bench_subsets {args.config} ({kind}), volume {shape} x {num_modalities}, "
        f"{len(masks)} subsets, {args.repeats} rounds, jax {jax.__version__} on "
        f"{jax.default_backend()}")
  print("| evaluation of every subset | median s | min s | CPU s |")
  print("|---|---:|---:|---:|")
  for name, t in timings.items():
    print(f"| {name} | {t.median:.2f} | {t.min:.2f} | {t.cpu_median:.2f} |")
  print(f"shared / independent: {ratio:.2f}x")


if __name__ == "__main__":
  main()
