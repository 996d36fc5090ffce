"""Validation of the config schema (``configs/common.py``), in one place.

Every key with a fixed set of values is in ``CHOICES``, every numeric key
with a range in ``RANGES``, and the rules that tie keys together are in
``check_config``. ``train``, the eval jobs and prediction call
``check_config`` before anything is built or compiled, so a bad value fails
at once with the key's name (a ``ConfigError``, printed without a
traceback). The value lists come from the modules that implement them, so
the two cannot drift apart. A key missing from a config (an older config
file) fails here too, with its name.
"""

from __future__ import annotations

import math
from typing import Any

from absl import logging
import ml_collections

from dastc_jax import errors
from dastc_jax import models
from dastc_jax.data import checked_source
from dastc_jax.data import labels as labels_lib
from dastc_jax.data.datasets import builders
from dastc_jax.data.synthetic import world
from dastc_jax.method import fusion
from dastc_jax.method import pseudo_labels
from dastc_jax.models import accel
from dastc_jax.models import layers
from dastc_jax.runtime import divergence
from dastc_jax.runtime import optim

METHODS = ('dastc', 'source_only', 'source_only_hm', 'target_only')
# The data sections a config may have (eval.splits names some of them).
DOMAINS = ('source', 'target', 'source_val', 'target_val')

CHOICES: dict[str, tuple[Any, ...]] = {
    'method': METHODS,
    'data.class_set': tuple(sorted(labels_lib.CLASS_SETS)),
    'data.on_error': checked_source.POLICIES,
    'data.synthetic.shift': world.SHIFTS,
    'model.name': models.NAMES,
    'model.head': accel.HEADS,
    'model.backbone_init': layers.INITIALIZERS,
    'model.dtype': layers.DTYPES,
    'model.conv_kernel_grad': layers.KERNEL_GRADS,
    'optim.name': optim.OPTIMIZERS,
    'optim.schedule': optim.SCHEDULES,
    'train.nonfinite': divergence.POLICIES,
    'dastc.teacher': pseudo_labels.TEACHERS,
    'dastc.feature_mode': fusion.FEATURE_MODES,
    'dastc.feature_swap_labels': fusion.SWAP_LABELS,
    'dastc.feature_swap_directions': fusion.SWAP_DIRECTIONS,
    'dastc.feature_layer': tuple(
        dict.fromkeys(
            models.shallow_stages('accel_deeplabv2')
            + models.shallow_stages('accel_daformer')
        )
    ),
    'model.mit_variant': models.MIT_VARIANTS,
    'dastc.bn_update': ('fixed', 'all'),
    'dastc.pl_weighting': ('none', 'quality'),
    'dastc.allow_untrained_teacher': (False, True),
    'dastc.alignment.kind': ('contrastive', 'cosine', 'mmd', 'none'),
    'dastc.alignment.feature': ('feat', 'logits'),
    'dastc.alignment.aggregation': ('frames', 'pairs'),
    'dastc.alignment.target_labels': ('teacher', 'student'),
    'dastc.alignment.temporal': ('adaptive', 'uniform'),
    'dastc.alignment.pairs': (1, 2),
    'model.hrda.enabled': (False, True),
    'model.scan_recompute': (False, True),
    'model.hrda.classwise_attention': (False, True),
    'model.hrda.slide_detail': (False, True),
    'dastc.mic.enabled': (False, True),
}

# Inclusive bounds (None: unbounded); keys in OPEN_AT_ZERO must be > 0.
RANGES: dict[str, tuple[float | None, float | None]] = {
    'seed': (0, None),
    'data.num_threads': (1, None),
    'data.prefetch': (0, None),
    'data.num_workers': (0, None),
    'model.num_classes': (1, None),
    'model.width': (1, None),
    'model.head_features': (1, None),
    'model.dropout': (0, 1),
    'model.drop_path_rate': (0, 1),
    'model.bn_momentum': (0, 1),
    'model.bn_group_size': (0, None),
    'model.init_std': (0, None),
    'model.scan_min_blocks': (2, None),
    'optim.lr': (0, None),
    'optim.momentum': (0, 1),
    'optim.weight_decay': (0, None),
    'optim.b1': (0, 1),
    'optim.b2': (0, 1),
    'optim.schedule_steps': (1, None),
    'optim.poly_power': (0, None),
    'optim.warmup_steps': (0, None),
    'optim.warmup_ratio': (0, 1),
    'optim.grad_clip_norm': (0, None),
    'loss.aux_weight': (0, None),
    'train.batch_size': (1, None),
    'train.num_steps': (1, None),
    'train.source_only_steps': (0, None),
    'train.log_every': (1, None),
    'train.checkpoint_every': (1, None),
    'train.eval_every': (0, None),
    'train.max_checkpoints': (1, None),
    'train.max_consecutive_skips': (0, None),
    'eval.batch_size': (1, None),
    'eval.num_overlays': (0, None),
    'mesh.fsdp': (1, None),
    'dastc.lambda_t': (0, None),
    'dastc.ema_decay': (0, 1),
    'dastc.teacher_switch_steps': (0, None),
    'dastc.teacher_flip': (0, 1),
    'dastc.confidence': (0, 1),
    'dastc.pl_threshold': (0, 1),
    'dastc.pl_quality_threshold': (0, 1),
    'dastc.pl_class_balanced': (0, 1),
    'dastc.prior_momentum': (0, 1),
    'dastc.num_source_classes': (0, None),
    'dastc.num_target_classes': (0, None),
    'dastc.num_rare_classes': (0, None),
    'dastc.feature_swap_classes': (0, None),
    'dastc.feature_other_weight': (0, 1),
    'dastc.alignment.weight': (0, None),
    'dastc.alignment.temperature': (0, None),
    'dastc.alignment.margin': (0, None),
    'dastc.alignment.min_pixels': (1, None),
    'dastc.strong_aug.blur_reference_width': (1, None),
    'dastc.strong_aug.blur_kernel': (0, None),  # odd, or 0 (derived)
    'dastc.alignment.temporal_temperature': (0, None),
    'model.hrda.context_scale': (0, 1),
    'model.hrda.crop_divisible': (1, None),
    'model.hrda.detail_loss_weight': (0, 1),
    'model.hrda.attention_features': (1, None),
    'dastc.mic.block_size': (1, None),
    'dastc.mic.ratio': (0, 1),
    'dastc.mic.weight': (0, None),
}
OPEN_AT_ZERO = (
    'optim.lr',
    'model.hrda.context_scale',
    'dastc.alignment.temperature',
    'dastc.alignment.temporal_temperature',
)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise errors.ConfigError(
          f'config.{key} is missing; the schema '
          '(configs/common.py) declares it.'
      )
    node = node[part]
  return node


def _check_choices(config: ml_collections.ConfigDict) -> None:
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise errors.ConfigError(
          f'config.{key}={value!r}; expected one of ' f'{allowed}.'
      )


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  for key, (lo, hi) in RANGES.items():
    value = _get(config, key)
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
    if ok and lo is not None:
      ok = value > lo if key in OPEN_AT_ZERO else value >= lo
    if ok and hi is not None:
      ok = value <= hi
    if not ok:
      low = f'> {lo}' if key in OPEN_AT_ZERO else f'>= {lo}'
      want = f'a number {low}' + (f' and <= {hi}' if hi is not None else '')
      raise errors.ConfigError(f'config.{key}={value!r}; expected {want}.')
  data = _get(config, 'mesh.data')
  if not isinstance(data, int) or (data < 1 and data != -1):
    raise errors.ConfigError(
        f'config.mesh.data={data!r}; expected a '
        'positive device count or -1 (all the rest).'
    )


def _check_domains(config: ml_collections.ConfigDict) -> None:
  """Each data section: a known dataset and split, labels that fit the class
  set, clips the model can take, a crop inside the image."""
  cs = labels_lib.get_class_set(config.data.class_set)
  clip = models.clip_length(config.model)
  for key in DOMAINS:
    if key not in config.data:
      continue
    d = config.data[key]
    if d.dataset not in builders.SPECS:
      raise errors.ConfigError(
          f'config.data.{key}.dataset={d.dataset!r}; expected one of '
          f'{tuple(sorted(builders.SPECS))}.'
      )
    spec = builders.SPECS[d.dataset]
    if d.split not in spec.splits:
      raise errors.ConfigError(
          f'config.data.{key}.split={d.split!r}; '
          f'{spec.name} has splits {spec.splits}.'
      )
    if spec.label_space not in ('cityscapes_ids', cs.name):
      raise errors.ConfigError(
          f'config.data.{key}.dataset={d.dataset!r} is labelled with the '
          f'{spec.label_space} classes, but config.data.class_set='
          f'{cs.name!r}.'
      )
    if key in ('source', 'target') and (spec.clip_length == 1) != (clip == 1):
      raise errors.ConfigError(
          f'config.data.{key}.dataset={d.dataset!r} has clips of '
          f'{spec.clip_length} frame(s); config.model.name='
          f'{config.model.name!r} takes {clip}.'
      )
    if d.label_size not in ('image', 'native'):
      raise errors.ConfigError(
          f'config.data.{key}.label_size='
          f"{d.label_size!r}; expected 'image' or "
          "'native'."
      )
    crop, size = d.crop_size, d.image_size
    if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
      raise errors.ConfigError(
          f'config.data.{key}.crop_size={tuple(crop)} is larger than '
          f'config.data.{key}.image_size={tuple(size)} (H, W).'
      )
    margins = tuple(d.get('pseudo_margins') or (0, 0, 0, 0))
    if len(margins) != 4 or any(
        not isinstance(m, int) or m < 0 for m in margins
    ):
      raise errors.ConfigError(
          f'config.data.{key}.pseudo_margins={margins}; expected four '
          'pixel counts >= 0 (top, bottom, left, right).'
      )
    if any(margins) and key != 'target':
      raise errors.ConfigError(
          f'config.data.{key}.pseudo_margins={margins}: only the training '
          'target (config.data.target) has pseudo-labels.'
      )
    _check_source_sampling(d, key)
  for split in config.eval.splits:
    if split not in config.data or split not in DOMAINS:
      raise errors.ConfigError(
          f'config.eval.splits names {split!r}, which is '
          'not a data section of config.data.'
      )


def _check_source_sampling(d: ml_collections.ConfigDict, key: str) -> None:
  """``cat_max_ratio`` and ``rare_class_sampling`` read the labels of the
  training source's crops."""
  ratio = d.cat_max_ratio
  if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
    raise errors.ConfigError(
        f'config.data.{key}.cat_max_ratio={ratio!r}; expected a share in '
        '(0, 1] (1: off).'
    )
  if ratio < 1 and key != 'source':
    raise errors.ConfigError(
        f'config.data.{key}.cat_max_ratio={ratio}: only the training source '
        '(config.data.source) has labels to choose crops by.'
    )
  rcs = d.rare_class_sampling
  if not rcs.enabled:
    return
  if key != 'source':
    raise errors.ConfigError(
        f'config.data.{key}.rare_class_sampling.enabled=True: only the '
        'training source (config.data.source) is sampled by class.'
    )
  if not rcs.temperature > 0 or rcs.min_pixels < 0 or rcs.min_crop_ratio < 0:
    raise errors.ConfigError(
        f'config.data.{key}.rare_class_sampling: temperature='
        f'{rcs.temperature}, min_pixels={rcs.min_pixels}, min_crop_ratio='
        f'{rcs.min_crop_ratio}; expected temperature > 0 and the others '
        '>= 0.'
    )


def _check_feature_distance(
    config: ml_collections.ConfigDict, cs: labels_lib.ClassSet
) -> None:
  """``dastc.feature_distance``: class names of the class set, a share, and
  an encoder whose last stage tiles the input in whole cells."""
  fd = config.dastc.feature_distance
  if not isinstance(fd.weight, (int, float)) or fd.weight < 0:
    raise errors.ConfigError(
        f'config.dastc.feature_distance.weight={fd.weight!r}; expected a '
        'number >= 0 (0: off).'
    )
  if not fd.weight:
    return
  unknown = [k for k in fd.classes if k not in cs.classes]
  if unknown or not fd.classes:
    raise errors.ConfigError(
        f'config.dastc.feature_distance.classes={tuple(fd.classes)}: '
        f'expected names of {cs.name} classes {cs.classes}'
        + (f'; unknown: {unknown}.' if unknown else '.')
    )
  if not 0 < fd.min_ratio <= 1:
    raise errors.ConfigError(
        f'config.dastc.feature_distance.min_ratio={fd.min_ratio}; expected '
        'a share in (0, 1].'
    )
  if config.model.name not in models.TRANSFORMERS:
    raise errors.ConfigError(
        f'config.dastc.feature_distance.weight={fd.weight} needs a MiT '
        f'encoder ({", ".join(models.TRANSFORMERS)}); config.model.name='
        f"{config.model.name!r} (the Caffe ResNet's last stage does not "
        'tile the input in whole cells).'
    )


def _check_frozen_teacher(config: ml_collections.ConfigDict) -> None:
  """``dastc.frozen_teacher``: a separately trained model for the frozen
  phase of the 'reference' teacher, of the student's clip length."""
  f = config.dastc.frozen_teacher
  if not f.weights:  # model_name/head describe a model that is not used
    return  # (an untrained start is refused by runtime/teacher_start.py)
  if config.dastc.teacher != 'reference':
    raise errors.ConfigError(
        'config.dastc.frozen_teacher.weights is set but config.dastc.teacher='
        f"{config.dastc.teacher!r}; the frozen teacher is the 'reference' "
        "teacher's first phase (config.dastc.teacher='reference')."
    )
  name = f.model_name or config.model.name
  if name not in models.NAMES:
    raise errors.ConfigError(
        f'config.dastc.frozen_teacher.model_name={f.model_name!r}; expected '
        f"'' (the student's) or one of {models.NAMES}."
    )
  if f.head and f.head not in CHOICES['model.head']:
    raise errors.ConfigError(
        f"config.dastc.frozen_teacher.head={f.head!r}; expected '' (the "
        f"student's) or one of {CHOICES['model.head']}."
    )
  if models.clip_length(ml_collections.ConfigDict({'name': name})) != (
      models.clip_length(config.model)
  ):
    raise errors.ConfigError(
        f'config.dastc.frozen_teacher.model_name={name!r} takes clips of '
        'another length than the student '
        f'(config.model.name={config.model.name!r}).'
    )


def _check_blur(config: ml_collections.ConfigDict) -> None:
  for key in ('strong_aug', 'mic.augment'):
    k = _get(config, f'dastc.{key}.blur_kernel')
    if k and k % 2 == 0:
      raise errors.ConfigError(
          f'config.dastc.{key}.blur_kernel={k}; expected an odd number of '
          'taps, or 0 (2 * ceil(3 * sigma) + 1).'
      )


def _check_perturbation(config: ml_collections.ConfigDict) -> None:
  """The consistency loss (weight ``dastc.lambda_t``) compares the student
  on the strong clip with the teacher's labels: without a perturbation the
  strong clip is the clean one and the term teaches nothing."""
  d = config.dastc
  a = d.strong_aug
  if d.lambda_t == 0 or a.wrap_normalized_bug:
    return
  blur = a.p_blur > 0 and a.blur_sigma[1] > 0
  jitter = (
      a.p_jitter > 0 and max(a.brightness, a.contrast, a.saturation, a.hue) > 0
  )
  if not (a.enabled and (blur or jitter or a.p_gray > 0)):
    raise errors.ConfigError(
        f'config.dastc.strong_aug (enabled={a.enabled}, p_blur={a.p_blur}, '
        f'p_jitter={a.p_jitter}, p_gray={a.p_gray}) leaves the strong target '
        'clip equal to the clean one, so the consistency loss '
        f'(config.dastc.lambda_t={d.lambda_t}) sees no perturbation; set '
        'config.dastc.strong_aug.enabled=True with a non-zero probability, '
        'or config.dastc.lambda_t=0.'
    )


def _check_hrda(config: ml_collections.ConfigDict) -> None:
  """The multi-resolution (HRDA) settings."""
  h = config.model.hrda
  if not h.enabled:
    return
  if config.loss.aux_weight != 0:
    raise errors.ConfigError(
        f'config.loss.aux_weight={config.loss.aux_weight} with '
        'config.model.hrda.enabled=True: the multi-resolution model has no '
        'auxiliary head; set config.loss.aux_weight=0.'
    )
  stride = models.output_stride(config.model.name)
  step = stride / h.context_scale
  if h.crop_divisible % step or any(v % step for v in h.detail_crop):
    raise errors.ConfigError(
        f'config.model.hrda.crop_divisible={h.crop_divisible} and '
        f'detail_crop={tuple(h.detail_crop)}: both must be multiples of '
        f'{step:g} (output stride {stride} / context_scale '
        f'{h.context_scale}) so that the detail scores fall on whole cells '
        'of the context grid.'
    )
  for key in ('source', 'target'):
    if key not in config.data:
      continue
    dom = config.data[key]
    size = dom.get('crop_size') or dom.image_size
    if size is not None and any(c > s for c, s in zip(h.detail_crop, size)):
      raise errors.ConfigError(
          f'config.model.hrda.detail_crop={tuple(h.detail_crop)} is larger '
          f"than config.data.{key}'s training input {tuple(size)}."
      )


def _check_slide(config: ml_collections.ConfigDict) -> None:
  """Sliding-window evaluation: image models, both sizes given."""
  e = config.eval
  window, stride = _get(config, 'eval.slide_window'), e.slide_stride
  if window is None and stride is None:
    return
  ok = lambda v: (
      isinstance(v, (tuple, list))
      and len(v) == 2
      and all(isinstance(i, int) and i > 0 for i in v)
  )
  if not (ok(window) and ok(stride)):
    raise errors.ConfigError(
        f'config.eval.slide_window={window!r} and slide_stride={stride!r}; '
        'expected two (H, W) pairs of positive pixels, or both None.'
    )
  if models.clip_length(config.model) != 1:
    raise errors.ConfigError(
        'config.eval.slide_window is for image models '
        f'(config.model.name one of {models.IMAGE_MODELS}); video clips are '
        'segmented whole.'
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, with the key, on config values that cannot work."""
  _check_choices(config)
  _check_ranges(config)
  _check_hrda(config)
  _check_slide(config)
  cs = labels_lib.get_class_set(config.data.class_set)
  if cs.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'config.model.num_classes={config.model.num_classes} but '
        f'config.data.class_set={cs.name!r} has {cs.num_classes} classes.'
    )
  _check_domains(config)
  _check_feature_distance(config, cs)
  if config.data.synthetic.enabled and config.data.data_dir:
    raise errors.ConfigError(
        f'config.data.data_dir={config.data.data_dir!r} has no effect: '
        'config.data.synthetic.enabled=True trains on the built-in synthetic '
        'world. Drop the override, or add '
        '--config.data.synthetic.enabled=False to train on that folder.'
    )
  nwd = _get(config, 'optim.no_weight_decay')
  if not isinstance(nwd, (tuple, list)) or not all(
      isinstance(k, str) and k for k in nwd
  ):
    raise errors.ConfigError(
        f'config.optim.no_weight_decay={nwd!r}; expected a tuple of '
        "parameter-name substrings, e.g. ('norm',)."
    )
  if config.method == 'source_only_hm' and not config.data.histogram_match:
    raise errors.ConfigError(
        "config.method='source_only_hm' needs "
        'config.data.histogram_match=True.'
    )
  if config.method != 'dastc':
    return
  if config.train.source_only_steps >= config.train.num_steps:
    logging.warning(
        'config.train.source_only_steps=%d >= num_steps=%d: no '
        'adaptation step will run.',
        config.train.source_only_steps,
        config.train.num_steps,
    )
  d = config.dastc
  stages = models.shallow_stages(config.model.name)
  if d.feature_layer not in stages:
    raise errors.ConfigError(
        f'config.dastc.feature_layer={d.feature_layer!r}: '
        f'config.model.name={config.model.name!r} exchanges features after '
        f'one of {stages}.'
    )
  # (The DAFormer head of the transformer models always has its pre-logit
  # feature.)
  if (
      config.model.name not in models.TRANSFORMERS
      and config.model.head != 'proda'
  ):
    raise errors.ConfigError(
        f"config.model.head={config.model.head!r}: DA-STC's feature "
        "alignment needs the 'proda' head (a 256-d pre-logit feature); "
        "'aspp' is for evaluating DA-VSN/TPS checkpoints."
    )
  _check_frozen_teacher(config)
  _check_blur(config)
  _check_perturbation(config)
  d = config.dastc
  if d.feature_fusion and not d.image_fusion:
    raise errors.ConfigError(
        'config.dastc.feature_fusion=True needs '
        'config.dastc.image_fusion=True: the shallow '
        'features are exchanged between the two fused '
        'clips.'
    )
  if d.feature_swap_labels == 'kept' and d.feature_mode != 'swap':
    raise errors.ConfigError(
        "config.dastc.feature_swap_labels='kept' (a control) applies to "
        "config.dastc.feature_mode='swap' only; it is "
        f'{d.feature_mode!r}.'
    )
