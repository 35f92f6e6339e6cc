"""One study seed against a variant of it (trained longer, another option): Dice per subset, and
a claim recounted.

E.g. did a seed that the study's levelling criterion flags gain anything on the test cases from a
longer budget? Compares the seed's evaluation in the study with another evaluation of the same
cases (`evaluate.py --out`), and recounts "REFERENCE beats RUN on REGION in k of the subsets"
with the seed replaced.

  python docs/scripts/study_seed_against_variant.py --study runs/study --run unet --seed 1 \
      --cases runs/unet_s1_3000/eval_unseen30/cases.csv --reference hemis
"""
import argparse
import collections
import csv
import pathlib
import statistics


def subset_means(path):
  """{(subset, region): mean Dice over the cases} of one evaluation's cases.csv."""
  scores = collections.defaultdict(list)
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      scores[(row["subset"], row["region"])].append(float(row["dice"]))
  return {key: statistics.mean(values) for key, values in scores.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--study", required=True, help="the study's workdir")
  parser.add_argument("--run", required=True)
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--cases", required=True, help="cases.csv of the longer run's evaluation")
  parser.add_argument("--evaluation", default="unseen30", help="the study's evaluation name")
  parser.add_argument("--reference", required=True, help="the run the claim compares against")
  parser.add_argument("--region", default="WT")
  parser.add_argument("--label", default="longer run", help="what the other evaluation is")
  args = parser.parse_args()

  runs = pathlib.Path(args.study) / "runs"
  def seed_cases(run, seed):
    return runs / run / f"seed{seed}" / "study_eval" / args.evaluation / "cases.csv"
  def seeds_of(run):
    return sorted(int(p.name[4:]) for p in (runs / run).glob("seed*") if seed_cases(run, int(p.name[4:])).exists())

  study_seed = subset_means(seed_cases(args.run, args.seed))
  longer = subset_means(args.cases)
  subsets = sorted({s for s, _ in study_seed if s != "as_acquired" and (s, args.region) in longer},
                   key=lambda s: (s.count("+"), s))
  print(f"| subset | {args.region} in the study | {args.region}, {args.label} | difference |")
  print("| :- | -: | -: | -: |")
  for s in subsets:
    a, b = study_seed[(s, args.region)], longer[(s, args.region)]
    print(f"| {s} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
  print()
  for region in ("WT", "TC", "ET"):
    a = statistics.mean(study_seed[(s, region)] for s in subsets)
    b = statistics.mean(longer[(s, region)] for s in subsets)
    print(f"mean {region} over the {len(subsets)} subsets: study {a:.3f}, {args.label} {b:.3f} "
          f"({b - a:+.3f})")

  reference = [subset_means(seed_cases(args.reference, k)) for k in seeds_of(args.reference)]
  others = [subset_means(seed_cases(args.run, k)) for k in seeds_of(args.run) if k != args.seed]
  for label, replaced in (("as in the study", study_seed), (f"with the {args.label}", longer)):
    wins = sum(
        statistics.mean(m[(s, args.region)] for m in reference)
        > statistics.mean(m[(s, args.region)] for m in others + [replaced]) for s in subsets)
    print(f"{args.reference} > {args.run} on {args.region} ({label}, mean over seeds): "
          f"{wins} of {len(subsets)} subsets")


if __name__ == "__main__":
  main()
