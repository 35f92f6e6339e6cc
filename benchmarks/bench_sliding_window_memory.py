r"""Peak memory of sliding-window inference on a 4 x 160 x 192 x 160 volume.

  python benchmarks/bench_sliding_window_memory.py                 # predict: one subset
  python benchmarks/bench_sliding_window_memory.py --subsets 15    # evaluate: every subset

Runs `hemijax.inference.sliding_window.predict_probabilities` with the HeMIS-3D network of issue 9 (4 back ends of
conv 1->48, conv 48->48, 2x2x2 max-pool; mean+variance fusion; conv 96->16, conv 16->4; kernels 3,
random parameters) on a random volume, windows of `--roi` (Gaussian blending, overlap 0.5, batches of
`--batch` windows), and prints the process's peak resident memory (`getrusage` max RSS: everything,
the JAX runtime included) with the time taken, and XLA's buffer assignment for one batch of windows.
Run it in a fresh process: max RSS never goes down.
"""
import argparse
import pathlib
import resource
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compiled_memory  # noqa: E402
from hemijax import runtime  # noqa: E402
from hemijax.evaluation import subsets as evaluation
from hemijax.inference import sliding_window as inference  # noqa: E402
from hemijax.models import get_method  # noqa: E402
from configs import hemis as hemis_config  # noqa: E402

GIB = 2**30


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="160,192,160")
  parser.add_argument("--roi", default="96,96,96")
  parser.add_argument("--batch", type=int, default=2, help="windows per forward call")
  parser.add_argument("--subsets", type=int, choices=(1, 15), default=1,
                      help="1: all modalities (predict.py); 15: every subset (evaluate.py)")
  args = parser.parse_args(argv)
  # As predict.py and evaluate.py do (glibc's default); HEMIJAX_MALLOC=reuse measures the setting.
  allocator = ("freed memory reused (hemijax.runtime)"
               if runtime.reuse_freed_memory(default=False) else "glibc default")
  shape = tuple(int(s) for s in args.shape.split(","))
  roi = tuple(int(s) for s in args.roi.split(","))

  config = hemis_config.get_config("demo")
  config.data.patch_size = (32, 32, 32)
  config.model.update(backend_features=(48, 48), backend_kernel=3, frontend_features=(16,),
                      frontend_kernel=3, final_kernel=3)
  method = get_method(config)
  modalities = method.modalities
  variables = method.init(jax.random.key(0), np.zeros((1, 8, 8, 8, len(modalities)), np.float32),
                          np.ones((1, len(modalities)), bool))
  subsets = evaluation.all_subsets(modalities)[-args.subsets:]  # the last one is all modalities
  masks = inference.subset_masks(subsets, modalities)
  volume = np.random.default_rng(0).normal(size=shape + (len(modalities),)).astype(np.float32)
  rss_before = max_rss_bytes()

  forward = inference.make_window_forward(method, variables)
  windows = np.zeros((args.batch,) + roi + (len(modalities),), np.float32)
  xla = compiled_memory(jax.jit(lambda v, w, m: inference.make_window_forward(method, v)(w, m)),
                        variables, windows, masks)
  start = time.perf_counter()
  probs = inference.predict_probabilities(
      method, variables, volume, masks,
      inference.WindowSettings(roi=roi, overlap=0.5, batch_size=args.batch), forward=forward)
  seconds = time.perf_counter() - start
  peak = max_rss_bytes()
  print(f"# bench_sliding_window_memory: volume {len(modalities)} x {shape}, roi {roi}, "
        f"{args.batch} windows per call, {len(masks)} subset(s), output {probs.shape}; "
        f"jax {jax.__version__} on {jax.default_backend()}; allocator: {allocator}")
  print("| peak RSS (process) | RSS before inference (runtime + volume) | XLA buffers, one call "
        "| seconds | under 4 GiB |")
  print("|---:|---:|---:|---:|---|")
  print(f"| {peak / GIB:.2f} GiB | {rss_before / GIB:.2f} GiB | {xla['peak'] / GIB:.2f} GiB | "
        f"{seconds:.0f} | {'yes' if peak < 4 * GIB else 'NO'} |")


if __name__ == "__main__":
  main()
