"""VIPER -> Cityscapes-Seq with ACCEL-DeepLabv2-ResNet-101 (reference values).

Hyper-parameters follow the released CNN script (docs/reference_code.md,
"Training"):
SGD, momentum 0.9, weight decay 5e-4, base LR 1e-4, poly(0.9) over 250k
steps, x10 LR for the fusion layer and heads, 40k iterations, batch 1 + 1,
seed 1234; lambda_T = 0.2 (hard-coded in the VIPER script), three long-tail
patches per clip. Strong augmentation (blur, colour jitter, grayscale) is on:
the paper makes it the consistency loss's perturbation; the released VIPER
scripts drop it, and their perturbation came from a range bug
(``:reference`` reproduces both, docs/method.md section 7). DA-STC starts
from the TPS checkpoint, converted with ``--head_from_tps``
(``--config.train.init_from=weights/tps_init``, docs/weights.md); without
trained weights the run refuses to start. Prepare the data first (README,
"Datasets")::

  python -m dastc_jax.prepare --dataset=viper \
      --manual_dir=data/Viper --data_dir=data/tfds
  python -m dastc_jax.prepare --dataset=cityscapes_seq \
      --manual_dir=data/Cityscapes --data_dir=data/tfds

Variants: ``:smoke`` (tiny model on the tiny synthetic world, 2 steps),
``:reference`` (the released code's training, bugs included).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.base_config()
  # VIPER has no official val flows; evaluate the target only.
  c.eval.splits = ('target_val',)
  c.dastc.lambda_t = 0.2
  c.dastc.num_rare_classes = 3
  if 'reference' in args:
    common.reference(c)
  if 'smoke' in args:
    common.smoke(c)
  return c
