"""Atomic file writes: a temporary name in the target folder, then `os.replace`.

A reader never sees a half-written file, and an interrupted write leaves the old file intact.
`write_directory` does the same for a whole folder (a generated dataset).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def temporary_path(path, suffix: str = ""):
  """Yields a temporary file name beside `path`; renames it to `path` if the block succeeds."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The suffix matters to writers that pick a format from the name (nibabel: .nii.gz).
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path, data: bytes) -> None:
  with temporary_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, default=None) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def write_directory(path, fill: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Runs `fill(tmp)` on a new temporary folder beside `path`, then renames it to `path`.

  If another process created `path` first, its folder is kept and ours is discarded; on any error
  the temporary folder is removed and nothing appears at `path`.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
  try:
    fill(tmp)
    if path.exists():  # another process finished first
      shutil.rmtree(tmp)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
