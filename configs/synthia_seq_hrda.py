"""SYNTHIA-Seq -> Cityscapes-Seq, the multi-resolution video model: the
transformer video model (MiT-B5 + DAFormer head + flow fusion) with HRDA's
context and
detail passes in every frame (one detail crop for the whole clip) and MIC on
the target clip, plus DA-STC.

See ``common.hrda_config`` and docs/method.md ("HRDA and MIC"). Variant
``:smoke``: a test-size MiT on the synthetic world, 2 steps.
"""

from configs import common
from configs import synthia_seq


def get_config(arg: str | None = None):
  return common.hrda_config(synthia_seq, arg, video=True)
