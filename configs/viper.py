"""VIPER -> Cityscapes-Seq with ACCEL-DeepLabv2-ResNet-101 (reference values).

Hyper-parameters follow the released CNN script (method.md §4.8): SGD,
momentum 0.9, weight decay 5e-4, base LR 1e-4, poly(0.9) over 250k steps,
x10 LR for the fusion layer and heads, 40k iterations, batch 1 + 1, seed
1234. Data layout per method.md §2 under ``data.root`` (default ``data/``).

Variants: ``:smoke`` (tiny model on the tiny synthetic world, 2 steps).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.base_config()
  # VIPER has no official val flows; evaluate the target only.
  c.eval.splits = ('target_val',)
  if 'smoke' in args:
    common.smoke(c)
  return c
