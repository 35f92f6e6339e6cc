"""Atomic file writes: a temporary name in the target folder, then `os.replace`.

A reader never sees a half-written file, and an interrupted write leaves the old file intact.
`write_directory` does the same for a whole folder (a generated dataset). `exclusive_lock` keeps
two processes from working on one thing at once.

A temporary file is named `.<target>.<host>-<pid>.<random>.tmp<suffix>`: a process killed while
writing (SIGKILL, power loss) leaves it behind, and the next write of the same target removes the
temporaries of writers on this host that no longer run.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
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


# A folder written as a whole (reports): built beside its target, then swapped in.
TMP_SUFFIX = ".report-tmp"


def _stale_folders(path: pathlib.Path):
  """Temporary folders beside `path` of reports whose process has ended (interrupted runs)."""
  for sibling in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
    pid = sibling.name[:-len(TMP_SUFFIX)].rsplit("-", 1)[-1]  # "-old": always stale
    try:
      os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
      yield sibling
    except PermissionError:
      pass  # another user's live process


@contextlib.contextmanager
def replacing_directory(path):
  """Yields a new temporary folder beside `path`; if the block succeeds it replaces `path` (the old
  folder is moved aside, the new one renamed in, the old one deleted), else it is deleted.
  Temporary folders of interrupted earlier runs are removed first."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  for stale in _stale_folders(path):
    shutil.rmtree(stale, ignore_errors=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.",
                                      suffix=f"-{os.getpid()}{TMP_SUFFIX}"))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the report gets a folder's usual mode
  try:
    yield tmp
    if path.exists():
      old = tmp.with_name(f"{tmp.name[:-len(TMP_SUFFIX)]}-old{TMP_SUFFIX}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path):
  """Yields True while this process holds an exclusive lock on the file `path` (created if
  needed; it names its holder), False, holding nothing, if another process holds it. The kernel
  releases the lock when the process ends, crashed or not."""
  path = pathlib.Path(path)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      yield False
      return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(path) -> str:
  """Who holds (or last held) the lock file `path`, as it names itself."""
  try:
    return pathlib.Path(path).read_text().strip() or "another process"
  except OSError:
    return "another process"
