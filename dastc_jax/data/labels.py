"""Class sets, raw-id -> train-id maps and the Cityscapes palette.

All maps follow docs/reference_code.md, "Label maps". A map is a 256-entry
``uint8`` lookup table;
ids that are not listed map to 255 (ignored).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dastc_jax import errors

IGNORE = 255


def _lut(pairs: dict[int, int]) -> np.ndarray:
  lut = np.full((256,), IGNORE, np.uint8)
  for raw, train in pairs.items():
    lut[raw] = train
  return lut


@dataclasses.dataclass(frozen=True)
class ClassSet:
  """A benchmark's trained classes and how it is scored.

  Attributes:
    name: benchmark name.
    classes: trained class names, in train-id order.
    cityscapes_ids: Cityscapes labelId of each train id (for palettes and
      exporting predictions as labelIds).
    eval_drop: train ids trained but not scored (SYNTHIA: fence).
    also_report: ``(name, train ids left out)`` of a second mean reported
      next to the mIoU (SYNTHIA -> Cityscapes: mIoU13 without wall, fence,
      pole).
  """

  name: str
  classes: tuple[str, ...]
  cityscapes_ids: tuple[int, ...]
  eval_drop: tuple[int, ...] = ()
  also_report: tuple[str, tuple[int, ...]] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def scored(self) -> tuple[int, ...]:
    """Train ids that enter the mIoU."""
    return tuple(i for i in range(self.num_classes) if i not in self.eval_drop)

  def palette(self) -> np.ndarray:
    """``[256, 3]`` uint8 colours: the Cityscapes colour of each train id."""
    pal = np.zeros((256, 3), np.uint8)
    for i, cid in enumerate(self.cityscapes_ids):
      pal[i] = CITYSCAPES_COLORS[cid]
    return pal


# Cityscapes labelId -> colour (cityscapesscripts helpers/labels.py values).
CITYSCAPES_COLORS = {
    7: (128, 64, 128),
    8: (244, 35, 232),
    11: (70, 70, 70),
    12: (102, 102, 156),
    13: (190, 153, 153),
    17: (153, 153, 153),
    19: (250, 170, 30),
    20: (220, 220, 0),
    21: (107, 142, 35),
    22: (152, 251, 152),
    23: (70, 130, 180),
    24: (220, 20, 60),
    25: (255, 0, 0),
    26: (0, 0, 142),
    27: (0, 0, 70),
    28: (0, 60, 100),
    31: (0, 80, 100),
    32: (0, 0, 230),
    33: (119, 11, 32),
}

VIPER15 = ClassSet(
    name='viper15',
    classes=(
        'road',
        'sidewalk',
        'building',
        'fence',
        'light',
        'sign',
        'vegetation',
        'terrain',
        'sky',
        'person',
        'car',
        'truck',
        'bus',
        'motorcycle',
        'bicycle',
    ),
    cityscapes_ids=(7, 8, 11, 13, 19, 20, 21, 22, 23, 24, 26, 27, 28, 32, 33),
)

SYNTHIA12 = ClassSet(
    name='synthia12',
    classes=(
        'road',
        'sidewalk',
        'building',
        'fence',
        'pole',
        'light',
        'sign',
        'vegetation',
        'sky',
        'person',
        'rider',
        'car',
    ),
    cityscapes_ids=(7, 8, 11, 13, 17, 19, 20, 21, 23, 24, 25, 26),
    eval_drop=(3,),
)

# The 19 Cityscapes evaluation classes (trainIds), used by GTA5 -> Cityscapes.
CITYSCAPES19 = ClassSet(
    name='cityscapes19',
    classes=(
        'road',
        'sidewalk',
        'building',
        'wall',
        'fence',
        'pole',
        'light',
        'sign',
        'vegetation',
        'terrain',
        'sky',
        'person',
        'rider',
        'car',
        'truck',
        'bus',
        'train',
        'motorcycle',
        'bicycle',
    ),
    cityscapes_ids=(
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        31,
        32,
        33,
    ),
)

# SYNTHIA-RAND-CITYSCAPES -> Cityscapes: 16 classes (mIoU16; the common
# mIoU13 also drops wall, fence and pole).
SYNTHIA16 = ClassSet(
    name='synthia16',
    classes=(
        'road',
        'sidewalk',
        'building',
        'wall',
        'fence',
        'pole',
        'light',
        'sign',
        'vegetation',
        'sky',
        'person',
        'rider',
        'car',
        'bus',
        'motorcycle',
        'bicycle',
    ),
    cityscapes_ids=(
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        23,
        24,
        25,
        26,
        28,
        32,
        33,
    ),
    also_report=('miou13', (3, 4, 5)),
)

CLASS_SETS = {c.name: c for c in (VIPER15, SYNTHIA12, CITYSCAPES19, SYNTHIA16)}

# VIPER raw class id -> VIPER15 train id; tree (7) and vegetation (8) merge.
VIPER_RAW = {
    'sky': 2,
    'road': 3,
    'sidewalk': 4,
    'terrain': 6,
    'tree': 7,
    'vegetation': 8,
    'building': 9,
    'infrastructure': 10,
    'fence': 11,
    'billboard': 12,
    'trafficlight': 13,
    'trafficsign': 14,
    'person': 20,
    'bicycle': 22,
    'motorcycle': 23,
    'car': 24,
    'van': 25,
    'bus': 26,
    'truck': 27,
}
VIPER_TO_TRAIN = _lut(
    {
        3: 0,
        4: 1,
        9: 2,
        11: 3,
        13: 4,
        14: 5,
        7: 6,
        8: 6,
        6: 7,
        2: 8,
        20: 9,
        24: 10,
        27: 11,
        26: 12,
        23: 13,
        22: 14,
    }
)
VIPER_CAR = 24

# SYNTHIA raw class id (channel 0 of the 16-bit label) -> SYNTHIA12 train id.
SYNTHIA_TO_TRAIN = _lut(
    {
        3: 0,
        4: 1,
        2: 2,
        5: 3,
        7: 4,
        15: 5,
        9: 6,
        6: 7,
        1: 8,
        10: 9,
        11: 10,
        8: 11,
    }
)

# SYNTHIA-RAND-CITYSCAPES raw id (channel 0) -> SYNTHIA16 train id (rider
# has its own id 17 here; bicycle is 11, motorcycle 12).
SYNTHIA_RAND_TO_TRAIN = _lut(
    {
        3: 0,
        4: 1,
        2: 2,
        21: 3,
        5: 4,
        7: 5,
        15: 6,
        9: 7,
        6: 8,
        1: 9,
        10: 10,
        17: 11,
        8: 12,
        19: 13,
        12: 14,
        11: 15,
    }
)

# Cityscapes labelId -> train id, per benchmark (info_Viper / info_SynthiaSeq).
CITYSCAPES_TO_VIPER15 = _lut(
    {
        7: 0,
        8: 1,
        11: 2,
        13: 3,
        19: 4,
        20: 5,
        21: 6,
        22: 7,
        23: 8,
        24: 9,
        25: 9,
        26: 10,
        27: 11,
        28: 12,
        32: 13,
        33: 14,
    }
)
CITYSCAPES_TO_SYNTHIA12 = _lut(
    {
        7: 0,
        8: 1,
        11: 2,
        13: 3,
        17: 4,
        19: 5,
        20: 6,
        21: 7,
        23: 8,
        24: 9,
        25: 10,
        26: 11,
    }
)

CITYSCAPES_TO_19 = _lut(
    {cid: i for i, cid in enumerate(CITYSCAPES19.cityscapes_ids)}
)

CITYSCAPES_TO_SYNTHIA16 = _lut(
    {cid: i for i, cid in enumerate(SYNTHIA16.cityscapes_ids)}
)

CITYSCAPES_MAPS = {
    'viper15': CITYSCAPES_TO_VIPER15,
    'synthia12': CITYSCAPES_TO_SYNTHIA12,
    'cityscapes19': CITYSCAPES_TO_19,
    'synthia16': CITYSCAPES_TO_SYNTHIA16,
}

# Long-tail classes pasted by the fusion (docs/reference_code.md, "Label maps").
# The image-domain lists are ours (the released code has none): the same
# kinds of classes (thin objects, signals, two-wheelers, rider, terrain).
RARE_CLASSES = {
    'viper15': (3, 4, 5, 7, 13, 14),
    'synthia12': (3, 4, 5, 6, 10),
    'cityscapes19': (4, 5, 6, 7, 9, 12, 17, 18),
    'synthia16': (4, 5, 6, 7, 11, 14, 15),
}


def get_class_set(name: str) -> ClassSet:
  """Looks up a class set by name, with a clear error for unknown names."""
  if name not in CLASS_SETS:
    raise errors.ConfigError(
        f'Unknown class set {name!r}; expected one of ' f'{sorted(CLASS_SETS)}.'
    )
  return CLASS_SETS[name]
