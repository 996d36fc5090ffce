"""Where a run's prepared data lives."""

from __future__ import annotations

import os

import ml_collections

from dastc_jax.data.synthetic import world as synthetic


def resolve_data_root(
    config: ml_collections.ConfigDict, generate: bool = True
) -> str:
  """The prepared TFDS folder of ``config.data``.

  With the synthetic world enabled it is the world's ``tfds/`` folder; the
  world is generated and prepared first when ``generate`` (training), and
  must exist otherwise (evaluation has no side effects on the data).
  """
  if config.data.synthetic.enabled:
    if not generate:
      return os.path.join(
          synthetic.existing_world(config.data.synthetic), synthetic.TFDS_DIR
      )
    return os.path.join(
        synthetic.ensure_world(
            config.data.synthetic, config.data.synthetic.num_workers
        ),
        synthetic.TFDS_DIR,
    )
  return config.data.data_dir
