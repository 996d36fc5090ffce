"""SYNTHIA-Seq -> Cityscapes-Seq with ACCEL-DeepLabv2-ResNet-101.

Reference values (method.md §2.2, §4.7, §4.8): 12 classes trained, 11 scored
(fence dropped), SGD base LR 2.5e-4, lambda_T = 1.0, two long-tail patches
per clip, the full strong augmentation, SYNTHIA frames 1280x760 with the
bottom 120 rows cropped (640x1280). The SYNTHIA-Seq loader comes with the
datasets issue; the ``:smoke`` variant runs on the synthetic world.

Variants: ``:smoke``, ``:reference``.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.base_config()
  c.data.class_set = 'synthia12'
  c.model.num_classes = 12
  c.data.source = common.domain('synthia_seq', 'SynthiaSeq/SEQS-04-DAWN',
                                'estimated_optical_flow_synthiaseq_train',
                                'train', (640, 1280))
  c.data.source_val = common.domain('synthia_seq', 'SynthiaSeq/SEQS-04-DAWN',
                                    'estimated_optical_flow_synthiaseq_train',
                                    'train', (640, 1280))
  c.eval.splits = ('target_val',)
  c.optim.lr = 2.5e-4
  c.dastc.lambda_t = 1.0
  c.dastc.num_rare_classes = 2
  if 'reference' in args:
    common.reference(c)
  if 'smoke' in args:
    common.smoke(c)
  return c
