"""Command line of `python -m hemijax.data.phantom` (see docs/data.md for the flags)."""
from __future__ import annotations

import argparse

from hemijax.data.phantom.acquisition import PROTOCOLS
from hemijax.data.phantom.montage import render_montage
from hemijax.data.phantom.writer import LAYOUTS, write_dataset


def _parser():
  p = argparse.ArgumentParser(
      prog="python -m hemijax.data.phantom",
      description="Write a phantom MRI dataset (NIfTI + splits.json), or render the docs montage.")
  p.add_argument("--task", default="tumor", help="tumor | wmh | tissue | tissue6 (default tumor)")
  p.add_argument("--out", help="output directory (new, empty, or written by this tool before)")
  p.add_argument("--n-subjects", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size, mm (default 2)")
  p.add_argument("--layout", default="brats", help=f"one of {', '.join(LAYOUTS)} (default brats)")
  p.add_argument("--missing-rate", type=float, default=0.0,
                 help="probability that each modality file of a subject is absent (never all)")
  p.add_argument("--protocol", default="default", help=f"one of {', '.join(PROTOCOLS)}")
  p.add_argument("--test-protocol", default=None, help="acquire the test split with this protocol")
  p.add_argument("--modalities", default=None,
                 help="comma-separated subset of the task's modalities, plus pd (proton density) "
                      "if wanted, e.g. flair,t1,t2,pd")
  p.add_argument("--lesions", action="store_true",
                 help="tissue, tissue6 tasks: add white-matter lesions (their lesion label)")
  p.add_argument("--no-skull-strip", action="store_true", help="keep the noise outside the brain")
  p.add_argument("--montage", metavar="PNG", help="render the docs montage to PNG instead")
  p.add_argument("--list-protocols", action="store_true", help="print the protocols and exit")
  p.add_argument("-q", "--quiet", action="store_true")
  return p


def main(argv=None):
  parser = _parser()
  def one_line_error(message):
    raise SystemExit(f"phantom: {message}")
  parser.error = one_line_error
  args = parser.parse_args(argv)
  try:
    if args.list_protocols:
      for name, p in PROTOCOLS.items():
        print(f"{name}: {p.description}")
      return 0
    if args.montage:
      render_montage(args.montage, seed=args.seed, spacing=args.spacing)
      return 0
    if not args.out:
      raise ValueError("--out is required (or give --montage PNG)")
    modalities = None
    if args.modalities is not None:
      modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    record = write_dataset(args.out, args.task, args.n_subjects, args.seed, spacing=args.spacing,
                           layout=args.layout, missing_rate=args.missing_rate, protocol=args.protocol,
                           modalities=modalities, test_protocol=args.test_protocol,
                           lesions=args.lesions, skull_strip=not args.no_skull_strip,
                           verbose=not args.quiet)
  except (ValueError, OSError) as e:   # bad option, or an unwritable --out / --montage path
    raise SystemExit(f"phantom: {e}") from None
  if not args.quiet:
    print(f"wrote {len(record['cases'])} {record['task']} subjects ({len(record['files'])} files) "
          f"to {args.out}")
  return 0
