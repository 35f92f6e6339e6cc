r"""The 3D kernel-gradient rule of `auto`, on the 3D demo configs: with it against without it.

  python benchmarks/bench_kernel_grad_rule.py
  python benchmarks/bench_kernel_grad_rule.py --configs configs/joint.py:demo --repeats 5
  python benchmarks/bench_kernel_grad_rule.py --layers   # the two kernel gradients, layer by layer

`hemijax.nn.conv` computes the kernel gradient of a 3D layer with at most
`_PLANES_KERNEL_GRAD_MAX_WORK` multiply-adds per tap as XLA's 2D kernel gradient over
depth-shifted planes, and larger ones with its blocked loop. This compiles every training stage's
step of each config twice, with the rule ("rule") and with the blocked loop for every layer
("loop", the threshold set to 0 while tracing), and times the two alternately, round by round:
median wall seconds and median CPU seconds of the process (all threads; steadier when other jobs
share the cores). With `--layers`, times the two kernel gradients alone on single 3x3x3 layers
(batch 2, stride 1, SAME) of the sizes these configs and HeMIS-3D use: where the threshold comes
from.
"""
import argparse
import pathlib
import sys
from unittest import mock

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_methods import build_cases  # noqa: E402
from benchmarks.common import time_interleaved  # noqa: E402
from hemijax.nn import conv as conv_lib  # noqa: E402

CONFIGS = ("configs/disentangle.py:demo", "configs/joint.py:demo")
# (edge of the cube, Cin, Cout) of single layers, batch 2.
LAYERS = ((32, 1, 8), (32, 8, 8), (32, 8, 16), (24, 8, 16), (24, 16, 16), (16, 16, 16),
          (16, 16, 32), (12, 16, 16), (8, 32, 32), (8, 32, 64), (4, 64, 64), (32, 16, 16),
          (32, 24, 24), (32, 32, 32), (32, 48, 48), (32, 96, 16), (16, 48, 48), (16, 64, 64))


def layer_rows(repeats, log):
  """Markdown rows: each layer's two kernel gradients, jitted alone, alternated."""
  window, ones, pads = (3, 3, 3), (1, 1, 1), ((1, 1),) * 3
  rows = []
  for edge, cin, cout in LAYERS:
    x = jax.random.normal(jax.random.key(0), (2, edge, edge, edge, cin))
    g = jax.random.normal(jax.random.key(1), (2, edge, edge, edge, cout))
    cases = {name: (jax.jit(lambda x, g, f=f: f(x, g, window, ones, ones, pads)), (x, g))
             for name, f in (("planes", conv_lib._planes_kernel_grad),
                             ("loop", conv_lib._kernel_grad_loop))}
    times = time_interleaved(cases, repeats=repeats, log=log)
    t = {k: times[k].median for k in cases}
    work = 2 * edge ** 3 * cin * cout
    rows.append(f"| {edge}^3 | {cin} -> {cout} | {work:,} | {t['planes'] * 1e3:.2f} | "
                f"{t['loop'] * 1e3:.2f} | {t['loop'] / t['planes']:.2f}x |")
  return ["| layer | channels | multiply-adds per tap | planes ms | loop ms | planes speed-up |",
          "|---|---|---:|---:|---:|---:|"] + rows


def compiled_steps(spec, max_work):
  """{stage: (compiled train step, its arguments)} with the rule's threshold set to `max_work`."""
  with mock.patch.object(conv_lib, "_PLANES_KERNEL_GRAD_MAX_WORK", max_work):
    stages, _, _ = build_cases(spec, ("auto",))
    return {stage: (step.lower(*args).compile(), args)
            for stage, (cases, *_) in stages.items() for step, args in [cases["auto"]]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", action="store_true", help="single layers instead of configs")
  parser.add_argument("--max-work", type=int, default=conv_lib._PLANES_KERNEL_GRAD_MAX_WORK,
                      help="the rule's threshold to try (default: the library's)")
  args = parser.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr, flush=True)
  if args.layers:
    rows = layer_rows(args.repeats, log)
    print(f"# bench_kernel_grad_rule --layers, jax {jax.__version__} on {jax.default_backend()}; "
          f"medians of {args.repeats} rounds, the two alternated; threshold "
          f"{conv_lib._PLANES_KERNEL_GRAD_MAX_WORK:,}")
    print("\n".join(rows))
    return
  lines = ["| config, stage | train step: rule s | loop s | rule speed-up | CPU s: rule | loop | "
           "rule speed-up |", "|---|---:|---:|---:|---:|---:|---:|"]
  for spec in args.configs.split(","):
    log(spec)
    rule = compiled_steps(spec, args.max_work)
    loop = compiled_steps(spec, 0)
    for stage in rule:
      times = time_interleaved({"rule": rule[stage], "loop": loop[stage]}, repeats=args.repeats,
                               log=log)
      t = {k: times[k].median for k in ("rule", "loop")}
      c = {k: float(np.median(times[k].cpu_times)) for k in ("rule", "loop")}
      lines.append(f"| `{spec}` {stage} | {t['rule']:.3f} | {t['loop']:.3f} | "
                   f"{t['loop'] / t['rule']:.2f}x | {c['rule']:.3f} | {c['loop']:.3f} | "
                   f"{c['loop'] / c['rule']:.2f}x |")
  print(f"# bench_kernel_grad_rule, jax {jax.__version__} on {jax.default_backend()}; medians of "
        f"{args.repeats} rounds, the two alternated; threshold {args.max_work:,} multiply-adds "
        "per tap")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
