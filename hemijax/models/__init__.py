"""Method registry: config.method -> module with `build(config) -> Method`."""
from __future__ import annotations

import importlib

from hemijax.models.base import Method

METHODS = {
    "hemis": "hemijax.models.hemis",
    "unet": "hemijax.models.unet",
    "mlp_impute": "hemijax.models.mlp_impute",
    "urn": "hemijax.models.urn",
    "pimms": "hemijax.models.pimms",
    "disentangle": "hemijax.models.disentangle",
    "joint": "hemijax.models.joint",
}


def get_method(config) -> Method:
  name = config.method
  if name not in METHODS:
    raise ValueError(f"config.method: unknown method {name!r}; choose one of {sorted(METHODS)}")
  return importlib.import_module(METHODS[name]).build(config)
