"""URN (Lau et al. 2019): the network, losses and stages (`model.py`) and its synthesis report."""
import dataclasses

from hemijax.models.urn import model
from hemijax.models.urn.model import *  # noqa: F401,F403  (the method's public names)
from hemijax.models.urn.synthesis import synthesis_evaluator


def build(config):
  """The URN `Method`, with the synthesis PSNR report among its evaluators when it pre-trains."""
  method = model.build(config)
  if not model.pretrains(config):
    # No pre-training: the synthesis decoders are never trained, so their PSNR would say nothing
    # (and computing it costs more than the segmentation evaluation).
    return method
  return dataclasses.replace(method, evaluators=(synthesis_evaluator,))
