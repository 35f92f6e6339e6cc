"""Atomic file writes: a temporary name in the target folder, then `os.replace`.

A reader never sees a half-written file, and an interrupted write leaves the old file intact.
`write_directory` does the same for a whole folder (a generated dataset).

A temporary file is named `.<target>.<host>-<pid>.<random>.tmp<suffix>`: a process killed while
writing (SIGKILL, power loss) leaves it behind, and the next write of the same target removes the
temporaries of writers on this host that no longer run.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import socket
import tempfile
from typing import Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _writer_tag(pid=None) -> str:
  """'<host>-<pid>' with the host reduced to letters, digits and '_' (no '.' or '-' inside)."""
  host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
  return f"{host}-{os.getpid() if pid is None else pid}"


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def remove_stale_temporaries(path, suffix: str = "") -> list[pathlib.Path]:
  """Removes the temporaries of `path` left by writers on this host that are no longer running
  (see the module docstring); returns them. Temporaries of other hosts or of running writers, and
  names in another form, are left alone."""
  path = pathlib.Path(path)
  host = _writer_tag().rsplit("-", 1)[0]
  start, end = f".{path.name}.", f".tmp{suffix}"
  removed = []
  try:
    entries = list(os.scandir(path.parent))
  except FileNotFoundError:
    return removed
  for entry in entries:
    name = entry.name
    if not (name.startswith(start) and name.endswith(end)):
      continue
    if not entry.is_file(follow_symlinks=False):
      continue
    writer_host, _, pid = name[len(start):].split(".", 1)[0].rpartition("-")
    if writer_host != host or not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
      continue
    try:
      os.remove(entry.path)
      removed.append(pathlib.Path(entry.path))
    except FileNotFoundError:  # another writer removed it first
      pass
  return removed


@contextlib.contextmanager
def temporary_path(path, suffix: str = ""):
  """Yields a temporary file name beside `path`; renames it to `path` if the block succeeds.
  Stale temporaries of `path` (a killed earlier writer) are removed first."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(path, suffix)
  # The suffix matters to writers that pick a format from the name (nibabel: .nii.gz).
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=f".tmp{suffix}",
                             dir=path.parent)
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
