"""The built-in demo: DA-STC on the synthetic domain-shift world.

Runs end to end on 2 CPU cores with no downloads: generates the world
(VIPER-layout source, Cityscapes-Seq-layout target, exact flows), trains a
small DeepLabv2-ResNet ACCEL model on the source (1200 warm-start steps),
adapts it to the unlabelled target with DA-STC (300 steps, pseudo-labels
selected class-balanced), and evaluates on the source and target val
splits.

Variants: ``:smoke`` (tiny world, tiny model, 2 steps).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, known=('smoke',))
  c = common.base_config()
  common.use_synthetic(c)
  c.seed = 0
  # The world is rendered at 144x256 (source) / 128x256 (target); train at
  # half size. Target val labels stay native, as in the real protocol.
  c.data.source.image_size = (72, 128)
  c.data.source_val.image_size = (72, 128)
  c.data.target.image_size = (64, 128)
  c.data.target_val.image_size = (64, 128)
  c.model.layers = (2, 2, 2, 2)
  c.model.width = 16
  c.model.head_features = 64
  # Statistics over the global batch of 4 (the measured demo and benchmark
  # numbers were taken with it).
  c.model.bn_group_size = 0
  # From scratch on a small world: AdamW with warm-up and poly decay.
  c.optim.name = 'adamw'
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 50
  c.optim.lr_mult = dict(backbone=1.0, fusion=1.0, head=1.0)
  c.train.batch_size = 4
  # 1200 source-only warm-start steps, then 300 DA-STC steps; each phase has
  # its own warm-up and poly decay (the schedule follows num_steps).
  c.train.source_only_steps = 1200
  c.train.num_steps = 1500
  c.optim.schedule_steps = c.train.get_ref('num_steps')
  c.train.log_every = 50
  c.train.checkpoint_every = 300
  # DA-STC at this scale: a faster mean teacher and a blur sized for
  # 64x128 frames.
  c.dastc.ema_decay = 0.99
  c.dastc.strong_aug.blur_sigma = (0.1, 1.0)
  c.dastc.strong_aug.blur_reference_width = 128  # pixels of these frames
  c.dastc.strong_aug.blur_kernel = 5
  # Class-balanced pseudo-label selection (CBST's portion 0.5): adopted for
  # this recipe by a rule fixed before its runs (at or above DA-STC without
  # it on every world measured: default, hard, winter, 3 seeds each;
  # docs/benchmarks.md). The dataset configs keep the paper's selection.
  c.dastc.pl_class_balanced = 0.5
  c.eval.batch_size = 8
  c.eval.num_overlays = 6
  c.data.num_threads = 2
  c.data.prefetch = 4
  if 'smoke' in args:
    common.smoke(c)
  return c
