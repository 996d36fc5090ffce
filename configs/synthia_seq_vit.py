"""SYNTHIA-Seq -> Cityscapes-Seq, the transformer video model (docs/vit.md).

``configs/synthia_seq.py`` with ``common.vit``; variants ``:smoke`` and
``:reference`` as documented in ``common.vit_config``.
"""

from configs import common
from configs import synthia_seq


def get_config(arg: str | None = None):
  return common.vit_config(synthia_seq, arg, image=False)
