"""Rare-class sampling (RCS) of source examples, as DAFormer and HRDA train.

Instead of walking the shuffled source split, every training example first
draws a class ``c`` with probability ``softmax((1 - f_c) / T)`` (``f_c``:
the class's share of all labelled source pixels, ``T`` the temperature),
then a record whose frame-t label has more than ``min_pixels`` pixels of
``c``. The crop of that record is redrawn (``transforms.RandomScaleCrop``)
until it holds more than ``min_pixels * min_crop_ratio`` pixels of ``c``.

The per-record pixel counts come from the label histograms that preparation
writes (``prepare``), counted on the labels at their stored resolution, as
the released statistics are counted on the original label files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class RareClassTable:
  """What RCS draws from.

  Attributes:
    classes: ``[K]`` train ids that occur in the split, rarest first.
    probs: ``[K]`` probability of drawing each class.
    members: per class, the records with more than ``min_pixels`` of it.
  """

  classes: tuple[int, ...]
  probs: tuple[float, ...]
  members: tuple[tuple[int, ...], ...]


def class_probabilities(
    histogram: np.ndarray, num_classes: int, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
  """``(classes, probs)``: the classes present in the split, rarest first,
  and ``softmax((1 - share) / temperature)`` over them.

  Args:
    histogram: ``[N, >= num_classes]`` pixel counts per record, train ids.
    num_classes: train ids ``0 .. num_classes - 1`` count (255 never does).
    temperature: RCS temperature (DAFormer: 0.01).
  """
  totals = histogram[:, :num_classes].sum(axis=0).astype(np.float64)
  present = np.flatnonzero(totals > 0)
  # Stable sort by count, as the released code orders its classes.
  order = present[np.argsort(totals[present], kind='stable')]
  share = totals[order] / totals[order].sum()
  logits = (1.0 - share) / temperature
  probs = np.exp(logits - logits.max())
  return order, probs / probs.sum()


def build_table(
    histogram: np.ndarray,
    num_classes: int,
    temperature: float,
    min_pixels: int,
    where: str = 'the source split',
) -> RareClassTable:
  """The RCS table of a split; a ``ValueError`` names a class that no record
  has more than ``min_pixels`` of (the released code stops there too)."""
  classes, probs = class_probabilities(histogram, num_classes, temperature)
  members = []
  for c in classes:
    rows = np.flatnonzero(histogram[:, c] > min_pixels)
    if not rows.size:
      raise ValueError(
          f'rare-class sampling: no record of {where} has more than '
          f'{min_pixels} pixels of train id {int(c)} (largest: '
          f'{int(histogram[:, c].max())}); lower min_pixels.'
      )
    members.append(tuple(int(r) for r in rows))
  return RareClassTable(
      classes=tuple(int(c) for c in classes),
      probs=tuple(float(p) for p in probs),
      members=tuple(members),
  )


@dataclasses.dataclass
class PickRareClass(grain.transforms.RandomMap):
  """Position in the stream -> ``{'index': record, 'rcs_class': class}``."""

  table: RareClassTable | None = None

  def random_map(self, position: int, rng: np.random.Generator) -> Any:
    del position  # the draw depends on the position's random state only
    t = self.table
    k = int(rng.choice(len(t.classes), p=np.asarray(t.probs)))
    members = t.members[k]
    record = members[int(rng.integers(0, len(members)))]
    return {'index': record, 'rcs_class': t.classes[k]}


@dataclasses.dataclass
class FetchPicked(grain.transforms.Map):
  """``{'index', 'rcs_class'}`` -> that record of ``source`` decoded, with
  ``rcs_class`` (int) added for the crop (``RandomScaleCrop`` removes it)."""

  source: Any = None
  decode: Any = None

  def map(self, pick: dict[str, int]) -> dict[str, Any]:
    ex = self.decode.map(self.source[pick['index']])
    return {**ex, 'rcs_class': pick['rcs_class']}
