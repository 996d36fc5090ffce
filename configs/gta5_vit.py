"""GTA5 -> Cityscapes, the single-frame transformer (docs/vit.md).

``configs/gta5.py`` with ``common.vit``; variants ``:smoke`` and
``:reference`` as documented in ``common.vit_config``.
"""

from configs import common
from configs import gta5


def get_config(arg: str | None = None):
  return common.vit_config(gta5, arg, image=True)
