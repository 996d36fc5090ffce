"""Shared config pieces: the full schema with reference defaults.

Every experiment config starts from ``base_config()`` and overrides what its
benchmark needs. Every key a run reads is declared here, so a misspelt
command-line override fails (``lock_config=True``). The allowed values and
ranges of the keys, and the rules between them, are checked in one place,
``dastc_jax/runtime/validation.py``, before anything is built or compiled.
"""

from __future__ import annotations

import ml_collections


def parse_arg(
    arg: str | None, known: tuple[str, ...] = ('reference', 'smoke')
) -> set[str]:
  """``'smoke,reference'`` -> ``{'smoke', 'reference'}`` (big_vision style
  variants); an unknown variant is an error, not silently ignored."""
  args = {a.strip() for a in (arg or '').split(',') if a.strip()}
  unknown = sorted(args - set(known))
  if unknown:
    raise ValueError(
        f'Unknown config variant(s) {unknown} in {arg!r}; this '
        f'config has {sorted(known)}.'
    )
  return args


def domain(
    dataset: str,
    split: str,
    image_size: tuple[int, int] | None,
    *,
    flip: bool = False,
    label_size: str = 'image',
    scale: tuple[float, float] = (1.0, 1.0),
    crop_size: tuple[int, int] | None = None,
    pseudo_margins: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> ml_collections.ConfigDict:
  """A prepared dataset split and how its clips are resized and augmented.

  Args:
    dataset: a prepared dataset (``python -m dastc_jax.prepare
      --dataset=...``): viper, synthia_seq, cityscapes_seq, gta5,
      synthia_rand or cityscapes.
    split: ``train`` or ``val``.
    image_size: ``(H, W)`` network input size; frames and flows are resized
      (None keeps the native size).
    flip: random horizontal flip of the whole clip, frames and flows.
    label_size: ``image`` (labels resized with the frames) or ``native``
      (evaluation at the label's full resolution).
    scale: ``(low, high)`` random rescale of the clip (training only).
    crop_size: ``(H, W)`` random crop of the clip (training only).
    pseudo_margins: ``(top, bottom, left, right)`` pixels at the borders of
      the (resized, rescaled) target frame whose pseudo-labels are ignored
      wherever the crop includes them (HRDA's ``crop_pseudo_margins``:
      the ego vehicle and rectification borders); training target only.

  The returned section also holds ``cat_max_ratio`` (1: off; below 1 a crop
  in which one class covers that share of frame t's labels is redrawn, up
  to 10 times; training source only) and ``rare_class_sampling``
  (DAFormer's RCS, off: ``temperature``, ``min_pixels``,
  ``min_crop_ratio``; training source only; docs/method.md).
  """
  return ml_collections.ConfigDict(
      dict(
          dataset=dataset,
          split=split,
          image_size=image_size,
          flip=flip,
          label_size=label_size,
          scale=scale,
          crop_size=crop_size,
          pseudo_margins=pseudo_margins,
          cat_max_ratio=1.0,
          # DAFormer's values; HRDA raises min_crop_ratio to 2.0.
          rare_class_sampling=dict(
              enabled=False,
              temperature=0.01,
              min_pixels=3000,
              min_crop_ratio=0.5,
          ),
          # False reproduces the reference bug: flipped flows keep their dx
          # sign.
          flip_negate_dx=True,
      )
  )


def synthetic_world(size: str = 'default') -> ml_collections.ConfigDict:
  """The built-in synthetic world; ``size`` is ``default`` or ``tiny``."""
  tiny = size == 'tiny'
  return ml_collections.ConfigDict(
      dict(
          enabled=False,
          cache_dir='~/.cache/dastc_jax',
          num_workers=2,
          seed=0,
          # Target: 'default', 'hard' (per-class materials and local
          # illumination) or 'winter' (a suburb in snow and fog; another
          # object mix); see docs/synthetic_world.md.
          shift='default',
          source_size=(72, 128) if tiny else (144, 256),
          target_size=(64, 128) if tiny else (128, 256),
          source_train_seqs=2 if tiny else 24,
          source_val_seqs=1 if tiny else 4,
          samples_per_seq=3 if tiny else 10,
          target_train_clips=6 if tiny else 240,
          target_val_clips=4 if tiny else 48,
      )
  )


def base_config() -> ml_collections.ConfigDict:
  """Reference (VIPER -> Cityscapes-Seq, ACCEL-DeepLabv2-R101) defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 1234
  # 'dastc' adapts to the target (DA-STC); 'source_only' trains ACCEL on the
  # labelled source and never reads the target; 'source_only_hm' trains on
  # source frames histogram-matched to target frames (the input-level
  # adaptation alone; target labels are never used); 'target_only' is the
  # oracle trained on target labels.
  c.method = 'dastc'

  c.data = ml_collections.ConfigDict()
  # Prepared TFDS datasets (python -m dastc_jax.prepare ...).
  c.data.data_dir = 'data/tfds'
  c.data.class_set = 'viper15'
  c.data.num_threads = 4
  c.data.prefetch = 8
  c.data.num_workers = 0
  # Match the source frames' colour histograms to the target frame (§4.1).
  c.data.histogram_match = True
  # A record that cannot be decoded at run time: 'fail' (the error names the
  # record and the dataset folder) or 'skip' (the next record is used; the
  # count goes to the metrics as data/bad_records_total). Training only.
  c.data.on_error = 'fail'
  c.data.synthetic = synthetic_world()
  c.data.source = domain('viper', 'train', (720, 1280))
  c.data.target = domain('cityscapes_seq', 'train', (512, 1024))
  c.data.source_val = domain('viper', 'val', (720, 1280))
  c.data.target_val = domain(
      'cityscapes_seq', 'val', (512, 1024), label_size='native'
  )

  c.model = ml_collections.ConfigDict(
      dict(
          name='accel_deeplabv2',
          num_classes=15,
          layers=(3, 4, 23, 3),  # ResNet-101
          width=64,
          # 'proda': DA-STC's layer7 (ASPP -> head_features, 1x1 classifier);
          # 'aspp': DA-VSN/TPS's layer6 (ASPP -> classes), to evaluate their
          # released checkpoints.
          head='proda',
          head_features=256,
          # Caffe/DeepLab ResNet (stride on the first 1x1 conv); False = the
          # torchvision layout (stride on the 3x3 conv).
          stride_in_1x1=True,
          aspp_dilations=(6, 12, 18, 24),
          dropout=0.1,
          bn_momentum=0.1,
          # Examples per BatchNorm statistics group: 1 = each example on its own
          # (the reference's batch-1 statistics, on any number of devices);
          # 0 = the whole global batch (synchronised BN).
          bn_group_size=1,
          freeze_bn_affine=True,
          backbone_init='he',  # 'he' from scratch; 'normal' = N(0, init_std)
          init_std=0.01,
          dtype='float32',
          # Kernel gradient of the k > 1 convs: 'auto' (on CPU an im2col matmul
          # for small calls, a convolution for large ones; XLA's backward pass
          # elsewhere), 'conv' or 'im2col'. Same arithmetic, different speed;
          # a run may resume under another value.
          conv_kernel_grad='auto',
          per_axis_flow_scale=False,  # False = the reference H'/H rule
          # Transformer models (name 'accel_daformer' / 'daformer'): the MiT
          # variant, its stochastic depth, and the DAFormer ASPP dilations
          # (head_features is the head's embedding width, dropout its
          # Dropout2d).
          mit_variant='b5',
          drop_path_rate=0.1,
          # Recompute each encoder block (MiT block, ResNet bottleneck) in the
          # backward pass instead of keeping its activations.
          remat=False,
          # Run a stage's identical blocks as one lax.scan whose body is
          # recomputed in the backward pass: one compiled body instead of one
          # per block (same values, same parameter layout; less memory, one
          # more forward of those blocks). See docs/performance.md.
          scan_blocks=False,
          # With scan_blocks: recompute the scanned body in the backward pass
          # (True) or keep every iteration's activations (False: faster,
          # more memory; benchmarks/step_vit.md, benchmarks/memory.md).
          scan_recompute=True,
          # With scan_blocks: scan only runs of at least this many identical
          # blocks (shorter stages run unrolled; MiT-B5's stages have 3, 6,
          # 40 and 3 blocks, ResNet-101's 2, 3, 22 and 2 after each first).
          scan_min_blocks=2,
          daformer_dilations=(1, 6, 12, 18),
          # Multi-resolution training and inference (HRDA, image models): a
          # context pass over the whole input at context_scale and a detail
          # pass over a detail_crop at full resolution (offsets multiples of
          # crop_divisible), fused by a learned scale attention (per class
          # with classwise_attention; a DAFormer head of attention_features
          # channels, or an ASPP sum for DeepLab); the loss adds
          # detail_loss_weight x the detail pass's CE. At evaluation and for
          # pseudo-labels the detail pass slides over the image
          # (slide_detail). docs/method.md, "HRDA and MIC".
          hrda=dict(
              enabled=False,
              context_scale=0.5,
              detail_crop=(512, 512),
              crop_divisible=8,
              detail_loss_weight=0.1,
              classwise_attention=True,
              attention_features=256,
              slide_detail=True,
          ),
      )
  )

  c.optim = ml_collections.ConfigDict(
      dict(
          name='sgd',
          lr=1e-4,
          momentum=0.9,
          weight_decay=5e-4,
          b1=0.9,
          b2=0.999,
          schedule='poly',
          schedule_steps=250000,  # ADVENT MAX_ITERS; training stops at 40k
          poly_power=0.9,
          warmup_steps=0,
          warmup_ratio=1e-6,
          lr_mult=dict(backbone=1.0, fusion=10.0, head=10.0),
          constant_head_lr=False,  # True = reference bug (head LR never decays)
          # Parameters whose path (a/b/c) contains one of these get no weight
          # decay; the transformer presets exempt the MiT LayerNorms ('norm').
          no_weight_decay=(),
          grad_clip_norm=0.0,
      )
  )

  # Weight of the auxiliary head's CE (source-only and DA-STC steps).
  c.loss = ml_collections.ConfigDict(dict(aux_weight=0.1))
  c.dastc = dastc_config()

  c.train = ml_collections.ConfigDict(
      dict(
          batch_size=1,  # global: source clips (and target clips) per step
          num_steps=40000,
          # Source-only steps before adaptation starts (a warm start inside the
          # run; the reference instead starts from a TPS checkpoint).
          source_only_steps=0,
          # Start from another run's weights (a checkpoint step folder, a
          # checkpoint root or a workdir); optimizer state starts fresh.
          init_from='',
          log_every=50,
          checkpoint_every=1000,
          eval_every=0,  # 0 = evaluate only at the end
          max_checkpoints=3,
          # A non-finite loss or gradient: 'stop' the run, or 'skip' the step
          # (state unchanged; more than max_consecutive_skips in a row stop).
          nonfinite='stop',
          max_consecutive_skips=10,
      )
  )

  c.eval = ml_collections.ConfigDict(
      dict(
          batch_size=1,
          splits=('target_val',),
          num_overlays=4,
          # Image models: segment the image in overlapping windows of
          # slide_window (H, W) pixels every slide_stride pixels, averaging
          # the scores where they overlap (the HRDA configs' 1024x1024
          # windows every 512); None: the whole image at once.
          slide_window=None,
          slide_stride=None,
      )
  )

  # Devices: data x fsdp (data=-1: all the rest). fsdp > 1 shards the
  # parameters and optimizer state over that axis.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return c


def dastc_config() -> ml_collections.ConfigDict:
  """DA-STC (docs/method.md): the paper-faithful defaults."""
  return ml_collections.ConfigDict(
      dict(
          # weight of the target terms (VIPER: 0.2); the aux heads' weight
          # is loss.aux_weight, as in source-only training.
          lambda_t=1.0,
          # 'ema' mean teacher or 'reference' (frozen, then self)
          teacher='ema',
          ema_decay=0.999,
          teacher_switch_steps=8000,  # 'reference': frozen teacher this long
          # DA-STC refuses to start when the model that labels its first step
          # has an initialised head (no train.init_from with a trained head,
          # no train.source_only_steps warm-up, no trained frozen teacher);
          # True runs it anyway (docs/method.md, "Where the first pseudo-labels
          # come from").
          allow_untrained_teacher=False,
          # The 'reference' teacher's frozen phase. weights='': the run's own
          # weights when adaptation starts. Otherwise a weights folder (e.g. the
          # released TPS model converted with model.head='aspp', as the released
          # scripts use) of the model built from `model` with `model_name` and
          # `head` replaced ('' keeps the student's).
          frozen_teacher=dict(weights='', model_name='', head=''),
          # Probability of mirroring the teacher's input pair (reference: 0.5).
          teacher_flip=0.0,
          confidence=0.9,  # probability threshold of the pasted T' regions
          # Pseudo-labels below this probability are ignored by the losses
          # (0: the reference's hard labels on every pixel).
          pl_threshold=0.0,
          # Class-balanced selection (CBST): per class, keep this portion of
          # its pseudo-labelled pixels in the batch, the most confident; the
          # rest are ignored by the losses (0: off, the reference).
          pl_class_balanced=0.0,
          # 'quality': DAFormer's weighting. Each target clip's pseudo-label
          # losses (consistency, target-context mix) are weighted by the
          # share of its pixels whose teacher probability reaches
          # pl_quality_threshold; 'none': weight 1 (the reference).
          pl_weighting='none',
          pl_quality_threshold=0.968,
          # Pseudo-label distribution alignment: shift the teacher's scores by
          # log(source class prior / running target prediction prior), so that
          # one class cannot swallow others (see docs/method.md).
          pl_distribution_alignment=True,
          prior_momentum=0.99,
          # Image-sequence-level fusion (QuadMix pastes).
          image_fusion=True,
          num_source_classes=2,  # random S' classes per clip
          num_target_classes=2,  # random T' classes per clip
          num_rare_classes=3,  # long-tail patches per clip (SYNTHIA: 2)
          # Shallow-feature-level fusion (inactive in the released code):
          # 'swap' exchanges current-iteration class regions between the two
          # fused clips after `feature_layer`; 'blend' is the reference decoder
          # variant's 0.7 own + 0.3 other inside the fused mask; 'pixel_swap'
          # (a control) moves the regions of 'swap' as input pixels.
          feature_fusion=True,
          feature_mode='swap',
          feature_layer='layer1',  # 'stem', 'layer1', 'layer2' or 'layer3'
          feature_swap_classes=2,  # classes per direction and clip ('swap')
          # 'both', or one direction only: 'to_target' (source features into
          # the target-context clip) or 'to_source'.
          feature_swap_directions='both',
          # Controls (docs/benchmarks.md): 'kept' leaves the receiving clip's
          # labels and flows under the exchanged features; feature_mode
          # 'pixel_swap' moves the same regions as input pixels instead.
          feature_swap_labels='exchanged',
          feature_other_weight=0.3,  # 'blend': weight of the other clip
          # BatchNorm running averages: 'fixed' = from the source and strong
          # target passes only (the same in every ablation); 'all' = every
          # train-mode pass, as the released code.
          bn_update='fixed',
          # Strong augmentation of the target pair (the consistency loss's
          # perturbation). The blur sigma is in pixels of an image
          # blur_reference_width wide, scaled to the clip's width: the released
          # code blurs the 1024-wide pair with a PIL radius (= sigma) of 5-9.
          # blur_kernel=0: 2 * ceil(3 * sigma) + 1 taps.
          strong_aug=dict(
              enabled=True,
              p_blur=0.6,
              p_jitter=0.8,
              p_gray=0.2,
              brightness=0.8,
              contrast=0.8,
              saturation=0.8,
              hue=0.2,
              blur_sigma=(5.0, 9.0),
              blur_reference_width=1024,
              blur_kernel=0,
              wrap_normalized_bug=False,
          ),  # True: the reference's [0,1] wrap
          # Masked image consistency (MIC): the target clip, colour-
          # augmented (``augment``: the DACS strong transform, colour jitter
          # 0.2 with probability 0.8, Gaussian blur sigma 0.15-1.15 px with
          # probability 0.5, no grayscale) and masked in blocks of
          # block_size px (ratio of them hidden), is trained against the
          # pseudo-labels of the unmasked clip, weighted like them, with
          # weight x its CE (docs/method.md, "HRDA and MIC").
          mic=dict(
              enabled=False,
              block_size=64,
              ratio=0.7,
              weight=1.0,
              augment=dict(
                  enabled=True,
                  p_blur=0.5,
                  p_jitter=0.8,
                  p_gray=0.0,
                  brightness=0.2,
                  contrast=0.2,
                  saturation=0.2,
                  hue=0.2,
                  blur_sigma=(0.15, 1.15),
                  blur_reference_width=2048,
                  blur_kernel=0,
                  wrap_normalized_bug=False,
              ),
          ),
          # ImageNet feature distance (DAFormer's FD; the HRDA image
          # configs): the student's last encoder stage pulled towards that
          # of the encoder as it started (the ImageNet weights), at the
          # feature cells whose pixels are at least min_ratio one of
          # `classes` (names of the class set); weight x FD, 0: off.
          feature_distance=dict(weight=0.0, classes=(), min_ratio=0.75),
          alignment=dict(
              # 'contrastive'; 'cosine' (intra-class pull only); 'mmd'
              # (reference); 'none'
              kind='contrastive',
              weight=0.1,
              feature='feat',  # 'feat' (256-d pre-logit) or 'logits' (C-d)
              temperature=0.1,
              margin=0.2,
              min_pixels=5,
              pairs=2,  # target passes: (t, t-1) [and the clean (t, t-2)]
              # 'frames': per-class prototypes over frames t, t-1, t-2, each
              # pooled with its own labels; 'pairs': the reference's per-pair
              # fused outputs with self-labels.
              aggregation='frames',
              # Class membership of target pixels ('frames'): the teacher's
              # labels of each frame, or the student's own argmax.
              target_labels='teacher',
              # 'adaptive': per class and frame, softmax(reliability / tau)
              # ('pairs': softmax(-entropy / tau) per pair); 'uniform'.
              temporal='adaptive',
              temporal_temperature=0.1,
              detach_source=False,
          ),
          # Reference bugs, reproducible one by one (docs/method.md, section 7).
          bugs=dict(
              confidence_from_logit=False,
              unclipped_lt_mask=False,
              flow_mix_key_masks=False,
              # Teacher mirror: keep the flow's dx sign; warp the mirrored
              # scores and mirror the label maps afterwards.
              flip_keep_dx=False,
              warp_before_unflip=False,
              # Temporal prototype = sum_i w_i p_i with zero rows.
              zero_rows_in_temporal_mean=False,
          ),
      )
  )


def reference(c: ml_collections.ConfigDict) -> None:
  """The released code's training: RBF-MMD on class-mean logits (weight
  0.01, uniform temporal weights), no feature-level fusion, the frozen-
  then-self teacher, and every reference bug flag on."""
  d = c.dastc
  d.teacher = 'reference'
  d.teacher_flip = 0.5
  # The released video scripts' frozen teacher is the TPS model (ACCEL-
  # DeepLabv2, layer6 head); the user gives its converted weights as
  # dastc.frozen_teacher.weights (docs/weights.md).
  video = c.model.name in ('accel_deeplabv2', 'accel_daformer')
  d.frozen_teacher.model_name = 'accel_deeplabv2' if video else 'deeplabv2'
  d.frozen_teacher.head = 'aspp'
  d.feature_fusion = False
  d.pl_distribution_alignment = False
  d.bn_update = 'all'
  d.alignment.kind = 'mmd'
  d.alignment.aggregation = 'pairs'
  d.alignment.target_labels = 'student'
  d.alignment.weight = 0.01
  d.alignment.feature = 'logits'
  d.alignment.temporal = 'uniform'
  d.strong_aug.wrap_normalized_bug = True
  if c.data.source.dataset == 'viper':
    # The released VIPER scripts (CNN and ViT) drop blur, jitter and
    # grayscale; their only perturbation is the [0, 1] wrap above.
    d.strong_aug.enabled = False
  d.bugs.confidence_from_logit = True
  d.bugs.unclipped_lt_mask = True
  d.bugs.flow_mix_key_masks = True
  d.bugs.flip_keep_dx = True
  d.bugs.warp_before_unflip = True
  d.bugs.zero_rows_in_temporal_mean = True
  c.optim.constant_head_lr = True
  for key in ('source', 'target'):
    c.data[key].flip_negate_dx = False


def vit(c: ml_collections.ConfigDict, image: bool = False) -> None:
  """The transformer model (MiT-B5 + DAFormer head, QuadMix-ViT) with the
  released ViT scripts' optimisation: AdamW 6e-5 (weight decay 0.01), x10
  for the decoder and the fusion layer, a 1500-step linear warm-up from
  1e-6 x then poly(1.0) to 40k steps, batch 1 + 1."""
  c.model.name = 'daformer' if image else 'accel_daformer'
  c.model.mit_variant = 'b5'
  c.model.drop_path_rate = 0.1
  c.model.head_features = 256
  c.model.dropout = 0.1
  c.model.daformer_dilations = (1, 6, 12, 18)
  c.model.freeze_bn_affine = False  # the decoder's BatchNorms train
  # MiT-B5's 3, 6, 40 and 3 blocks as scans: the real-size DA-STC step
  # compiles in about 4 minutes on 2 CPU cores; unrolled it did not finish
  # within 30 minutes (benchmarks/memory.md).
  c.model.scan_blocks = True
  # Video: batch 1 + 1 (per-example statistics); image: over the batch.
  c.model.bn_group_size = 0 if image else 1
  c.loss.aux_weight = 0.0  # no auxiliary head
  c.dastc.feature_layer = 'c1'
  c.optim.name = 'adamw'
  c.optim.lr = 6e-5
  c.optim.weight_decay = 0.01
  c.optim.no_weight_decay = ('norm',)  # every MiT LayerNorm
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.lr_mult = dict(backbone=1.0, fusion=10.0, head=10.0)
  c.optim.schedule = 'poly'
  c.optim.poly_power = 1.0
  c.optim.warmup_steps = 1500
  c.optim.warmup_ratio = 1e-6
  c.optim.schedule_steps = 40000
  c.train.num_steps = 40000
  # The decode head starts initialised (ImageNet MiT weights cover the
  # encoder only): 1000 source-only steps train it before the EMA teacher
  # labels anything; each phase has its own warm-up and poly decay.
  c.train.source_only_steps = 1000


def vit_config(
    base, arg: str | None, image: bool = False
) -> ml_collections.ConfigDict:
  """A ``*_vit.py`` config: ``base``'s dataset pair and DA-STC settings with
  the transformer model (``vit``). ``:smoke``: a test-size MiT on the tiny
  synthetic world, 2 steps. ``:reference``: the released code's bug flags
  and the frozen-then-self teacher with the ViT scripts' 4000-step switch.
  Start from ImageNet MiT weights: ``python -m dastc_jax.convert
  --config=configs/viper_vit.py --source=mit_b5.pth --output=weights/mit_b5``
  then ``--config.train.init_from=weights/mit_b5``."""
  args = parse_arg(arg)
  c = base.get_config()
  vit(c, image=image)
  if 'reference' in args:
    reference(c)
    c.dastc.teacher_switch_steps = 4000  # the ViT scripts' switch
    # The frozen (TPS) teacher labels the first steps: no head warm-up,
    # as released (its weights are required, runtime/teacher_start.py).
    c.train.source_only_steps = 0
    # The released ViT scripts align the strong pair only (no clean
    # (t, t-2) pass).
    c.dastc.alignment.pairs = 1
    # The ViT scripts schedule every group alike (the CNN script's constant
    # head LR is not in them).
    c.optim.constant_head_lr = False
  if 'smoke' in args:
    if image:
      smoke_images(c)
    else:
      smoke(c)
    tiny_vit(c)
  return c


def hrda_config(
    base, arg: str | None, video: bool = False
) -> ml_collections.ConfigDict:
  """A ``*_hrda.py`` config: the image-domain QuadMix model on ``base``'s
  dataset pair: MiT-B5 + DAFormer head (``vit``) trained at high
  resolution with HRDA (a 0.5-scale context pass over the 1024x1024 crop,
  a 512x512 detail crop, class-wise scale attention, detail loss 0.1) and
  MIC (64-px blocks, ratio 0.7, weight 1), DACS's quality-weighted
  pseudo-labels (threshold 0.968) and EMA 0.999, for images DAFormer's
  rare-class sampling (min crop ratio 2.0) and crops without a dominant
  class (0.75) of the source, plus DA-STC's image-level fusion and
  alignment. The released configs resize GTA5 to 2560x1440 and
  Cityscapes to 2048x1024; docs/method.md ("HRDA and MIC") lists what is
  not reproduced. ``:smoke``: the tiny MiT on the synthetic world with a
  16x24 detail crop and 16-px MIC blocks (images: a 64x64 source crop of
  the upsampled world, rare-class sampling from every record holding the
  class), 2 steps."""
  args = parse_arg(arg)
  c = base.get_config()
  vit(c, image=not video)
  source = c.data.source.dataset
  # Twice the single-scale configs' source size (GTA5 and VIPER 720x1280,
  # SYNTHIA 760x1280, SYNTHIA-Seq 640x1280), as the HRDA configs do for
  # images.
  hr_source = {
      'gta5': (1440, 2560),
      'viper': (1440, 2560),
      'synthia_seq': (1280, 2560),
  }.get(source, (1520, 2560))
  target = 'cityscapes_seq' if video else 'cityscapes'
  c.data.source = domain(source, 'train', hr_source, crop_size=(1024, 1024))
  # HRDA's pseudo-label margins on the 2048x1024 Cityscapes frame: the top
  # 30 rows, the bottom 240 (the ego vehicle) and 30 columns at each side.
  c.data.target = domain(
      target,
      'train',
      (1024, 2048),
      crop_size=(1024, 1024),
      pseudo_margins=(30, 240, 30, 30),
  )
  c.data.target_val = domain(target, 'val', (1024, 2048), label_size='native')
  if video and 'source_val' in c.data:
    c.data.source_val = domain(source, 'val', hr_source)
  h = c.model.hrda
  h.enabled = True
  h.context_scale = 0.5
  h.detail_crop = (512, 512)
  h.crop_divisible = 8
  h.detail_loss_weight = 0.1
  h.classwise_attention = True
  h.attention_features = 256
  h.slide_detail = True
  c.loss.aux_weight = 0.0
  m = c.dastc.mic
  m.enabled = True
  m.block_size = 64
  m.ratio = 0.7
  m.weight = 1.0
  m.augment.blur_reference_width = 2048  # sigma in pixels of the frame
  if not video:
    # The released image configs: crops without a dominant class, and
    # rare-class sampling with HRDA's min_crop_ratio (2.0 for the 1024x1024
    # crop at twice the resolution, DAFormer 0.5).
    c.data.source.cat_max_ratio = 0.75
    rcs = c.data.source.rare_class_sampling
    rcs.enabled = True
    rcs.temperature = 0.01
    rcs.min_pixels = 3000
    rcs.min_crop_ratio = 2.0
    # DAFormer's feature distance on the "thing" classes.
    fd = c.dastc.feature_distance
    fd.weight = 0.005
    # SYNTHIA has no truck and no train.
    missing = {'synthia16': ('truck', 'train')}.get(c.data.class_set, ())
    fd.classes = tuple(k for k in THING_CLASSES if k not in missing)
    fd.min_ratio = 0.75
  c.dastc.pl_weighting = 'quality'
  c.dastc.pl_quality_threshold = 0.968
  c.dastc.ema_decay = 0.999
  if not video:  # video clips are segmented whole
    c.eval.slide_window = (1024, 1024)
    c.eval.slide_stride = (512, 512)
  if 'smoke' in args:
    if video:
      smoke(c)
      c.data.source.crop_size = c.data.target.crop_size = (32, 48)
    else:
      smoke_images(c)
      # A source crop whose context pass (32x32) tiles MiT's last stage in
      # whole cells, as the feature distance needs (the tiny world is
      # upsampled).
      c.data.source.image_size = (64, 96)
      c.data.source.crop_size = (64, 64)
      c.data.source.cat_max_ratio = 0.75
      rcs = c.data.source.rare_class_sampling
      rcs.enabled = True
      # The tiny world's frames hold a few hundred pixels of a class.
      rcs.min_pixels = 0
      rcs.min_crop_ratio = 2.0
      c.eval.slide_window = (32, 48)
      c.eval.slide_stride = (16, 24)
    tiny_vit(c)
    c.data.target.pseudo_margins = (2, 6, 2, 2)
    h.detail_crop = (16, 24)
    h.attention_features = 16
    m.block_size = 16
  return c


# DAFormer's feature-distance classes (Cityscapes train ids 6, 7, 11-18).
THING_CLASSES = (
    'light',
    'sign',
    'person',
    'rider',
    'car',
    'truck',
    'bus',
    'train',
    'motorcycle',
    'bicycle',
)


def tiny_vit(c: ml_collections.ConfigDict) -> None:
  """Shrinks the transformer to a test-size MiT of the same structure."""
  c.model.mit_variant = 'tiny'
  c.model.head_features = 16
  c.model.daformer_dilations = (1, 6)  # a plain and a separable branch


def tiny_model(c: ml_collections.ConfigDict) -> None:
  """Shrinks the model to a test-size ResNet of the same structure."""
  c.model.layers = (1, 1, 1, 1)
  c.model.width = 8
  c.model.head_features = 16
  c.model.aspp_dilations = (6, 12)  # two summed branches (fast compiles)


def use_synthetic(c: ml_collections.ConfigDict, size: str = 'default') -> None:
  """Points all data at the built-in synthetic world (native sizes)."""
  world = synthetic_world(size)
  world.enabled = True
  c.data.synthetic = world
  c.data.data_dir = ''  # filled in with the world's prepared TFDS folder
  c.data.class_set = 'viper15'
  c.model.num_classes = 15
  c.data.source = domain('viper', 'train', None)
  c.data.source_val = domain('viper', 'val', None)
  c.data.target = domain('cityscapes_seq', 'train', None)
  c.data.target_val = domain('cityscapes_seq', 'val', None, label_size='native')
  c.eval.splits = ('source_val', 'target_val')


def smoke(c: ml_collections.ConfigDict) -> None:
  """A seconds-long CPU run on a tiny world: 2 steps, tiny model.

  The LR schedule keeps the full run's length (a config that ties it to
  ``train.num_steps`` is untied), so smoke runs of any length compile the
  same step program (the persistent compilation cache then serves them).
  """
  steps = int(c.optim.schedule_steps)
  del c.optim['schedule_steps']  # drops a reference to train.num_steps
  c.optim.schedule_steps = steps
  tiny_model(c)
  use_synthetic(c, 'tiny')
  c.data.synthetic.num_workers = 1
  c.data.num_threads = 2
  c.data.prefetch = 2
  c.train.batch_size = 4
  c.train.num_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 1
  c.train.max_checkpoints = 5
  c.eval.batch_size = 4
  c.eval.num_overlays = 2
  c.optim.warmup_steps = 0
  c.train.source_only_steps = 1 if c.method == 'dastc' else 0
  for key, size in (
      ('source', (40, 72)),
      ('source_val', (40, 72)),
      ('target', (32, 64)),
      ('target_val', (32, 64)),
  ):
    c.data[key].image_size = size
  c.dastc.strong_aug.blur_kernel = 3


def image_domain(
    c: ml_collections.ConfigDict, source: str, class_set: str
) -> None:
  """DA-STC on images (clip length 1, no flow, no temporal terms).

  The released image code builds on HRDA + MIC (docs/reference_code.md,
  "Models"); those
  multi-resolution and masking parts are not part of DA-STC and are not
  reproduced. The settings follow its DACS/DAFormer base without HRDA:
  source resized to 720x1280, Cityscapes to 512x1024, random 512x512 crops,
  AdamW 6e-5 with x10 heads, 1500 warm-up steps then poly(1), batch 2, 40k
  steps, an EMA teacher (0.999).
  """
  num = {'cityscapes19': 19, 'synthia16': 16}[class_set]
  c.data.class_set = class_set
  c.model.num_classes = num
  c.model.name = 'deeplabv2'
  c.data.source = domain(source, 'train', (720, 1280), crop_size=(512, 512))
  c.data.target = domain(
      'cityscapes', 'train', (512, 1024), crop_size=(512, 512)
  )
  c.data.target_val = domain(
      'cityscapes', 'val', (512, 1024), label_size='native'
  )
  del c.data['source_val']
  c.eval.splits = ('target_val',)
  c.optim.name = 'adamw'
  c.optim.lr = 6e-5
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 1500
  c.optim.poly_power = 1.0
  c.optim.schedule_steps = c.train.get_ref('num_steps')
  c.optim.lr_mult = dict(backbone=1.0, fusion=10.0, head=10.0)
  c.train.batch_size = 2
  c.train.num_steps = 40000
  c.dastc.teacher = 'ema'
  c.dastc.ema_decay = 0.999
  # From ImageNet weights the head is initialised: 1000 source-only steps
  # train it before the EMA teacher labels anything.
  c.train.source_only_steps = 1000
  c.dastc.lambda_t = 1.0
  c.dastc.alignment.pairs = 1
  c.dastc.num_rare_classes = 2


def smoke_images(c: ml_collections.ConfigDict) -> None:
  """``smoke`` for the image domain: the tiny world's GTA5- and
  Cityscapes-layout copies (the class set stays the config's)."""
  class_set, classes = c.data.class_set, c.model.num_classes
  smoke(c)
  c.data.class_set, c.model.num_classes = class_set, classes
  c.data.source = domain('gta5', 'train', (40, 72), crop_size=(32, 48))
  c.data.target = domain('cityscapes', 'train', (32, 64), crop_size=(32, 48))
  c.data.target_val = domain('cityscapes', 'val', (32, 64), label_size='native')
  del c.data['source_val']
  c.eval.splits = ('target_val',)
