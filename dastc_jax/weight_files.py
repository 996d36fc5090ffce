"""Reading PyTorch weight files safely (for every converter).

``torch.load(weights_only=True)`` (no arbitrary unpickling) or safetensors;
``state_dict`` / ``model`` wrappers and DataParallel's ``module.`` prefix
are removed; every failure names the file.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any
import warnings

from flax import nnx
import jax
import numpy as np

from dastc_jax import errors
from dastc_jax import paths


class ConversionError(errors.UserError, ValueError):
  """A weight file cannot be read or does not fit the model."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch ``state_dict`` (``.pth``/``.pt``/``.bin`` or
  ``.safetensors``) into numpy arrays, safely.

  Raises:
    ConversionError: naming ``path`` when it is missing, truncated, not a
      weight file, or would need arbitrary unpickling.
  """
  if not os.path.isfile(path):
    raise ConversionError(f'Weight file {path} does not exist.')
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(
          f'{path}: reading .safetensors needs the '
          '`safetensors` package (pip install '
          'safetensors).'
      ) from e
    try:
      tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types.
      raise ConversionError(
          f'{path} is not a readable safetensors file '
          f'(truncated or corrupt?): {e}'
      ) from e
    return {
        _strip_module(k): (v.astype(np.float32) if v.dtype.kind == 'f' else v)
        for k, v in tensors.items()
    }
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
        f'{path}: reading PyTorch files needs torch (CPU is enough: pip '
        'install torch), or convert it to .safetensors first.'
    ) from e
  try:
    with warnings.catch_warnings():
      # PyTorch warns about what it finds in a damaged file (an unknown
      # pickle protocol...) before failing; the error below says it once.
      warnings.simplefilter('ignore')
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # truncated zip, bad pickle, unsafe globals...
    msg = str(e).splitlines()[0]
    if 'weights_only' in msg or 'Weights only load failed' in msg:
      # PyTorch's own advice (load it unsafely) is not something this
      # command can follow; say what the file is instead.
      msg = (
          'it is not a plain tensor state_dict (reading it would unpickle '
          'arbitrary objects, which this command refuses)'
      )
    raise ConversionError(
        f'Cannot read {path} as a PyTorch weight file: '
        f'{type(e).__name__}: {msg[:300]}. Check that the file is complete '
        '(its size or checksum against the release) and that it is a '
        'state_dict of tensors; a pickled model object can be re-saved as '
        'torch.save(model.state_dict(), PATH) where it was made.'
    ) from e
  for wrapper in ('state_dict', 'model_state_dict', 'model', 'net'):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ConversionError(
        f'{path} holds a {type(obj).__name__}, not a '
        'state_dict (a dict of tensors).'
    )
  out = {}
  for k, v in obj.items():
    if not hasattr(v, 'numpy'):
      continue  # e.g. an epoch counter stored beside the weights
    v = v.detach().cpu()
    out[_strip_module(k)] = (v.float() if v.is_floating_point() else v).numpy()
  if not out:
    raise ConversionError(f'{path} contains no tensors.')
  return out


def _strip_module(key: str) -> str:
  """Drops the ``module.`` prefix of a DataParallel-saved key."""
  return key[len('module.') :] if key.startswith('module.') else key


def read(source: str) -> tuple[dict[str, np.ndarray], str]:
  """``(state_dict, sha256)`` of a weight file (``gs://`` read through a
  local copy), reading it once."""
  with paths.local_copy(source) as local:
    return load_state_dict(local), sha256(local)


def sha256(path: str) -> str:
  """Hex digest of a local file."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


_LEAF_NAMES = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
}


def torch_names(module: Any, prefix: str = '') -> dict[tuple[Any, ...], str]:
  """State paths of an NNX module whose attribute names are the PyTorch
  module's (MiT, the DAFormer head) -> the ``state_dict`` keys."""
  return {
      tuple(path): prefix
      + '.'.join([str(p) for p in path[:-1]] + [_LEAF_NAMES[str(path[-1])]])
      for path, _ in nnx.to_flat_state(nnx.state(module))
  }


def load_by_names(
    module: Any,
    sd: dict[str, np.ndarray],
    *,
    prefix: str = '',
    names: dict[tuple[Any, ...], str] | None = None,
    source: str = '<memory>',
) -> list[str]:
  """Fills ``module`` in place from ``sd`` by name (conv weights OIHW ->
  HWIO, Linear weights transposed). ``names`` maps state paths to keys
  (default: :func:`torch_names`).

  Returns:
    The ``sd`` keys used.

  Raises:
    ConversionError: naming missing and shape-mismatched keys.
  """
  state = nnx.state(module)
  flat = dict(nnx.to_flat_state(state))
  missing, mismatched, used = [], [], []
  for path, name in (names or torch_names(module, prefix)).items():
    if name not in sd:
      missing.append(name)
      continue
    value = np.asarray(sd[name], np.float32)
    if value.ndim == 4:
      value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T  # Linear [out, in] -> [in, out]
    like = flat[path].get_value()
    if value.shape != tuple(like.shape):
      mismatched.append(
          f'{name}: file {tuple(sd[name].shape)}, model ' f'{tuple(like.shape)}'
      )
      continue
    flat[path].set_value(jax.numpy.asarray(value))
    used.append(name)
  if missing or mismatched:
    raise ConversionError(
        f'{source}: '
        + ' | '.join(
            f'{len(k)} {label}: '
            + '; '.join(k[:6])
            + ('; ...' if len(k) > 6 else '')
            for label, k in (
                ('missing', missing),
                ('shape-mismatched', mismatched),
            )
            if k
        )
    )
  nnx.update(module, state)
  return used
