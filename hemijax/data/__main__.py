"""`python -m hemijax.data verify|cache`: dataset integrity check, and the preprocessed cache.

  python -m hemijax.data verify --data DIR [--layout ...] [--task tumor|wmh|tissue|auto]
      [--modalities t2,pd] [--splits-file FILE]
  python -m hemijax.data cache [--dir DIR] [--clean [--older-than DAYS]]

verify prints one `path: problem` line per problem and exits 1 if there is any; otherwise it
prints a summary, the task the dataset declares (--task auto: modalities, classes, regions from
hemijax_task.json / dataset.json / the manifest's header; docs/data.md), how the label values
pair with the task's (with --task) and which train/val/test split a training run will use, and
exits 0.

cache lists what the cache holds (preprocessed cases per dataset, generated phantoms) with sizes,
and with --clean removes it (or only what was not used for DAYS days). The cache folder is
config.data.cache_dir when a run sets it, else $HEMIJAX_CACHE, else $XDG_CACHE_HOME/hemijax
(~/.cache/hemijax); a training run records the absolute folder in WORKDIR/config.json.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from hemijax.data import cache as cache_lib
from hemijax.data.datasets import CACHE_ENV, default_cache_root
from hemijax.data.io import DataError, one_line
from hemijax.data.layouts import LAYOUTS
from hemijax.data.tasks import AUTO, TASKS, check_modalities
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


def _days(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m hemijax.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  verify = sub.add_parser("verify", help="check that every file of a dataset opens and agrees")
  verify.add_argument("--data", required=True, help="dataset folder (or manifest .csv/.json)")
  verify.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
  verify.add_argument("--task", choices=sorted(TASKS) + [AUTO],
                      help="take modalities from this task, and pair the dataset's label values "
                           "(dataset.json 'labels') with the task's; auto: the task the dataset "
                           "declares (hemijax_task.json, dataset.json, manifest header)")
  verify.add_argument("--modalities", type=_modality_list,
                      help="comma-separated modality names, e.g. flair,t1 or t2,pd (default: the "
                           "task's, else the dataset's: nnU-Net channels, manifest columns, BraTS "
                           "suffixes and those hemijax_task.json declares)")
  verify.add_argument("--labels", type=_int_list,
                      help="allowed label values, e.g. 0,1,2,4 (default: the task's as the dataset "
                           "stores them, else dataset.json's, else BraTS's)")
  verify.add_argument("--splits-file", type=pathlib.Path,
                      help="the split file a run will be given (config.data.splits_file)")
  cache = sub.add_parser("cache", help="list (and clean) the preprocessed-data cache",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cache.add_argument("--dir", type=pathlib.Path,
                     help=f"cache folder (default: ${CACHE_ENV}, else ~/.cache/hemijax; now "
                          f"{default_cache_root()})")
  cache.add_argument("--clean", action="store_true", help="remove the entries listed")
  cache.add_argument("--older-than", type=_days, metavar="DAYS",
                     help="only entries not used for DAYS days")
  return parser


def _verify(args) -> int:
  modalities = args.modalities
  if args.task in TASKS:
    modalities = modalities or TASKS[args.task].modalities  # auto: the dataset's, in verify
  try:
    report = verify_dataset(args.data, layout=args.layout, modalities=modalities,
                            label_values=args.labels, task=args.task,
                            splits_file=args.splits_file)
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


def _cache(args) -> int:
  root = (args.dir or default_cache_root()).expanduser().absolute()
  entries = cache_lib.list_entries(root, older_than_days=args.older_than)
  for line in cache_lib.describe(root, entries, cleaning=args.clean):
    print(line)
  if args.clean:
    freed = cache_lib.remove(entries)
    removed = cache_lib.remove_stale_temporaries(root)
    print(f"removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
          f"{f' and {len(removed)} leftover temporar' + ('y' if len(removed) == 1 else 'ies') if removed else ''}"
          f", {cache_lib.human_size(freed)} freed")
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return _verify(args) if args.command == "verify" else _cache(args)


if __name__ == "__main__":
  sys.exit(main())
