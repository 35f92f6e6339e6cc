r"""HeMIS-3D with hemijax's convolution layer against flax.linen.Conv, measured in one run.

  python benchmarks/bench_conv.py            # the issue's sizes (tens of minutes on 2 CPU cores)
  python benchmarks/bench_conv.py --quick    # small sizes, about a minute
  python benchmarks/bench_conv.py --torch --skip-flax-vmap --impls auto,xla   # against PyTorch
                                             # (eager and torch.compile; pip install -e ".[bench]")

Network (issue 9): 4 per-modality back ends (conv 1->48, conv 48->48, ReLUs, 2x2x2 max-pool with
stride 1), mean+variance fusion, conv 96->16, conv 16->4; kernels 3x3x3. Cases:

- `flax vmap` / `flax unrolled`: the network written with `flax.linen.Conv` and `flax.linen.max_pool`,
  back ends vmapped over stacked parameters (as HeMIS does) or unrolled as 4 separate modules.
- `hemijax <impl>`: `hemijax.models.hemis.HeMIS(conv_impl=impl)`, back ends vmapped.
- `torch eager` / `torch compile` (with --torch): the same network in PyTorch
  (`benchmarks/torch_reference.py`, same parameter count, checked), its train step with
  `torch.optim.SGD`; PyTorch's own threads (all CPUs). Peak memory is not measured for them ("–").

Measures a training step (cross-entropy, gradients, SGD update; batch 2 x 4 modalities x 32^3)
and inference (1 x 4 modalities x 96^3, the volume whole), alternating the cases round by round,
and prints median seconds, speed-up over `flax unrolled`, voxels/s, achieved GFLOP/s (model FLOPs:
2 * taps * Cin * Cout per output voxel and convolution; the training step counts forward, kernel
gradient and input gradient, except the input gradient of the first convolution), that rate as a
fraction of XLA's float32 2048^2 matrix product timed in the same run, peak memory: XLA's
compiled buffer assignment (arguments + outputs + temporaries), which excludes the runtime itself,
and the median CPU seconds the process used per call (all threads), a steadier measure of work
than wall time when other processes share the cores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compiled_memory, matmul_peak_gflops, time_interleaved  # noqa: E402
from hemijax import runtime  # noqa: E402
from hemijax.nn import fusion
from hemijax.nn import losses  # noqa: E402
from hemijax.models.hemis import HeMIS  # noqa: E402

MODALITIES, CLASSES = 4, 4
BACKEND, FRONTEND, KERNEL = (48, 48), (16,), 3


class FlaxBackend(nn.Module):
  """One modality's back end with flax.linen layers only."""

  @nn.compact
  def __call__(self, x):
    for width in BACKEND:
      x = nn.relu(nn.Conv(width, (KERNEL,) * 3, padding="SAME")(x))
    return nn.max_pool(x, (2, 2, 2), (1, 1, 1), padding="SAME")


class FlaxHeMIS(nn.Module):
  """The same network built from flax.linen.Conv; back ends vmapped or unrolled."""
  vmapped: bool

  @nn.compact
  def __call__(self, image, modality_mask):
    image = jnp.where(modality_mask[:, None, None, None, :], image, 0)
    per_modality = jnp.moveaxis(image, -1, 0)[..., None]  # (M, B, D, H, W, 1)
    if self.vmapped:
      backends = nn.vmap(FlaxBackend, in_axes=0, out_axes=0, variable_axes={"params": 0},
                         split_rngs={"params": True}, axis_size=MODALITIES)
      features = backends(name="backend")(per_modality)
    else:
      features = jnp.stack([FlaxBackend(name=f"backend_{m}")(per_modality[m])
                            for m in range(MODALITIES)])
    features = jnp.moveaxis(features, 0, 1)
    mask = fusion.expand_modality_mask(modality_mask, features.ndim)
    x = fusion.moments(features, mask, axis=1)
    for width in FRONTEND:
      x = nn.relu(nn.Conv(width, (KERNEL,) * 3, padding="SAME")(x))
    return nn.Conv(CLASSES, (KERNEL,) * 3, padding="SAME")(x)


def hemijax_model(impl):
  return HeMIS(num_modalities=MODALITIES, num_classes=CLASSES, backend_features=BACKEND,
               backend_kernel=KERNEL, pool_window=2, frontend_features=FRONTEND,
               frontend_kernel=KERNEL, final_kernel=KERNEL, conv_impl=impl)


def conv_flops(voxels: int, train: bool) -> float:
  """Model FLOPs of the network's convolutions over `voxels` output voxels (per batch item)."""
  taps = KERNEL**3
  layers = [(1, BACKEND[0])] * MODALITIES + [(BACKEND[0], BACKEND[1])] * MODALITIES
  widths = (2 * BACKEND[-1],) + FRONTEND + (CLASSES,)
  layers += list(zip(widths[:-1], widths[1:]))
  forward = sum(2 * taps * cin * cout for cin, cout in layers) * voxels
  if not train:
    return forward
  first_input_grads = MODALITIES * 2 * taps * 1 * BACKEND[0] * voxels  # the image needs none
  return 3 * forward - first_input_grads


def make_train_step(model):
  def loss_fn(params, image, mask, labels):
    logits = model.apply({"params": params}, image, mask)
    return losses.cross_entropy(logits, labels)

  @jax.jit
  def train_step(params, image, mask, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, image, mask, labels)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), loss

  return train_step


def make_inference(model):
  @jax.jit
  def infer(params, image, mask):
    return model.apply({"params": params}, image, mask)
  return infer


def format_table(rows: Sequence[dict], peak: float, baseline: str) -> str:
  base = {row["task"]: row["median"] for row in rows if row["case"] == baseline}
  base_cpu = {row["task"]: row["cpu"] for row in rows if row["case"] == baseline}
  lines = ["| task | case | median s | min s | speed-up vs " + baseline +
           " | voxels/s | GFLOP/s | of matmul peak | peak memory (XLA buffers) "
           "| CPU s (speed-up) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    gflops = row["flops"] / row["median"] / 1e9
    memory = "–" if row["memory"] is None else f"{row['memory'] / 2**20:,.0f} MiB"
    lines.append(
        f"| {row['task']} | {row['case']} | {row['median']:.3f} | {row['min']:.3f} | "
        f"{base[row['task']] / row['median']:.2f}x | {row['voxels'] / row['median']:,.0f} | "
        f"{gflops:.1f} | {gflops / peak:.0%} | {memory} | "
        f"{row['cpu']:.2f} ({base_cpu[row['task']] / row['cpu']:.2f}x) |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
  parser.add_argument("--impls", default="planes,matmul,xla",
                      help="hemijax conv impls to time, comma-separated")
  parser.add_argument("--tasks", default="train,inference", help="train and/or inference")
  parser.add_argument("--sizes", default=None,
                      help="TRAIN,INFER cube edges (default 32,96; --quick 12,24)")
  parser.add_argument("--skip-flax-vmap", action="store_true",
                      help="leave out the slowest case (flax.linen.Conv with vmapped back ends)")
  parser.add_argument("--torch", action="store_true",
                      help="also time the network in PyTorch, eager and torch.compile")
  parser.add_argument("--baseline", default=None,
                      help="the case ratios are against (default: torch compile with --torch, "
                           "else flax unrolled)")
  args = parser.parse_args(argv)
  # As the entry points do (process-wide, so PyTorch's cases get it too); HEMIJAX_MALLOC=default
  # measures glibc's default.
  allocator = ("freed memory reused (hemijax.runtime)" if runtime.reuse_freed_memory()
               else "glibc default")
  train_size, infer_size, batch = (12, 24, 2) if args.quick else (32, 96, 2)
  if args.sizes:
    try:
      train_size, infer_size = (int(v) for v in args.sizes.split(","))
    except ValueError:
      parser.error(f"--sizes: want TRAIN,INFER edge lengths such as 32,64, got {args.sizes!r}")
  repeats = args.repeats or (2 if args.quick else 3)

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  cases = {}
  if not args.skip_flax_vmap:
    cases["flax vmap"] = FlaxHeMIS(vmapped=True)
  cases["flax unrolled"] = FlaxHeMIS(vmapped=False)
  for impl in args.impls.split(","):
    cases[f"hemijax {impl}"] = hemijax_model(impl)

  key = jax.random.key(0)
  train_image = jax.random.normal(key, (batch,) + (train_size,) * 3 + (MODALITIES,))
  train_labels = jax.random.randint(key, (batch,) + (train_size,) * 3, 0, CLASSES)
  train_mask = jnp.ones((batch, MODALITIES), bool)
  infer_image = jax.random.normal(key, (1,) + (infer_size,) * 3 + (MODALITIES,))
  infer_mask = jnp.ones((1, MODALITIES), bool)

  train_cases, infer_cases, memory = {}, {}, {}
  for name, model in cases.items():
    params = model.init(jax.random.key(1), train_image[:1, :8, :8, :8], train_mask[:1])["params"]
    step, infer = make_train_step(model), make_inference(model)
    train_args = (params, train_image, train_mask, train_labels)
    infer_args = (params, infer_image, infer_mask)
    train_cases[name], infer_cases[name] = (step, train_args), (infer, infer_args)
    if "train" in args.tasks:
      memory["train", name] = compiled_memory(step, *train_args)["peak"]
    if "inference" in args.tasks:
      memory["inference", name] = compiled_memory(infer, *infer_args)["peak"]
  if args.torch:
    import torch

    from benchmarks import torch_reference
    jax_params = sum(x.size for x in jax.tree.leaves(params))
    if torch_reference.num_parameters() != jax_params:
      raise SystemExit(f"torch reference has {torch_reference.num_parameters()} parameters, "
                       f"hemijax {jax_params}: not the same network")
    torch.set_num_threads(os.cpu_count())
    torch_train, torch_infer = torch_reference.make_cases(
        (batch,) + (train_size,) * 3, (1,) + (infer_size,) * 3)
    train_cases.update(torch_train)
    infer_cases.update(torch_infer)
    memory.update({(task, name): None for task, cases_ in (("train", torch_train),
                                                           ("inference", torch_infer))
                   for name in cases_})

  log(f"float32 matmul peak ({jax.default_backend()}) ...")
  peak_before = matmul_peak_gflops()
  rows = []
  for task, task_cases, voxels in [("train", train_cases, batch * train_size**3),
                                   ("inference", infer_cases, infer_size**3)]:
    if task not in args.tasks.split(","):
      continue
    log(f"{task}: {len(task_cases)} cases, {repeats} rounds")
    timings = time_interleaved(task_cases, repeats=repeats, log=log)
    flops = conv_flops(voxels, train=task == "train")
    for name, timing in timings.items():
      rows.append(dict(task=task, case=name, median=timing.median, min=timing.min, voxels=voxels,
                       flops=flops, memory=memory[task, name], cpu=timing.cpu_median))
  peak = max(peak_before, matmul_peak_gflops())

  print(f"# bench_conv {'--quick ' if args.quick else ''}{datetime.date.today()} "
        f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()})")
  print(f"train step: batch {batch} x {MODALITIES} modalities x {train_size}^3; inference: "
        f"1 x {MODALITIES} x {infer_size}^3; {repeats} rounds, cases alternated; allocator: "
        f"{allocator}")
  print(f"float32 matmul peak (2048^2 jnp.dot, best of this run): {peak:.1f} GFLOP/s")
  baseline = args.baseline or ("torch compile" if args.torch else "flax unrolled")
  print(format_table(rows, peak, baseline=baseline))


if __name__ == "__main__":
  main()
