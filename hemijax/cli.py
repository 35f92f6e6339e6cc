"""Entry-point glue: bad input becomes one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sys

# Errors a user can cause (files, options, workdirs); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def run(main_fn) -> None:
  try:
    main_fn()
  except USER_ERRORS + (RuntimeError,) as e:
    if os.environ.get("HEMIJAX_DEBUG") or not _is_user_error(e):
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def _is_user_error(e) -> bool:
  from hemijax.training import TrainingError
  return isinstance(e, USER_ERRORS + (TrainingError,))
