"""Which source frames contain each long-tail class (for the fusion pastes).

Derived from the per-sample label histograms that the preparation writes
(``prepare``; docs/reference_code.md, "Label maps"), never from a pass over the
labels at training time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RareIndex = dict[int, list[int]]


def from_histograms(
    histogram: np.ndarray, classes: Sequence[int], min_pixels: int
) -> RareIndex:
  """``{class: [records whose frame t has >= min_pixels of it]}``.

  Args:
    histogram: ``[N, 256]`` pixel counts of each record's frame-t label, in
      the train ids of the class set.
    classes: the long-tail train ids.
    min_pixels: pixels a frame needs to count as containing a class.
  """
  return {
      int(k): np.flatnonzero(histogram[:, k] >= min_pixels).tolist()
      for k in classes
  }
