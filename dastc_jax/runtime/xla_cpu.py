"""XLA:CPU compiler flags that this model needs to run at PyTorch's speed.

XLA:CPU hands convolutions and matmuls to YNNPACK but, by default, leaves the
BatchNorm-apply / residual-add / ReLU chain of a ResNet to its own loop
fusions. Those fusions duplicate cheap elementwise producers into every
consumer, and a residual stream is consumed by the next block and by the
residual add after it, so block k re-evaluates the BN-apply and adds of all
blocks before it (fusions of 100+ operands in layer3 of ResNet-101; found
with ``jax.profiler``, benchmarks/step.md). ``+eltwise`` lets YNNPACK take
elementwise ops into its fusions as epilogues of the conv or matmul that
produced them, which removes the duplication: the ResNet-101 train step at
128x256 goes from ~3.3 s to ~2.9 s on 2 cores. The first-step loss agrees
with the default to 1e-6 relative (float summation order only).

The same fusions keep more buffers alive at once: at the real configs'
sizes the flag multiplies the DA-STC step's temporaries by 2.4
(benchmarks/memory.md). So it is chosen per shape: a run whose largest
training frame has more than :data:`ELTWISE_MAX_PIXELS` pixels (the real
configs: 512x1024 and up) does not get it (:func:`train_pixels`).

It is also chosen per model: the transformers (MiT encoder, DAFormer head)
have no BatchNorm chains to gain from it and run slower with it (the
MiT-B5 source-only step at 128x256: JAX without / with it 0.92-0.94,
paired medians, benchmarks/step_vit.md; its exact GELU was 6x slower with
it), so :func:`set_defaults` leaves them without it.

The flags are read when the CPU backend starts, so :func:`set_defaults`
must run before the first JAX computation. It only appends flags that the
user's ``XLA_FLAGS`` does not already set, and they only affect the CPU
backend. ``DASTC_XLA_CPU_DEFAULTS=0`` turns it off.
"""

from __future__ import annotations

import os

import ml_collections

DEFAULT_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=+eltwise',)
# Largest training frame (H * W) that gets DEFAULT_FLAGS: 256x512.
ELTWISE_MAX_PIXELS = 256 * 512


def train_pixels(config: ml_collections.ConfigDict) -> int | None:
  """Pixels of the largest training frame of ``config`` (crop, else resize;
  None when a frame keeps a native size that the config does not state and
  the data is not the built-in synthetic world)."""
  most = 0
  for key in ('source', 'target'):
    d = config.data.get(key)
    if d is None:
      continue
    size = d.crop_size or d.image_size
    if size is None:
      world = config.data.synthetic
      if not world.enabled:
        return None
      size = world.source_size if key == 'source' else world.target_size
    most = max(most, int(size[0]) * int(size[1]))
  return most


def set_defaults(
    environ: dict[str, str] | None = None,
    pixels: int | None = 0,
    model: str | None = None,
) -> str:
  """Appends :data:`DEFAULT_FLAGS` to ``XLA_FLAGS`` unless already set.

  Args:
    environ: the environment to edit (default ``os.environ``).
    pixels: the largest training frame's pixel count of the config
      (:func:`train_pixels`; ``main.py`` uses it for every mode, since
      evaluation and prediction run frames of the same sizes); above
      :data:`ELTWISE_MAX_PIXELS`, or None (unknown), nothing is appended.
      0: small, or no config (the flow command, benchmarks).
    model: ``config.model.name``; a transformer (``models.TRANSFORMERS``)
      gets nothing. None: no config (the flag applies by size alone).

  Returns:
    The resulting ``XLA_FLAGS`` value.
  """
  env = os.environ if environ is None else environ
  current = env.get('XLA_FLAGS', '')
  if env.get('DASTC_XLA_CPU_DEFAULTS', '1') == '0':
    return current
  if pixels is None or pixels > ELTWISE_MAX_PIXELS:
    return current
  if model is not None:
    from dastc_jax import models  # pylint: disable=g-import-not-at-top

    if model in models.TRANSFORMERS:
      return current
  present = {f.split('=')[0] for f in current.split()}
  extra = [f for f in DEFAULT_FLAGS if f.split('=')[0] not in present]
  value = ' '.join([current] + extra).strip() if extra else current
  env['XLA_FLAGS'] = value
  return value


def strip_defaults(flags: str) -> str:
  """``flags`` without the :data:`DEFAULT_FLAGS` that :func:`set_defaults`
  adds (for a child process that must start from the user's flags)."""
  return ' '.join(f for f in flags.split() if f not in DEFAULT_FLAGS)
