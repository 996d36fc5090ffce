"""Model registry: ``build_model(config.model, rngs)``."""

from __future__ import annotations

from flax import nnx
import ml_collections

from dastc_jax import errors
from dastc_jax.models import accel
from dastc_jax.models import accel_daformer
from dastc_jax.models import layers
from dastc_jax.models import mit
from dastc_jax.models import resnet
from dastc_jax.models import video

# 'deeplabv2' and 'daformer' are the single-frame networks of the image
# domain; 'accel_daformer' is the transformer video model.
_MODELS = {
    'accel_deeplabv2': accel.AccelDeepLab,
    'deeplabv2': accel.AccelDeepLab,
    'accel_daformer': accel_daformer.AccelDAFormer,
    'daformer': accel_daformer.AccelDAFormer,
}
TRANSFORMERS = ('accel_daformer', 'daformer')
MIT_VARIANTS = tuple(mit.VARIANTS)
NAMES = tuple(_MODELS)  # config.model.name
compute_dtype = layers.compute_dtype
KERNEL_GRADS = layers.KERNEL_GRADS


def build_model(
    config: ml_collections.ConfigDict, rngs: nnx.Rngs
) -> nnx.Module:
  """Builds the model named by ``config.name``.

  Args:
    config: the ``model`` section of the experiment config.
    rngs: parameter RNG streams.

  Returns:
    The NNX module, with freshly initialised parameters.
  """
  if config.name not in _MODELS:
    raise errors.ConfigError(
        f'Unknown config.model.name={config.name!r}; expected '
        f'one of {sorted(_MODELS)}.'
    )
  return _MODELS[config.name](config, rngs=rngs)


def clip_length(config: ml_collections.ConfigDict) -> int:
  """Frames per clip the model consumes: 2 (video) or 1 (image domain)."""
  return video.clip_length(config.name)


def output_stride(name: str) -> int:
  """The score grid's stride of model ``name`` (DAFormer 4, DeepLab 8)."""
  return 4 if name in TRANSFORMERS else 8


IMAGE_MODELS = video.IMAGE_MODELS


def shallow_stages(name: str = 'accel_deeplabv2') -> tuple[str, ...]:
  """Backbone stages of model ``name`` after which the feature-level fusion
  may exchange features (every stage but the last)."""
  if name in TRANSFORMERS:
    return mit.MiT.STAGES[:-1]
  return resnet.ResNetDeepLab.STAGES[:-1]
