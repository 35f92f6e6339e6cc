"""Subsets of modalities: their order, keys, ● ○ symbols and which ones a case can be scored on.

A subset key is the present modality names joined by "+" in the model's modality order
("flair+t1ce"). Subsets are shown in the papers' notation, one symbol per model modality in model
order: ● present, ○ missing (HeMIS Table 3, URN, RFNet, mmFormer).

Subset order (`all_subsets`): by number of present modalities ascending (single modalities first,
the full set last), then lexicographic in model modality order (`itertools.combinations` order).

Which subsets evaluation scores by default (`default_subsets`): all 2^M - 1 of them for up to
`ALL_SUBSETS_MAX_MODALITIES` (6: 63 subsets) modalities. Above that the count doubles with each
modality (and each subset is one more decode of every case), so the default is the subsets with
1, 2, M - 1 and M modalities: each modality alone, each pair, each leave-one-out, and all of
them (M = 8: 73 of 255; M = 10: 66 of 1023). Any other subset can still be asked for by name
(evaluate.py --subsets).

A case whose files lack some modalities is scored only on the subsets of the modalities it has
(`applicable`), and once more "as acquired" (`AS_ACQUIRED`): with all the modalities it has, the
number a clinician sees for that case.
"""
from __future__ import annotations

import itertools

PRESENT, MISSING = "●", "○"
MODALITY_DISPLAY = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
# The `subset` value of the rows that score each case with every modality it has.
AS_ACQUIRED = "as_acquired"
AS_ACQUIRED_DISPLAY = "as acquired"
# Up to this many modalities, evaluation scores every subset by default (`default_subsets`).
ALL_SUBSETS_MAX_MODALITIES = 6


def display_name(modality: str) -> str:
  """Name as printed in tables ("flair" -> "FLAIR")."""
  return MODALITY_DISPLAY.get(modality, modality.upper())


def all_subsets(modalities) -> list[tuple[str, ...]]:
  """Every non-empty subset (2^M - 1): fewest present first, then lexicographic in model order."""
  modalities = tuple(modalities)
  return [subset for size in range(1, len(modalities) + 1)
          for subset in itertools.combinations(modalities, size)]


def default_subsets(modalities) -> list[tuple[str, ...]]:
  """The subsets evaluation scores unless told otherwise (see the module docstring), in
  `all_subsets` order: all of them up to ALL_SUBSETS_MAX_MODALITIES modalities, else those with
  1, 2, M - 1 and M modalities."""
  modalities = tuple(modalities)
  m = len(modalities)
  if m <= ALL_SUBSETS_MAX_MODALITIES:
    return all_subsets(modalities)
  sizes = sorted({1, 2, m - 1, m})
  return [subset for size in sizes for subset in itertools.combinations(modalities, size)]


def parse_subset(subset, modalities) -> tuple[str, ...]:
  """Subset key ("flair+t1") or sequence of names -> tuple in model modality order (validated)."""
  names = subset.split("+") if isinstance(subset, str) else list(subset)
  unknown = [n for n in names if n not in modalities]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(f"subset {subset!r} is not a non-empty subset of {list(modalities)}")
  return tuple(m for m in modalities if m in names)


def subset_key(subset, modalities) -> str:
  """Canonical key of a subset: present names joined by "+" in model modality order."""
  return "+".join(parse_subset(subset, modalities))


def subset_symbol(subset, modalities) -> str:
  """"●○●●": one symbol per model modality, in model order (● present, ○ missing)."""
  present = parse_subset(subset, modalities)
  return "".join(PRESENT if m in present else MISSING for m in modalities)


def held_modalities(available, modalities) -> tuple[str, ...]:
  """The modalities a case has, from its (M,) availability flags, in model order."""
  return tuple(m for m, has in zip(modalities, available) if has)


def applicable(subsets, held) -> list[tuple[str, ...]]:
  """The subsets (in their given order) whose every modality is among `held`."""
  held = set(held)
  return [subset for subset in subsets if held.issuperset(subset)]
