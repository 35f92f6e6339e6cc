r"""Evaluates a trained workdir on every non-empty subset of its modalities.

  python evaluate.py --workdir runs/hemis [--data DIR --layout auto] [--split test]
      [--subsets all|flair+t1,t2] [--compare runs/unet ...] [--out DIR]

Writes cases.csv, summary.md/.json, dice_by_subset.png and overlays to --out (default WORKDIR/eval)
and prints the Dice table, then any report the method adds (synthesis PSNR for methods with
synthesis decoders, a modality classifier's accuracy). With --compare: comparison.md (Dice), comparison_assd.md and
comparison_hd95.md, methods side by side with wins and Wilcoxon p-values against WORKDIR.
"""
import argparse

from hemijax import cli


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", default=None, help="dataset folder (default: the run's data)")
  parser.add_argument("--layout", default="auto",
                      choices=("auto", "brats2018", "brats", "nnunet", "manifest"))
  parser.add_argument("--split", default="test", choices=("train", "val", "test"))
  parser.add_argument("--subsets", default="all")
  parser.add_argument("--compare", nargs="*", default=(), metavar="OTHER_WORKDIR")
  parser.add_argument("--out", default=None)
  parser.add_argument("--step", default="best", help='"best", "latest" or a step number')
  args = parser.parse_args()

  def run():
    from hemijax.evaluation import report as evaluation
    from hemijax.evaluation.evaluate import evaluate_workdir

    summary = evaluate_workdir(args.workdir, data=args.data, layout=args.layout,
                               split=args.split, subsets=args.subsets, out=args.out,
                               compare=args.compare, step=args.step)
    print(evaluation.summary_markdown(summary, title=f"{summary['method']}: Dice by subset"))
    for report in summary["reports"]:  # the method's own reports, then the comparison
      print(open(report).read())

  cli.run(run)


if __name__ == "__main__":
  main()
