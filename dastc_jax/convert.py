"""PyTorch -> Flax weight conversion: released checkpoints and ImageNet nets.

  python -m dastc_jax.convert --config=configs/viper.py \
      --source=tps_viper2city_pretrained.pth --output=weights/tps_viper \
      --config.model.head=aspp
  python -m dastc_jax.convert --source=raft_large_C_T_SKHT_V2-ff5fadd5.pth \
      --output=weights/raft_large

torchvision RAFT files (optical flow, ``dastc_jax/flow/``) are recognised by
their keys and need no ``--config``.

Five layouts of a PyTorch ``state_dict`` map onto the parameters of
``dastc_jax.models`` (``--layout=auto`` picks one from the keys): the three
CNN layouts below, and the transformer's ``mit`` (an ImageNet MiT encoder,
the mmseg/SegFormer file) and ``quadmix_vit`` (the released QuadMix-ViT
video model), described in docs/vit.md.

* ``accel``: the reference ACCEL-DeepLabv2 (DA-VSN / TPS / DA-STC released
  checkpoints): ``conv1``, ``bn1``, ``layer1..4`` (``downsample.0/1``), aux
  head ``layer5.conv2d_list.i``, TPS head ``layer6.conv2d_list.i``
  (``model.head='aspp'``), DA-STC head ``layer7.conv2d_list.i`` +
  ``layer7.head.1`` (``model.head='proda'``; files that name it
  ``layer7.classifier`` are read too), ``sf_layer``.
* ``caffe``: the Caffe-converted DeepLab ResNet-101 that DA-VSN/TPS start
  from (optional ``Scale.`` prefix; its COCO classifier ``layer5`` is
  dropped). Same input convention as ours (BGR, mean-subtracted, 0-255).
* ``torchvision``: ``torchvision.models.resnet101`` weights (``fc`` dropped).
  Those nets read RGB in [0, 1] normalised by the ImageNet mean/std; the
  conversion folds that normalisation into ``conv1`` (channel order and
  scale, exactly) and into ``bn1``'s running mean (the constant shift; exact
  away from the 3-pixel zero-padded border). Their stride sits on the 3x3
  conv: set ``model.stride_in_1x1=False`` to match.

Loading is safe: ``torch.load(weights_only=True)`` (no arbitrary unpickling)
or safetensors. A ``module.`` prefix (DataParallel) and ``state_dict`` /
``model`` wrappers are removed. Every missing, unexpected and shape-
mismatched key is reported by name. Parameters the file lacks keep this
config's initialisation only where ``allow_missing`` says so (by default:
heads and ``sf_layer`` for the ImageNet layouts; nothing for ``accel``).

The output is an orbax checkpoint (step 0, item ``state`` holding
``params`` and ``batch_stats``) plus ``conversion.json``; it is accepted by
``config.train.init_from`` and by ``--mode=eval --checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from dastc_jax import errors
from dastc_jax import flag_errors
from dastc_jax import paths
from dastc_jax import weight_files
from dastc_jax.runtime import checkpointing

LAYOUTS = (
    'auto',
    'accel',
    'caffe',
    'torchvision',
    'mit',
    'quadmix_vit',
    'hrda',
)
# Keys each layout drops silently (not part of any of our models).
_IGNORED = {
    'accel': (r'.*num_batches_tracked$',),
    'caffe': (r'.*num_batches_tracked$', r'^layer5\.'),
    'torchvision': (r'.*num_batches_tracked$', r'^fc\.'),
}
# Our parameters that an ImageNet backbone cannot provide.
_NON_BACKBONE = ('aux_head/', 'head/', 'sf_layer/')
# torchvision's input normalisation (RGB in [0, 1]) and ours (BGR, 0-255).
_TV_MEAN = np.array([0.485, 0.456, 0.406])
_TV_STD = np.array([0.229, 0.224, 0.225])
_CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434])


ConversionError = weight_files.ConversionError
load_state_dict = weight_files.load_state_dict


@dataclasses.dataclass
class Report:
  """What a conversion matched, dropped and initialised."""

  source: str
  layout: str
  converted: list[str]
  missing_initialised: list[str]
  ignored: list[str]
  notes: list[str]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------ mapping
def detect_layout(keys: Sequence[str]) -> str:
  """The layout (``LAYOUTS``) of a state_dict, from its keys."""
  keys = set(keys)
  if any(
      k.endswith('decode_head.scale_attention.conv_seg.weight') for k in keys
  ):
    return 'hrda'
  if 'patch_embed1.proj.weight' in keys:
    return 'mit'
  if 'model.patch_embed1.proj.weight' in keys:
    return 'quadmix_vit'
  if any(k.startswith('Scale.') for k in keys):
    return 'caffe'
  if 'fc.weight' in keys:
    return 'torchvision'
  if any(
      k.startswith(('layer5.', 'layer6.', 'layer7.', 'sf_layer')) for k in keys
  ):
    return 'accel'
  return 'caffe'  # a bare backbone


_BN = {
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
}


def torch_name(path: str, head: str = 'proda') -> str:
  """The reference ``state_dict`` key of one of our parameter paths.

  ``backbone/layer3/4/conv2/kernel`` -> ``layer3.4.conv2.weight``,
  ``head/aspp/branches/1/bias`` -> ``layer7.conv2d_list.1.bias``.
  """
  parts = path.split('/')
  leaf = parts[-1]
  if parts[0] == 'backbone':
    mods = parts[1:-1]
    mods = [
        {
            'downsample_conv': 'downsample.0',
            'downsample_bn': 'downsample.1',
        }.get(m, m)
        for m in mods
    ]
    base = '.'.join(mods)
    is_bn = mods[-1].startswith('bn') or mods[-1] == 'downsample.1'
    return f'{base}.{_BN[leaf] if is_bn else "weight"}'
  param = 'weight' if leaf == 'kernel' else leaf
  if parts[0] == 'aux_head':  # aux_head/branches/i/...
    return f'layer5.conv2d_list.{parts[2]}.{param}'
  if parts[0] == 'sf_layer':
    return 'sf_layer.weight'
  if parts[0] == 'head':
    name = 'layer7' if head == 'proda' else 'layer6'
    if parts[1] == 'classifier':  # head = Sequential(Dropout2d, Conv2d)
      return f'{name}.head.1.weight'
    return f'{name}.conv2d_list.{parts[3]}.{param}'  # head/aspp/branches/i
  raise KeyError(path)


def _to_ours(name: str, value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel':
    if value.ndim != 4:
      raise ConversionError(
          f'{name}: expected a 4-D conv weight (O, I, kH, '
          f'kW), got shape {value.shape}.'
      )
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  return value


def _fold_torchvision_input(sd: dict[str, np.ndarray]) -> None:
  """Makes torchvision's conv1/bn1 read our BGR, mean-subtracted input."""
  w = sd['conv1.weight']  # [O, 3 (RGB), 7, 7]
  # x_tv[c] = (x_ours[2 - c] + caffe_mean_bgr[2 - c]) / 255 / std[c]
  #           - mean[c] / std[c]
  scale = 1.0 / (255.0 * _TV_STD)
  shift = (_CAFFE_MEAN_BGR[::-1] / 255.0 - _TV_MEAN) / _TV_STD
  sd['conv1.weight'] = (w * scale[None, :, None, None])[:, ::-1].astype(
      np.float32
  )
  # The constant shift adds sum(W * shift) to every conv1 output (away from
  # the zero padding): move it into bn1's running mean.
  const = np.einsum('ochw,c->o', w, shift)
  if 'bn1.running_mean' in sd:
    sd['bn1.running_mean'] = (sd['bn1.running_mean'] - const).astype(np.float32)


def convert_state_dict(
    sd: dict[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    layout: str = 'auto',
    allow_missing: Sequence[str] | None = None,
    allow_unexpected: Sequence[str] = (),
    source: str = '<memory>',
    seed: int = 0,
    head_from_tps: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], Report]:
  """Maps a PyTorch ``state_dict`` onto this config's model.

  Args:
    sd: name -> array (``load_state_dict``).
    model_config: ``config.model``.
    layout: one of :data:`LAYOUTS`.
    allow_missing: path prefixes of our parameters that may be absent from
      ``sd`` (they keep the model's initialisation). None = the layout's
      default (heads and ``sf_layer`` for ImageNet layouts, else nothing).
    allow_unexpected: regexes of ``sd`` keys that may be left unused.
    source: name of the file, for messages.
    seed: initialisation seed of the parameters that are not converted.
    head_from_tps: build DA-STC's ``layer7`` head from a TPS file's
      ``layer6`` so that the model predicts exactly what TPS predicts
      (:func:`_head_from_tps`).

  Returns:
    ``(params, batch_stats, report)`` as float32 numpy trees.

  Raises:
    ConversionError: listing missing, unexpected and mismatched keys.
  """
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  if layout not in LAYOUTS:
    raise ConversionError(
        f'Unknown layout {layout!r}; expected one of ' f'{LAYOUTS}.'
    )
  if layout == 'auto':
    layout = detect_layout(list(sd))
  if layout in ('mit', 'quadmix_vit', 'hrda'):
    return convert_transformer(
        sd,
        model_config,
        layout,
        source=source,
        seed=seed,
        allow_unexpected=allow_unexpected,
    )
  sd = {
      k[len('Scale.') :] if k.startswith('Scale.') else k: v
      for k, v in sd.items()
  }
  notes = []
  # Our earlier PyTorch restatement named the DA-STC classifier
  # `layer7.classifier`; the released checkpoints hold `layer7.head.1`.
  for old, new in (('layer7.classifier.weight', 'layer7.head.1.weight'),):
    if old in sd and new not in sd:
      sd[new] = sd.pop(old)
      notes.append(f'Read {old} as {new}.')
  if layout == 'torchvision':
    _fold_torchvision_input(sd)
    notes.append(
        'Folded torchvision input normalisation (RGB, /255, '
        'ImageNet mean/std) into conv1 and bn1.running_mean.'
    )
    if model_config.stride_in_1x1:
      notes.append(
          'torchvision ResNets stride in the 3x3 conv; this config '
          'strides in the 1x1 conv (model.stride_in_1x1=True).'
      )
  if allow_missing is None:
    allow_missing = _NON_BACKBONE if layout != 'accel' else ()
  # Keys the layout never maps (e.g. the Caffe net's COCO `layer5`, which is
  # not our aux head) are set aside before matching.
  ignore = _IGNORED[layout] + tuple(allow_unexpected)
  ignored = sorted(k for k in sd if any(re.match(p, k) for p in ignore))
  sd = {k: v for k, v in sd.items() if k not in set(ignored)}
  head = model_config.head
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  _, init_params, init_stats = state_lib.init_model(
      ml_collections.ConfigDict({'model': cfg}), seed
  )
  trees = {
      'params': checkpointing.flat_keys(init_params),
      'batch_stats': checkpointing.flat_keys(init_stats),
  }
  transplanted, made = [], set()
  if head_from_tps:
    transplanted, made = _head_from_tps(
        sd, trees['params'], model_config, layout, source
    )
    notes.append(
        f"layer7 built from TPS's layer6 ({', '.join(transplanted[:2])}, "
        "...): its first num_classes features are layer6's logits and the "
        'classifier passes them through ([I | 0]); the other features keep '
        'the initialisation with zero classifier weights, so the model '
        'predicts exactly what TPS predicts.'
    )
  out = {'params': {}, 'batch_stats': {}}
  used, missing, mismatched, kept = set(), [], [], []
  for kind, flat in trees.items():
    for path, like in flat.items():
      name = torch_name(path, head)
      if name not in sd:
        if path.startswith(tuple(allow_missing)):
          out[kind][path] = np.asarray(like, np.float32)
          kept.append(path)
        else:
          missing.append(f'{name} (for {path})')
        continue
      used.add(name)
      value = _to_ours(name, np.asarray(sd[name]), path.split('/')[-1])
      if value.shape != tuple(like.shape):
        mismatched.append(
            f'{name}: file {tuple(sd[name].shape)} -> '
            f'{value.shape}, model {tuple(like.shape)}'
        )
        continue
      out[kind][path] = value.astype(np.float32)
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or mismatched:
    parts = []
    for label, keys in (
        ('missing', missing),
        ('unexpected', unexpected),
        ('shape-mismatched', mismatched),
    ):
      if keys:
        parts.append(
            f'{len(keys)} {label}: '
            + '; '.join(keys[:8])
            + ('; ...' if len(keys) > 8 else '')
        )
    hint = []
    if any(k.startswith('layer6.') for k in unexpected) or any(
        'layer6.' in k for k in missing
    ):
      hint.append(
          "TPS/DA-VSN checkpoints have the 'layer6' head: use "
          '--config.model.head=aspp to evaluate them, or '
          '--head_from_tps to start DA-STC from them (docs/'
          'weights.md; --allow_missing=head/ --allow_unexpected='
          "'layer6\\.' keeps only their backbone, as the released "
          'recipe does with a frozen TPS teacher).'
      )
    if mismatched:
      hint.append(
          'Mismatched shapes usually mean another class count '
          '(model.num_classes) or depth (model.layers).'
      )
    raise ConversionError(
        f'{source} ({layout} layout) does not fit config.model '
        f'(name={model_config.name}, num_classes={model_config.num_classes}'
        f', layers={tuple(model_config.layers)}, head={head}): '
        + ' | '.join(parts)
        + ('. ' + ' '.join(hint) if hint else '.')
    )
  unflat = lambda flat, like: jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(like),
      [flat[k] for k in checkpointing.flat_keys(like)],
  )
  converted = sorted((used - made) | set(transplanted))
  report = Report(
      source=source,
      layout=layout,
      converted=converted,
      missing_initialised=sorted(kept),
      ignored=ignored,
      notes=notes,
  )
  return (
      unflat(out['params'], init_params),
      unflat(out['batch_stats'], init_stats),
      report,
  )


def _head_from_tps(
    sd: dict[str, np.ndarray],
    init: dict[str, Any],
    model_config: ml_collections.ConfigDict,
    layout: str,
    source: str,
) -> tuple[list[str], set[str]]:
  """Replaces a TPS file's ``layer6`` (ASPP sum straight to the C classes)
  in ``sd`` by an equivalent DA-STC ``layer7`` (ASPP sum to F features, then
  a bias-free 1x1 classifier), in place; returns the layer6 keys used and
  the layer7 keys made from them.

  Branch i of layer7 gets layer6's branch i as its first C output channels
  (weights and bias); the other F - C channels keep this config's
  initialisation (``init``, our flat parameters). The classifier is [I | 0]:
  logits = the first C features = layer6's logits, exactly, in eval mode.
  The zero columns get gradients from the (non-zero) extra features, so the
  whole head trains. This lets the EMA teacher, reset to the student when
  adaptation starts, label with TPS's predictions from the first step.
  """
  if layout != 'accel' or model_config.head != 'proda':
    raise ConversionError(
        f'--head_from_tps needs a TPS file (accel layout, got {layout}) and '
        "config.model.head='proda' (DA-STC's layer7), got "
        f'{model_config.head!r}.'
    )
  if any(k.startswith('layer7.') for k in sd):
    raise ConversionError(
        f'{source} already has a layer7 head; '
        '--head_from_tps is for TPS files (layer6 only).'
    )
  keys = sorted(k for k in sd if k.startswith('layer6.conv2d_list.'))
  n = len(model_config.aspp_dilations)
  want = [
      f'layer6.conv2d_list.{i}.{p}'
      for i in range(n)
      for p in ('weight', 'bias')
  ]
  if sorted(want) != keys:
    raise ConversionError(
        f'--head_from_tps: {source} has layer6 keys {keys[:4]}...; expected '
        f'{want[:4]}... ({n} ASPP branches, config.model.aspp_dilations).'
    )
  c = model_config.num_classes
  f = model_config.head_features
  if f < c:
    raise ConversionError(
        f'--head_from_tps needs config.model.'
        f'head_features >= num_classes ({f} < {c}).'
    )
  for i in range(n):
    w6, b6 = sd.pop(want[2 * i]), sd.pop(want[2 * i + 1])
    if w6.shape[0] != c:
      raise ConversionError(
          f'{source}: {want[2 * i]} has {w6.shape[0]} output classes; '
          f'config.model.num_classes={c}.'
      )
    kernel = np.asarray(init[f'head/aspp/branches/{i}/kernel'], np.float32)
    w7 = np.transpose(kernel, (3, 2, 0, 1)).copy()  # HWIO -> OIHW
    if w7.shape[1:] != w6.shape[1:]:
      raise ConversionError(
          f'{want[2 * i]}: file {w6.shape}, model layer7 '
          f'{w7.shape} (another depth or width?).'
      )
    w7[:c] = w6
    b7 = np.asarray(init[f'head/aspp/branches/{i}/bias'], np.float32).copy()
    b7[:c] = b6
    sd[f'layer7.conv2d_list.{i}.weight'] = w7
    sd[f'layer7.conv2d_list.{i}.bias'] = b7
  cls = np.zeros((c, f, 1, 1), np.float32)
  cls[np.arange(c), np.arange(c)] = 1.0
  sd['layer7.head.1.weight'] = cls
  return want, {k for k in sd if k.startswith('layer7.')}


def export_state_dict(
    params: Any, batch_stats: Any, model_config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
  """Our ACCEL-DeepLabv2 parameters as a released-layout ``state_dict``
  (the inverse of :func:`convert_state_dict` for the ``accel`` layout):
  OIHW kernels, the reference key of every parameter (``layer6`` for
  ``head='aspp'``, ``layer7`` for ``'proda'``), and a zero
  ``num_batches_tracked`` beside every BatchNorm as PyTorch writes it.

  Used to write stand-ins of released files (the full-scale rehearsal).
  """
  out = {}
  for tree in (params, batch_stats):
    for path, value in checkpointing.flat_keys(tree).items():
      name = torch_name(path, model_config.head)
      value = np.asarray(value, np.float32)
      if path.split('/')[-1] == 'kernel':
        value = np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
      out[name] = np.ascontiguousarray(value)
      if name.endswith('.running_var'):
        out[name[: -len('running_var')] + 'num_batches_tracked'] = np.zeros(
            (), np.int64
        )
  return out


def export_mit_imagenet(
    model_config: ml_collections.ConfigDict, seed: int = 0
) -> dict[str, np.ndarray]:
  """This config's MiT encoder, initialised with ``seed``, as an ImageNet
  MiT file's ``state_dict`` (the ``mit`` layout: ``patch_embed1.proj``,
  ``block1.0.attn.q``, ..., plus a 1000-class ``head``): the inverse of
  :func:`convert_transformer` for that layout.

  Used to write stand-ins of the ImageNet MiT files (the full-scale
  rehearsal).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dastc_jax import models  # pylint: disable=g-import-not-at-top

  model = models.build_model(model_config, nnx.Rngs(params=seed))
  flat = dict(nnx.to_flat_state(nnx.state(model.backbone)))
  out = {}
  for path, name in torch_names(model.backbone).items():
    value = np.asarray(flat[path].get_value(), np.float32)
    if value.ndim == 4:
      value = np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T  # Linear [in, out] -> [out, in]
    out[name] = np.ascontiguousarray(value)
  width = model.backbone.out_features['c4']
  rng = np.random.default_rng(seed)
  out['head.weight'] = rng.normal(0, 0.02, (1000, width)).astype(np.float32)
  out['head.bias'] = np.zeros((1000,), np.float32)
  return out


# ------------------------------------------------- modules named like torch
torch_names = weight_files.torch_names
load_by_names = weight_files.load_by_names


def convert_transformer(
    sd: dict[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    layout: str,
    *,
    source: str = '<memory>',
    seed: int = 0,
    allow_unexpected: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, Any], Report]:
  """ImageNet MiT (``mit``: ``patch_embed1...``, its ``head.*`` ImageNet
  classifier dropped; the DAFormer head and ``sf_layer`` keep this config's
  initialisation), a released QuadMix-ViT video model (``quadmix_vit``:
  ``model.*`` encoder, ``decoder.*`` head and ``decoder.sf_layer``) or a
  released HRDA / MIC model (``hrda``: mmseg's ``HRDAEncoderDecoder``,
  ``backbone.*``, ``decode_head.head.*`` and
  ``decode_head.scale_attention.*``, under ``model.`` in a UDA checkpoint,
  whose ``ema_model.*`` and ``imnet_model.*`` copies are left out) into a
  transformer config (``model.name`` ``accel_daformer`` / ``daformer``;
  ``hrda`` needs ``model.hrda.enabled``). Keys matching
  ``allow_unexpected`` (e.g. an EMA copy) are ignored."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dastc_jax import models  # pylint: disable=g-import-not-at-top

  if model_config.name not in models.TRANSFORMERS:
    raise ConversionError(
        f'{source} holds {layout} (transformer) weights; config.model.name='
        f'{model_config.name!r} is not a transformer model (use one of '
        f'{models.TRANSFORMERS}, e.g. configs/viper_vit.py).'
    )
  model = models.build_model(model_config, nnx.Rngs(params=seed))
  sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  # HRDA: the student of a UDA checkpoint, or a plain segmentor.
  pre = 'model.' if any(k.startswith('model.decode_head.') for k in sd) else ''
  ignored = sorted(
      k
      for k in sd
      if (layout == 'mit' and k.startswith('head.'))
      or (
          layout == 'hrda'
          and pre
          and k.startswith(('ema_model.', 'imnet_model.'))
      )
      or any(re.match(p, k) for p in allow_unexpected)
  )
  used = set(ignored)
  kept, notes = [], []
  if layout == 'hrda':
    if getattr(model, 'scale_attention', None) is None:
      raise ConversionError(
          f'{source} holds a multi-resolution (HRDA) model; '
          'config.model.hrda.enabled is False (use an *_hrda.py config).'
      )
    for part, prefix in (
        (model.backbone, 'backbone.'),
        (model.head, 'decode_head.head.'),
        (model.scale_attention, 'decode_head.scale_attention.'),
    ):
      used |= set(load_by_names(part, sd, prefix=pre + prefix, source=source))
    if hasattr(model, 'sf_layer'):
      kept = ['sf_layer/']
      notes.append(
          'HRDA image model into a video config: sf_layer keeps this '
          "config's initialisation."
      )
  elif layout == 'mit':
    used |= set(load_by_names(model.backbone, sd, source=source))
    kept = ['head/', 'sf_layer/'] if hasattr(model, 'sf_layer') else ['head/']
    notes.append(
        'ImageNet MiT encoder: the decode head (and sf_layer) keep '
        "this config's initialisation."
    )
  else:
    used |= set(
        load_by_names(model.backbone, sd, prefix='model.', source=source)
    )
    used |= set(load_by_names(model.head, sd, prefix='decoder.', source=source))
    if hasattr(model, 'sf_layer'):
      name = 'decoder.sf_layer.weight'
      if name not in sd:
        raise ConversionError(
            f'{source}: 1 missing: {name} (a video model; '
            'an image-domain file fits model.name='
            "'daformer')."
        )
      w = np.transpose(np.asarray(sd[name], np.float32), (2, 3, 1, 0))
      if w.shape != tuple(model.sf_layer.kernel.shape):
        raise ConversionError(
            f'{source}: {name}: file {sd[name].shape}, '
            f'model {model.sf_layer.kernel.shape} (another '
            'class count?).'
        )
      model.sf_layer.kernel.set_value(jax.numpy.asarray(w))
      used.add(name)
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise ConversionError(
        f'{source} ({layout} layout): {len(unexpected)} '
        'unexpected: ' + '; '.join(unexpected[:8])
    )
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  stats = jax.tree.map(np.asarray, nnx.to_pure_dict(stats))
  report = Report(
      source=source,
      layout=layout,
      converted=sorted(used - set(ignored)),
      missing_initialised=kept,
      ignored=ignored,
      notes=notes,
  )
  return params, stats, report


# ------------------------------------------------------------------- output
def convert_file(
    source: str,
    output: str,
    model_config: ml_collections.ConfigDict,
    *,
    layout: str = 'auto',
    allow_missing: Sequence[str] | None = None,
    allow_unexpected: Sequence[str] = (),
    overwrite: bool = False,
    loaded: tuple[dict[str, np.ndarray], str] | None = None,
    head_from_tps: bool = False,
) -> Report:
  """Converts ``source`` and writes an orbax checkpoint under ``output``
  (``loaded``: ``weight_files.read(source)`` when the caller has read it).

  ``output/checkpoints/0`` holds ``{'params', 'batch_stats'}``;
  ``output/conversion.json`` says what was converted from where. The
  checkpoint is written to a staging folder and renamed into place, so
  an interrupted conversion leaves nothing that looks complete (on an
  object store the folder is uploaded with ``conversion.json`` last).
  ``source`` and ``output`` may be ``gs://...`` paths.

  Raises:
    ConversionError: on a bad file, a mismatch, or an existing ``output``
      (unless ``overwrite``).
  """
  output = os.fspath(paths.resolve(output))
  if paths.resolve(output).exists() and not overwrite:
    raise ConversionError(f'{output} exists; pass --overwrite to replace it.')
  sd, digest = loaded or weight_files.read(source)
  params, stats, report = convert_state_dict(
      sd,
      model_config,
      layout=layout,
      allow_missing=allow_missing,
      allow_unexpected=allow_unexpected,
      source=source,
      head_from_tps=head_from_tps,
  )
  tmp = paths.staging_dir(output)
  try:
    ckpt = checkpointing.Checkpointer(
        os.path.join(tmp, 'checkpoints'), async_save=False
    )
    try:
      ckpt.save(0, {'params': params, 'batch_stats': stats})
    finally:
      ckpt.close()
    meta = {
        **report.to_json(),
        'sha256': digest,
        'model': model_config.to_dict(),
    }
    with open(os.path.join(tmp, 'conversion.json'), 'w') as f:
      json.dump(meta, f, indent=2, default=str)
    paths.publish_dir(tmp, output, last='conversion.json')
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info(
      'Converted %d tensors of %s (%s layout) into %s; kept the '
      'initialisation of %d parameters; ignored %d keys.',
      len(report.converted),
      source,
      report.layout,
      output,
      len(report.missing_initialised),
      len(report.ignored),
  )
  for note in report.notes:
    logging.warning('%s', note)
  return report


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      'config',
      None,
      'Experiment config whose model receives the weights '
      '(not needed for torchvision RAFT files, which are recognised).',
      lock_config=True,
  )
  flags.DEFINE_string(
      'source', None, 'PyTorch .pth/.pt/.bin or ' '.safetensors file.'
  )
  flags.DEFINE_string('output', None, 'Output folder (orbax checkpoint).')
  flags.DEFINE_enum('layout', 'auto', LAYOUTS, 'Key layout of the file.')
  flags.DEFINE_list(
      'allow_missing',
      None,
      'Prefixes of our parameter paths '
      '(e.g. head/) that keep their initialisation when the '
      "file lacks them (default: the layout's).",
  )
  flags.DEFINE_list(
      'allow_unexpected',
      [],
      'Regexes of file keys that may ' "stay unused (e.g. 'layer6\\.').",
  )
  flags.DEFINE_bool(
      'head_from_tps',
      False,
      "Build DA-STC's layer7 head from "
      "a TPS file's layer6, so that the converted model "
      'predicts exactly what TPS predicts (the start of '
      'DA-STC training, docs/weights.md).',
  )
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.')
  flags.mark_flags_as_required(['source', 'output'])
  return flags.FLAGS


def _main(argv, f) -> None:
  if len(argv) > 1:
    raise SystemExit(f'Unexpected arguments: {argv[1:]}')
  loaded = weight_files.read(f.source)  # read once, whatever the layout
  if 'feature_encoder.conv.weight' in loaded[0]:  # torchvision RAFT
    from dastc_jax.flow import weights as flow_weights  # pylint: disable=g-import-not-at-top

    variant = flow_weights.convert_file(
        f.source, f.output, overwrite=f.overwrite, loaded=loaded
    )
    print(
        f'Wrote {paths.resolve(f.output)}: torchvision {variant} weights '
        'as an orbax checkpoint. Use it with `python -m dastc_jax.flow '
        f'--weights={f.output}` or `prepare --compute_flows={f.output}`.'
    )
    return
  if f.config is None:
    raise SystemExit(
        'error: --config is needed (its model receives the '
        'weights); only RAFT weight files convert without one.'
    )
  try:
    report = convert_file(
        f.source,
        f.output,
        f.config.model,
        layout=f.layout,
        allow_missing=f.allow_missing,
        allow_unexpected=f.allow_unexpected,
        overwrite=f.overwrite,
        loaded=loaded,
        head_from_tps=f.head_from_tps,
    )
  except ConversionError as e:
    raise SystemExit(f'error: {e}') from None
  print(
      f'Wrote {paths.resolve(f.output)}: {len(report.converted)} tensors '
      f'converted ({report.layout} layout), '
      f'{len(report.missing_initialised)} parameters initialised by the '
      f'config, {len(report.ignored)} file keys ignored. Use it with '
      f'--config.train.init_from={f.output} or --mode=eval '
      f'--checkpoint={f.output}.'
  )


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top

  _flags = _define_flags()
  app.run(
      errors.report_user_errors(lambda argv: _main(argv, _flags)),
      flags_parser=flag_errors.parse,
  )
