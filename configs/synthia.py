"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes (image domain, 16 classes; the
mIoU13 of the literature is reported alongside) with DeepLabv2-ResNet-101.

DA-STC with clip length 1 (docs/reference_code.md, "Models"); see
``configs/gta5.py``. Prepare
the data first (README, "Datasets")::

  python -m dastc_jax.prepare --dataset=synthia_rand \\
      --manual_dir=data/RAND_CITYSCAPES --data_dir=data/tfds
  python -m dastc_jax.prepare --dataset=cityscapes \\
      --manual_dir=data/Cityscapes --data_dir=data/tfds

Variants: ``:smoke`` (tiny model on the synthetic world's GTA5-layout copy
scored with the 16 SYNTHIA classes, 2 steps), ``:reference``.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.base_config()
  common.image_domain(c, 'synthia_rand', 'synthia16')
  if 'reference' in args:
    common.reference(c)
  if 'smoke' in args:
    common.smoke_images(c)
  return c
