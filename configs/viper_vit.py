"""VIPER -> Cityscapes-Seq, the transformer video model (docs/vit.md).

``configs/viper.py`` with ``common.vit``; variants ``:smoke`` and
``:reference`` as documented in ``common.vit_config``.
"""

from configs import common
from configs import viper


def get_config(arg: str | None = None):
  return common.vit_config(viper, arg, image=False)
