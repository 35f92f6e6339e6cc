r"""Evaluates a trained workdir on every non-empty subset of its modalities.

  python evaluate.py --workdir runs/hemis [--data DIR --layout auto] [--split test|val|train|all]
      [--subsets all|flair+t1,t2] [--step best|latest|N] [--compare runs/unet ...] [--out DIR]
      [--hd95 directed_max|pooled] [--empty-penalty brats|image_diagonal] [--min-volume ET=500]

Each case is scored on every subset of the modalities its files have (a subset needing a missing
modality does not apply to it; the tables' n column counts the cases scored), and once more "as
acquired", with all the modalities it has. A case without a label file is reported and left out.
--split names a split of the dataset's splits.json or of the split file training recorded for it;
a dataset with neither needs --split all (every case).

Writes cases.csv, summary.md/.json, dice_by_subset.png and overlays to --out (default WORKDIR/eval;
the folder is replaced as a whole; an interrupted evaluation resumes from the cases it scored,
kept beside it in .OUT.cases.partial.jsonl) and prints the tables, then any report the method adds
(synthesis PSNR, a modality classifier's accuracy). With --compare (workdirs of the same task,
evaluated before on the same cases): comparison.md (Dice), comparison_assd.md, comparison_hd95.md,
methods side by side, wins and Wilcoxon p-values against WORKDIR paired over the cases both were
scored on. Every summary and comparison states its metric conventions (HD95, empty, --min-volume).
"""
import argparse

from hemijax import cli


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", default=None, help="dataset folder (default: the run's data)")
  parser.add_argument("--layout", default="auto",
                      choices=("auto", "brats2018", "brats", "nnunet", "manifest"))
  parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
  parser.add_argument("--subsets", default="all", help='"all" or subsets such as flair+t1,t2')
  parser.add_argument("--compare", nargs="*", default=(), metavar="OTHER_WORKDIR")
  parser.add_argument("--out", default=None)
  parser.add_argument("--step", default="best", help='"best", "latest" or a step number')
  parser.add_argument("--hd95", default="directed_max", choices=("directed_max", "pooled"))
  parser.add_argument("--empty-penalty", default="brats", choices=("brats", "image_diagonal"))
  parser.add_argument("--min-volume", nargs="*", default=(), metavar="REGION=MM3",
                      help="post-processing (docs/metrics.md), e.g. ET=500")
  args = parser.parse_args()

  def run():
    from hemijax.evaluation import evaluate as lib

    options = dict(hd95_convention=args.hd95, empty_penalty=args.empty_penalty,
                   min_region_volume_mm3=lib.parse_min_volume_option(args.min_volume))
    summary = lib.evaluate_workdir(args.workdir, data=args.data, layout=args.layout,
                                   split=args.split, subsets=args.subsets, out=args.out,
                                   compare=args.compare, step=lib.checkpoint_step(args.step),
                                   metric_options=options)
    for report in summary["reports"]:  # the summary, the method's own reports, the comparison
      print(open(report).read())

  cli.run(run, reuse_freed_memory=False)  # a kept heap fragments here (hemijax.runtime)


if __name__ == "__main__":
  main()
