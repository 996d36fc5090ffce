"""Whether a dataset split is prepared, and the command that prepares it.

Read by the pipeline (to fail early with the exact command) and by the
preparation command itself.
"""

from __future__ import annotations

import json
import os

from etils import epath

from dastc_jax.data.datasets import builders

VERSION = str(builders._Builder.VERSION)  # pylint: disable=protected-access


def prepared_dir(data_dir: str, spec: builders.Spec, split: str) -> str:
  """The TFDS version folder holding ``spec``'s ``split``."""
  parts = [os.path.expanduser(data_dir), spec.tfds_name]
  if spec.name == 'cityscapes_seq':
    parts.append(split)
  return os.path.join(*parts, VERSION)


def is_prepared(data_dir: str, spec: builders.Spec, split: str) -> bool:
  """Whether ``split`` is prepared (complete folder and statistics)."""
  info = epath.Path(prepared_dir(data_dir, spec, split)) / 'dataset_info.json'
  if not info.exists():
    return False
  splits = {s['name'] for s in json.loads(info.read_text()).get('splits', [])}
  return (
      split in splits
      and epath.Path(builders.stats_path(data_dir, spec, split)).exists()
  )


def command(
    dataset: str, data_dir: str, manual_dir: str = '<the dataset ' 'folder>'
) -> str:
  """The prepare command line for ``dataset`` (for error messages)."""
  return (
      f'python -m dastc_jax.prepare --dataset={dataset} '
      f'--manual_dir={manual_dir} --data_dir={data_dir}'
  )
