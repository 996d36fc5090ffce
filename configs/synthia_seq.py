"""SYNTHIA-Seq -> Cityscapes-Seq with ACCEL-DeepLabv2-ResNet-101.

Reference values (docs/reference_code.md): 12 classes trained, 11 scored
(fence dropped), SGD base LR 2.5e-4, lambda_T = 1.0, two long-tail patches
per clip, the full strong augmentation, SYNTHIA frames 1280x760 with the
bottom 120 rows cut (640x1280, done by the preparation). Prepare the data
first (README, "Datasets")::

  python -m dastc_jax.prepare --dataset=synthia_seq \
      --manual_dir=data/SynthiaSeq/SEQS-04-DAWN --data_dir=data/tfds
  python -m dastc_jax.prepare --dataset=cityscapes_seq \
      --manual_dir=data/Cityscapes --data_dir=data/tfds

SYNTHIA-Seq has no validation split, so only the target is evaluated.

Variants: ``:smoke``, ``:reference``.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.data.class_set = 'synthia12'
  c.model.num_classes = 12
  c.data.source = common.domain('synthia_seq', 'train', (640, 1280))
  del c.data['source_val']
  c.eval.splits = ('target_val',)
  c.optim.lr = 2.5e-4
  c.dastc.lambda_t = 1.0
  c.dastc.num_rare_classes = 2
  if 'reference' in args:
    common.reference(c)
  if 'smoke' in args:
    common.smoke(c)
  return c
