"""GTA5 -> Cityscapes (image domain, 19 classes) with DeepLabv2-ResNet-101.

DA-STC with clip length 1 (docs/reference_code.md, "Models"): the
image-sequence-level pastes,
the shallow-feature fusion and the category-aware alignment on single
frames; no flow and no temporal terms. Prepare the data first (README,
"Datasets")::

  python -m dastc_jax.prepare --dataset=gta5 \\
      --manual_dir=data/GTA5 --data_dir=data/tfds
  python -m dastc_jax.prepare --dataset=cityscapes \\
      --manual_dir=data/Cityscapes --data_dir=data/tfds

Variants: ``:smoke`` (tiny model on the synthetic world's GTA5-layout copy,
2 steps), ``:reference`` (the released video code's alignment and bug
flags).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.base_config()
  common.image_domain(c, 'gta5', 'cityscapes19')
  if 'reference' in args:
    common.reference(c)
  if 'smoke' in args:
    common.smoke_images(c)
  return c
