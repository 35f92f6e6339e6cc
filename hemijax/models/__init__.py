"""Method registry: config.method -> module with `build(config) -> Method`."""
from __future__ import annotations

import importlib

from hemijax.models.base import Method

METHODS = {
    "hemis": "hemijax.models.hemis",
}


def get_method(config) -> Method:
  name = config.method
  if name not in METHODS:
    raise ValueError(f"config.method: unknown method {name!r}; choose one of {sorted(METHODS)}")
  return importlib.import_module(METHODS[name]).build(config)
