r"""Segments NIfTI volumes with a trained workdir, from any subset of its modalities.

  python predict.py --workdir runs/hemis --input flair=a.nii.gz --input t1=b.nii.gz \
      --output seg.nii.gz [--probabilities probs.nii.gz]
  python predict.py --workdir runs/hemis --data DIR [--layout auto] --out OUTDIR
  python predict.py --workdir runs/pimms_soft --input a.nii.gz --input b.nii.gz --output seg.nii.gz
      (unnamed scans, for methods whose modality classifier assigns them)

The output has the input's shape and affine and the dataset's own label values; files are written
to a temporary name and renamed, so an interrupted run never leaves a half-written file.
"""
import argparse
from hemijax import cli


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--input", action="append", default=[], metavar="MODALITY=PATH")
  parser.add_argument("--output", help="label NIfTI to write (with --input)")
  parser.add_argument("--probabilities", help="4D probability NIfTI to write (with --input)")
  parser.add_argument("--data", help="dataset folder to segment every case of")
  parser.add_argument("--layout", default="auto")
  parser.add_argument("--out", help="output folder (with --data)")
  parser.add_argument("--step", default="best")
  args = parser.parse_args()

  def run():
    from hemijax.inference.nifti import (parse_named_inputs, predict_dataset, predict_files,
                                          predict_unnamed_files)

    if args.data:
      if args.input or not args.out:
        raise ValueError("--data needs --out and no --input")
      n = predict_dataset(args.workdir, args.data, args.out, layout=args.layout, step=args.step)
      print(f"wrote {n} segmentations to {args.out}")
    else:
      if not args.input or not args.output:
        raise ValueError("give --input MODALITY=PATH (one or more) and --output, or --data and --out")
      named = ["=" in value for value in args.input]
      if any(named) and not all(named):
        raise ValueError("--input: give every input as MODALITY=PATH, or none (unnamed scans)")
      if all(named):
        predict_files(args.workdir, parse_named_inputs(args.input), args.output,
                      probabilities=args.probabilities, step=args.step)
      else:
        for path, modality, prob in predict_unnamed_files(
            args.workdir, args.input, args.output, probabilities=args.probabilities,
            step=args.step):
          print(f"{path}: classified as {modality} (p={prob:.2f})")
      print(f"wrote {args.output}")

  cli.run(run)


if __name__ == "__main__":
  main()
