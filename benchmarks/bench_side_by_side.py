r"""Training throughput: one training alone against two side by side on the same cores.

  python benchmarks/bench_side_by_side.py --config configs/hemis.py:demo [--steps 400]

Runs `train.py` on the config (a) alone, then (b) twice at once (seeds 0 and 1, separate
workdirs under a temporary folder), and prints each one's training steps per second over the
steps after the first `--skip` (compilation excluded; validation and checkpoints off) and the
ratio of the pair's summed rate to the lone one's. A ratio above 1 means one training leaves the
cores partly idle, so a study finishes sooner with two processes sharing it (study.py, started
twice). Needs a quiet machine.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(config, workdir, steps, seed):
  args = [sys.executable, str(ROOT / "train.py"), "--config", config, "--workdir", str(workdir),
          "--progress=False", f"--config.train.num_steps={steps}", f"--config.seed={seed}",
          f"--config.train.eval_every={steps + 1}", f"--config.train.checkpoint_every={steps + 1}"]
  return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ))


def _steps_per_s(workdir, skip):
  records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()
             if "steps_per_s" in line]
  rates = [r["steps_per_s"] for r in records if r["step"] > skip]
  if not rates:
    raise SystemExit(f"{workdir}: no logged steps after {skip}; raise --steps")
  return sum(rates) / len(rates)


def _wait(processes):
  for p in processes:
    _, err = p.communicate()
    if p.returncode:
      raise SystemExit(f"train.py failed:\n{err[-2000:]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/hemis.py:demo")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--skip", type=int, default=150, help="steps left out (compilation)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    _wait([_train(args.config, tmp / "alone", args.steps, 0)])
    _wait([_train(args.config, tmp / f"pair{seed}", args.steps, seed) for seed in (0, 1)])
    alone = _steps_per_s(tmp / "alone", args.skip)
    pair = [_steps_per_s(tmp / f"pair{seed}", args.skip) for seed in (0, 1)]
  print(f"# bench_side_by_side {args.config}, steps {args.skip + 1}..{args.steps}, "
        f"{os.cpu_count()} CPUs")
  print(f"alone: {alone:.2f} steps/s")
  print(f"side by side: {pair[0]:.2f} + {pair[1]:.2f} = {sum(pair):.2f} steps/s")
  print(f"two side by side / one alone: {sum(pair) / alone:.2f}x")


if __name__ == "__main__":
  main()
