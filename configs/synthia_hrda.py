"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, the image-domain QuadMix model:
MiT-B5 + DAFormer head with multi-resolution training (HRDA) and masked
image consistency (MIC), plus DA-STC's image-level fusion and alignment.

See ``common.hrda_config`` and docs/method.md ("HRDA and MIC"). Variant
``:smoke``: a test-size MiT on the synthetic world, 2 steps.
"""

from configs import common
from configs import synthia


def get_config(arg: str | None = None):
  return common.hrda_config(synthia, arg)
