"""What the cache folder holds, and removing it: `python -m hemijax.data cache [--clean]`.

The cache (`datasets.cache_root`) holds `preprocessed/<case>-<key>/` (one preprocessed case per
set of options; meta.json names the dataset folder) and `phantoms/<name>/` (generated datasets).
An entry's folder mtime is its last use: loads touch it (`preprocess.touch_used`).
Everything in it can be rebuilt: removing an entry only costs the time to recompute it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
import uuid

KINDS = ("preprocessed", "phantoms")
# Temporary folders (a writer killed mid-way) older than this are leftovers, not work in progress.
STALE_TEMPORARY_S = 3600.0


@dataclasses.dataclass(frozen=True)
class Entry:
  kind: str
  path: pathlib.Path
  size: int          # bytes
  last_used: float   # seconds since the epoch
  source: str        # dataset folder (preprocessed) or the phantom's name


def _size(path: pathlib.Path) -> int:
  total = 0
  for folder, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(folder, name)).st_size
      except OSError:
        pass
  return total


def _source(kind: str, path: pathlib.Path) -> str:
  if kind == "phantoms":
    return path.name
  try:
    return str(json.loads((path / "meta.json").read_text()).get("source", "?"))
  except (OSError, ValueError):
    return "?"


def _children(root: pathlib.Path):
  """(kind, path) of everything in the cache's per-kind folders, in name order."""
  for kind in KINDS:
    folder = root / kind
    if folder.is_dir():
      yield from ((kind, path) for path in sorted(folder.iterdir()))


def list_entries(root, older_than_days: float | None = None, now: float | None = None) -> list[Entry]:
  """The cache's entries (not temporaries), optionally only those unused for `older_than_days`."""
  root = pathlib.Path(root)
  now = time.time() if now is None else now
  entries = []
  for kind, path in _children(root):
    if path.name.startswith(".") or not path.is_dir():
      continue
    last_used = path.stat().st_mtime
    if older_than_days is not None and now - last_used < older_than_days * 86400:
      continue
    entries.append(Entry(kind, path, _size(path), last_used, _source(kind, path)))
  return entries


def human_size(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} TB"


def _age(seconds: float) -> str:
  days = seconds / 86400
  return f"{days:.1f} days ago" if days >= 1 else f"{seconds / 3600:.1f} hours ago"


def describe(root, entries: list[Entry], cleaning: bool = False, now: float | None = None) -> list[str]:
  """Lines for the CLI: the folder and total, then one line per dataset (preprocessed cases
  grouped) or phantom, with its size and last use."""
  now = time.time() if now is None else now
  total = sum(e.size for e in entries)
  verb = "removing" if cleaning else "holds"
  lines = [f"cache {root} {verb} {human_size(total)} in {len(entries)} entr"
           f"{'y' if len(entries) == 1 else 'ies'}"]
  groups: dict[tuple[str, str], list[Entry]] = {}
  for e in entries:
    groups.setdefault((e.kind, e.source), []).append(e)
  for (kind, source), items in sorted(groups.items()):
    size = sum(e.size for e in items)
    last = max(e.last_used for e in items)
    count = f"{len(items)} case(s)" if kind == "preprocessed" else "generated dataset"
    lines.append(f"  {kind:<12} {source}  {count}, {human_size(size)}, last used {_age(now - last)}")
  return lines


def _remove_tree(path: pathlib.Path) -> None:
  """Renames first, so a concurrent reader sees the entry whole or not at all, then deletes."""
  doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.removing.tmp")
  try:
    os.rename(path, doomed)
  except FileNotFoundError:
    return
  shutil.rmtree(doomed, ignore_errors=True)


def remove(entries: list[Entry]) -> int:
  """Removes the entries; returns the bytes freed."""
  for e in entries:
    _remove_tree(e.path)
  return sum(e.size for e in entries)


def remove_stale_temporaries(root, now: float | None = None) -> list[pathlib.Path]:
  """Removes hidden `.*.tmp*` leftovers (a writer killed mid-way) not touched for an hour."""
  root = pathlib.Path(root)
  now = time.time() if now is None else now
  removed = []
  for kind, path in _children(root):
    if not (path.name.startswith(".") and ".tmp" in path.name):
      continue
    try:
      if now - path.lstat().st_mtime < STALE_TEMPORARY_S:
        continue
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
      else:
        path.unlink()
    except OSError:
      continue
    removed.append(path)
  return removed
