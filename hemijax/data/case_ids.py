"""Case ids as file names: the one place an id from a dataset becomes part of a path.

A case id comes from a folder name, a file name or a manifest cell, so it can hold anything:
`../../x` would write outside the output folder, `sub-01/ses-01` would make nested folders, an
absolute path would write anywhere. Only plain names are accepted; everything else is refused with
a message naming the id (`verify` reports such ids before any run).
"""
from __future__ import annotations

import re

from hemijax.data.io import DataError

# Characters that are path separators or special on common file systems, and control characters.
_NOT_IN_A_NAME = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
MAX_LENGTH = 200  # leaves room for suffixes under the usual 255-byte file-name limit


def check_case_id(case_id) -> str:
  """`case_id` if it is a plain file name; DataError naming it otherwise (empty, '.', '..', a
  leading '.', a path separator or control character, too long)."""
  text = case_id if isinstance(case_id, str) else ""
  reason = None
  if not text or not text.strip():
    reason = "is empty"
  elif _NOT_IN_A_NAME.search(text):
    reason = "holds a path separator or a character not allowed in file names"
  elif text.startswith("."):
    reason = "starts with '.' (a hidden file, or a path like '..')"
  elif text != text.strip():
    reason = "starts or ends with a space"
  elif len(text.encode("utf-8")) > MAX_LENGTH:
    reason = f"is longer than {MAX_LENGTH} bytes"
  if reason:
    raise DataError(f"case id {case_id!r} {reason}; case ids must be plain names because they "
                    "become file names")
  return text


def case_filename(case_id, suffix: str = ".nii.gz") -> str:
  """The file name of a case's output, e.g. 'BraTS2021_00000' -> 'BraTS2021_00000.nii.gz'."""
  return check_case_id(case_id) + suffix
