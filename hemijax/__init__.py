"""hemijax: segmentation of multi-modal 3D medical images with any subset of modalities missing."""
__version__ = "0.1.0"


def load_predictor(workdir, step="best"):
  """A trained workdir's predictor: `.predict({modality: 3D array, ...})` -> label map."""
  from hemijax.inference.predictor import load_predictor as _load  # keeps `import hemijax` light
  return _load(workdir, step)
