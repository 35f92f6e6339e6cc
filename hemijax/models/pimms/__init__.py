"""PIMMS (Varsavsky et al. 2018): the network, losses and stages (`model.py`) and its unnamed
inputs and classifier report (`unnamed_inputs.py`)."""
import dataclasses

from hemijax.models import base
from hemijax.models.pimms import model, unnamed_inputs
from hemijax.models.pimms.model import *  # noqa: F401,F403  (the method's public names)


def build(config):
  """The PIMMS `Method`; variants with a modality classifier also take unnamed scans and report
  the classifier's accuracy and the predictions' permutation invariance."""
  method = model.build(config)
  if not unnamed_inputs.has_classifier(config):
    return method
  return dataclasses.replace(
      method, evaluators=(unnamed_inputs.classifier_evaluator,
                          unnamed_inputs.permutation_evaluator),
      unnamed_inputs=base.UnnamedInputs(predict=unnamed_inputs.predict_unlabeled,
                                        predict_files=unnamed_inputs.predict_unlabeled_files))
