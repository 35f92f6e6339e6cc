r"""Segments NIfTI volumes with a trained workdir, from any subset of its modalities.

  python predict.py --workdir runs/hemis --input flair=a.nii.gz --input t1=b.nii.gz \
      --output seg.nii.gz [--probabilities probs.nii.gz]
  python predict.py --workdir runs/hemis --data DIR [--layout auto] --out OUTDIR \
      [--probabilities] [--stop-on-error]
  python predict.py --workdir runs/pimms_soft --input a.nii.gz --input b.nii.gz --output seg.nii.gz
      (unnamed scans, for methods whose modality classifier assigns them)

Modality names are case-insensitive and take the dataset spellings (FLAIR, T1Gd, ...). The output
has the input's shape, affine and header codes and the dataset's own label values; it may not be
one of the inputs. Files are written to a temporary name and renamed, so an interrupted run never
leaves a half-written file. With --data, label files are never read, OUTDIR must lie outside DIR,
case <id> is written to OUTDIR/<id>.nii.gz (and OUTDIR/<id>_probabilities.nii.gz with
--probabilities); a case that cannot be read is skipped, all problems are listed at the end and
the exit status is 1 (--stop-on-error: stop at the first).
"""
import argparse
from hemijax import cli


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--input", action="append", default=[], metavar="MODALITY=PATH")
  parser.add_argument("--output", help="label NIfTI to write (with --input)")
  parser.add_argument("--probabilities", nargs="?", const=True, metavar="PATH",
                      help="4D probability NIfTI to write (a path with --input; no value with "
                           "--data)")
  parser.add_argument("--data", help="dataset folder to segment every case of")
  parser.add_argument("--layout", default="auto")
  parser.add_argument("--out", help="output folder (with --data), outside the dataset folder")
  parser.add_argument("--stop-on-error", action="store_true",
                      help="with --data: stop at the first case that cannot be read")
  parser.add_argument("--step", default="best", help="checkpoint: best, latest or a step number")
  args = parser.parse_args()

  def run():
    from hemijax.inference.nifti import predict_cli
    predict_cli(args)

  cli.run(run, reuse_freed_memory=False)  # a kept heap fragments here (hemijax.runtime)


if __name__ == "__main__":
  main()
