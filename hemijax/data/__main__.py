"""`python -m hemijax.data verify --data DIR [--layout ...]`: dataset integrity check.

Prints one `path: problem` line per problem and exits 1 if there is any; otherwise prints a
one-line summary and exits 0.
"""
from __future__ import annotations

import argparse
import sys

from hemijax.data.io import DataError, one_line
from hemijax.data.layouts import LAYOUTS
from hemijax.data.tasks import KNOWN_MODALITIES, TASKS, check_modalities
from hemijax.data.verify import verify_dataset


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _modality_list(text: str) -> tuple[str, ...]:
  try:
    return check_modalities([v.strip() for v in text.split(",") if v.strip()], option="--modalities")
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m hemijax.data", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  verify = sub.add_parser("verify", help="check that every file of a dataset opens and agrees")
  verify.add_argument("--data", required=True, help="dataset folder (or manifest .csv/.json)")
  verify.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
  verify.add_argument("--task", choices=sorted(TASKS),
                      help="take modalities and label values from this task")
  verify.add_argument("--modalities", type=_modality_list,
                      help=f"comma-separated subset of {','.join(KNOWN_MODALITIES)} (default: all)")
  verify.add_argument("--labels", type=_int_list,
                      help="allowed label values, e.g. 0,1,2,4 (default: the task's, else "
                           "dataset.json's, else BraTS's)")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  modalities, labels = args.modalities, args.labels
  if args.task is not None:
    task = TASKS[args.task]
    modalities = modalities or task.modalities
    labels = labels or task.label_values
  try:
    report = verify_dataset(args.data, layout=args.layout, modalities=modalities,
                            label_values=labels)
  except (DataError, OSError) as e:  # e.g. a folder that cannot be listed
    print(one_line(e))
    return 1
  for line in report.problems:
    print(line)
  if not report.ok:
    print(f"{len(report.problems)} problem(s) found in {args.data}", file=sys.stderr)
    return 1
  print(report.summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
