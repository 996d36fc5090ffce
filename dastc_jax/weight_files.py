"""Reading PyTorch weight files safely (for every converter).

``torch.load(weights_only=True)`` (no arbitrary unpickling) or safetensors;
``state_dict`` / ``model`` wrappers and DataParallel's ``module.`` prefix
are removed; every failure names the file.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from dastc_jax import errors


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
      raise ConversionError(f'{path}: reading .safetensors needs the '
                            '`safetensors` package (pip install '
                            'safetensors).') from e
    try:
      tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types.
      raise ConversionError(f'{path} is not a readable safetensors file '
                            f'(truncated or corrupt?): {e}') from e
    return {_strip_module(k): (v.astype(np.float32) if v.dtype.kind == 'f'
                               else v) for k, v in tensors.items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
        f'{path}: reading PyTorch files needs torch (CPU is enough: pip '
        'install torch), or convert it to .safetensors first.') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # truncated zip, bad pickle, unsafe globals...
    msg = str(e).splitlines()[0][:300]
    raise ConversionError(
        f'Cannot read {path} as a PyTorch weight file '
        f'(torch.load(weights_only=True)): {type(e).__name__}: {msg}. '
        'Is it complete (compare its size or checksum with the release), '
        'and a state_dict rather than a pickled model object?') from e
  for wrapper in ('state_dict', 'model_state_dict', 'model', 'net'):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a '
                          'state_dict (a dict of tensors).')
  out = {}
  for k, v in obj.items():
    if not hasattr(v, 'numpy'):
      continue  # e.g. an epoch counter stored beside the weights
    v = v.detach().cpu()
    out[_strip_module(k)] = (v.float() if v.is_floating_point() else v
                             ).numpy()
  if not out:
    raise ConversionError(f'{path} contains no tensors.')
  return out


def _strip_module(key: str) -> str:
  """Drops the ``module.`` prefix of a DataParallel-saved key."""
  return key[len('module.'):] if key.startswith('module.') else key


def sha256(path: str) -> str:
  """Hex digest of a local file."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()
