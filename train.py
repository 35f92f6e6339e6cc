r"""Trains a method from an ml-collections config.

  python train.py --config configs/hemis.py[:paper|demo|smoke] --workdir runs/hemis \
      [--config.train.num_steps=500 ...]

An interrupted run resumes from its workdir's latest checkpoint with the same numbers. Several
processes (hosts) train one run with --coordinator_address, --num_processes and --process_id (or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or under srun): see docs/scaling.md.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from hemijax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the resolved config.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes train the run.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id, 0..num_processes-1.")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Multi-process: seconds to wait for all processes to join.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if FLAGS.verbosity <= 0:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from hemijax.training import loop, sharding

  def run():
    # Before anything touches a JAX backend.
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.initialization_timeout)
    loop.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
