r"""Runs a robustness study: trains and evaluates every run x seed of a study config, one report.

  python study.py --config configs/study.py[:demo|paper|smoke] --workdir runs/study \
      [--config.seeds='(0,1)' ...] [--render_only] [--archive docs/study/runs]

Interrupted studies resume (finished runs are skipped, interrupted ones resume from checkpoints);
a finished study re-renders WORKDIR/report/ in seconds. Several processes can share one study: start
the same command again (another terminal, or another machine with the same workdir) and each takes
the next run x seed no other holds; on 2 CPU cores two of them get 1.55x the training steps of
one (docs/performance.md). `--archive DIR` keeps each finished run's results (markers, cases.csv,
validation curves, reports; no checkpoints) in DIR and restores them from there, so that a study
outlives its workdir: a new machine resumes from the archive, and `--render_only` renders the
report from it alone. See configs/study.py.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hemijax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (path[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the runs and the report.")
flags.DEFINE_bool("render_only", False, "Only render the report from the finished runs.")
flags.DEFINE_string("archive", None, "Folder keeping each finished run's results (no "
                    "checkpoints): restored from at the start, added to as runs finish.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if FLAGS.verbosity <= 0:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from hemijax.evaluation import study

  def run():
    spec = study.parse_study(FLAGS.config,
                             source=config_flags.get_config_filename(FLAGS["config"]))
    report = study.run_study(spec, FLAGS.workdir, train=not FLAGS.render_only,
                             progress=FLAGS.progress, archive=FLAGS.archive,
                             command=" ".join(["python"] + sys.argv))
    print(f"report: {report / 'report.md'}")
    for claim in study.read_claims(report):
      print(f"{claim['status']:>14}: {claim['text']} ({claim['detail']})")

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
