"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, the single-frame transformer
(docs/vit.md).

``configs/synthia.py`` with ``common.vit``; variants ``:smoke`` and
``:reference`` as documented in ``common.vit_config``.
"""

from configs import common
from configs import synthia


def get_config(arg: str | None = None):
  return common.vit_config(synthia, arg, image=True)
