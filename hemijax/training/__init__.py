"""The training side: the loop, its jitted step, stages, checkpoints, sharding and optimisers."""


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, incompatible workdir)."""
