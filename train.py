r"""Trains a method from an ml-collections config.

  python train.py --config configs/hemis.py[:paper|demo|smoke] --workdir runs/hemis \
      [--config.train.num_steps=500 ...]

An interrupted run resumes from its workdir's latest checkpoint with the same numbers.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from hemijax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the resolved config.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if FLAGS.verbosity <= 0:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from hemijax.training import loop

  cli.run(lambda: loop.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress))


if __name__ == "__main__":
  app.run(main)
