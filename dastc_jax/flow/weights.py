"""torchvision RAFT weights -> our RAFT, and RAFT orbax checkpoints.

A torchvision ``state_dict`` (``raft_large_C_T_SKHT_V2-ff5fadd5.pth`` and
friends) maps key by key onto :class:`dastc_jax.flow.raft.Raft`: module
names are torchvision's; ``Conv2dNormActivation``'s ``.0`` / ``.1`` are our
``conv`` / ``norm``; conv weights go OIHW -> HWIO. A converted model is
stored as an orbax checkpoint (``OUTPUT/checkpoint``) beside ``raft.json``
(variant, source, sha256), written to a staging folder and published whole.
:func:`load` reads either form.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from dastc_jax import paths
from dastc_jax import weight_files
from dastc_jax.flow import raft as raft_lib

ConversionError = weight_files.ConversionError
META = 'raft.json'
_LEAF = {
    'kernel': 'weight',
    'bias': 'bias',
    'scale': 'weight',
    'mean': 'running_mean',
    'var': 'running_var',
}
WEIGHT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')


def detect_variant(sd: dict[str, np.ndarray], source: str = '<memory>') -> str:
  """``raft_large`` or ``raft_small`` from a torchvision state dict."""
  if 'feature_encoder.conv.weight' not in sd:
    raise ConversionError(
        f'{source} is not a torchvision RAFT state dict: no '
        f'feature_encoder.conv.weight (first keys: {sorted(sd)[:5]}).'
    )
  return 'raft_large' if 'mask_predictor.conv.weight' in sd else 'raft_small'


def torch_names(model: raft_lib.Raft) -> dict[tuple[Any, ...], str]:
  """Our state paths -> torchvision ``state_dict`` keys."""
  wrappers = {
      path
      for path, node in nnx.iter_graph(model)
      if isinstance(node, raft_lib.ConvNormAct)
  }
  out = {}
  for path, _ in nnx.to_flat_state(nnx.state(model)):
    parts = [str(p) for p in path[:-1]]
    if tuple(path[:-2]) in wrappers:
      parts[-1] = {'conv': '0', 'norm': '1'}[parts[-1]]
    out[tuple(path)] = '.'.join(parts + [_LEAF[str(path[-1])]])
  return out


def from_state_dict(
    sd: dict[str, np.ndarray],
    variant: str | None = None,
    source: str = '<memory>',
) -> raft_lib.Raft:
  """Builds our RAFT from a torchvision state dict.

  Args:
    sd: key -> array (``weight_files.load_state_dict``).
    variant: the expected variant; None = detected from the keys.
    source: file name for messages.

  Raises:
    ConversionError: naming every missing, unexpected or mismatched key, and
      the variant the file holds when another one was asked for.
  """
  held = detect_variant(sd, source)
  variant = variant or held
  if variant not in raft_lib.VARIANTS:
    raise ConversionError(
        f'Unknown RAFT variant {variant!r}; expected one '
        f'of {sorted(raft_lib.VARIANTS)}.'
    )
  model = raft_lib.abstract(variant)
  sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  names = torch_names(model)
  hint = (
      f' The file holds {held} weights; use variant {held}.'
      if held != variant
      else ''
  )
  unexpected = sorted(set(sd) - set(names.values()))
  try:
    weight_files.load_by_names(
        model, sd, names=names, source=f'{source} does not fit {variant}'
    )
  except ConversionError as e:
    extra = (
        f' | {len(unexpected)} unexpected: ' + '; '.join(unexpected[:6])
        if unexpected
        else ''
    )
    raise ConversionError(f'{e}{extra}.{hint}') from None
  if unexpected:
    raise ConversionError(
        f'{source} does not fit {variant}: {len(unexpected)} unexpected: '
        + '; '.join(unexpected[:6])
        + '.'
        + hint
    )
  return model


def save(
    model: raft_lib.Raft,
    output: str,
    *,
    variant: str,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
  """Writes ``output/checkpoint`` (orbax) and ``output/raft.json``."""
  out = paths.resolve(output)
  if out.exists() and not overwrite:
    raise ConversionError(f'{output} exists; pass --overwrite to replace it.')
  tmp = paths.staging_dir(output)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(
          os.path.join(tmp, 'checkpoint'), nnx.to_pure_dict(nnx.state(model))
      )
    with open(os.path.join(tmp, META), 'w') as f:
      json.dump({'variant': variant, **(meta or {})}, f, indent=2)
    paths.publish_dir(tmp, output, last=META)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def convert_file(
    source: str,
    output: str,
    variant: str | None = None,
    overwrite: bool = False,
    loaded: tuple[dict[str, np.ndarray], str] | None = None,
) -> str:
  """torchvision ``.pth`` / ``.safetensors`` -> orbax; returns the variant.
  ``loaded``: ``weight_files.read(source)`` when the caller has read it."""
  sd, digest = loaded or weight_files.read(source)
  model = from_state_dict(sd, variant, source)
  variant = variant or detect_variant(sd)
  save(
      model,
      output,
      variant=variant,
      overwrite=overwrite,
      meta={'source': source, 'sha256': digest, 'tensors': len(sd)},
  )
  logging.info(
      'Converted %s (%s, %d tensors) into %s.', source, variant, len(sd), output
  )
  return variant


def load(
    path: str, variant: str | None = None
) -> tuple[raft_lib.Raft, dict[str, Any]]:
  """Our RAFT from a converted folder or straight from a torchvision file.

  Returns:
    ``(model, meta)``; ``meta`` holds at least ``variant`` and ``source``.

  Raises:
    ConversionError: naming ``path`` when it is neither, or when it holds
      another variant than ``variant``.
  """
  root = paths.resolve(path)
  if str(path).endswith(WEIGHT_SUFFIXES):
    sd, digest = weight_files.read(path)
    model = from_state_dict(sd, variant, str(path))
    return model, {
        'variant': variant or detect_variant(sd),
        'source': str(path),
        'sha256': digest,
    }
  if not (root / META).exists():
    raise ConversionError(
        f'{path}: expected a torchvision RAFT weight file '
        f'({"/".join(WEIGHT_SUFFIXES)}) or a folder written by '
        f'`python -m dastc_jax.flow.convert` (with {META}); found neither.'
    )
  meta = json.loads((root / META).read_text())
  held = meta.get('variant')
  if variant and held != variant:
    raise ConversionError(f'{path} holds {held} weights, not {variant}.')
  model = raft_lib.abstract(held)
  state = nnx.state(model)
  target = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state)
  )
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(os.fspath(root / 'checkpoint'), target)
  except Exception as e:  # orbax raises several types for bad folders.
    raise ConversionError(
        f'{path}/checkpoint cannot be read as a {held} '
        f'checkpoint: {type(e).__name__}: '
        f'{str(e).splitlines()[0][:300]}'
    ) from e
  nnx.replace_by_pure_dict(state, restored)
  meta.setdefault('source', str(path))
  return nnx.merge(nnx.graphdef(model), state), meta
