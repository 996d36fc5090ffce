"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes (image domain) with the transformer model (QuadMix-ViT).

MiT-B5 encoder, DAFormer head (sepaspp, 256), flow-guided score fusion at
output stride 4 for the video pair; the dataset pair and DA-STC settings of
``configs/synthia.py``; the optimisation of the released ViT scripts
(``common.vit``: AdamW 6e-5, x10 decoder, linear warm-up 1500 steps, poly
1.0, 40k steps). Start from ImageNet MiT weights converted with
``python -m dastc_jax.convert --config=configs/synthia_vit.py --source=mit_b5.pth
--output=weights/mit_b5`` (``--config.train.init_from=weights/mit_b5``).
docs/vit.md lists what differs from the released model.

Variants: ``:smoke`` (a test-size MiT on the tiny synthetic world, 2 steps),
``:reference`` (the released code's bug flags and frozen-then-self teacher).
"""

from configs import common
from configs import synthia


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = synthia.get_config()
  common.vit(c, image=True)
  if 'reference' in args:
    common.reference(c)
    c.dastc.teacher_switch_steps = 4000  # the ViT scripts' switch
  if 'smoke' in args:
    common.smoke_images(c)
    common.tiny_vit(c)
  return c
