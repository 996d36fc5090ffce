r"""Command: prepares one dataset into TFDS ArrayRecord files.

  python -m dastc_jax.prepare --dataset=viper --manual_dir=data/Viper \
      --data_dir=data/tfds

The work is done by ``data/datasets/prepare.py`` (idempotent, resumable);
see docs/datasets.md for the layouts and where flows are looked up.
``--compute_flows=RAFT_WEIGHTS`` first computes the flows with RAFT
(docs/optical_flow.md).
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app
from absl import flags

from dastc_jax import errors
from dastc_jax import flag_errors
from dastc_jax.data.datasets import builders

_DATASET = flags.DEFINE_enum(
    'dataset', None, sorted(builders.SPECS), 'Dataset to prepare.'
)
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'The dataset folder in its original layout.'
)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', 'data/tfds', 'TFDS folder to write the prepared data to.'
)
_TRAIN_FLOW_DIR = flags.DEFINE_string(
    'train_flow_dir',
    None,
    'Flow folder of the train split (default: the '
    'reference location beside --manual_dir).',
)
_VAL_FLOW_DIR = flags.DEFINE_string(
    'val_flow_dir', None, 'Flow folder of the val split.'
)
_SPLITS = flags.DEFINE_list('splits', None, 'Splits (default: all present).')
_TRAIN_SIZE = flags.DEFINE_list(
    'train_size',
    None,
    'H,W: store the train split at the training '
    'resolution (frames bicubic, labels nearest, flows rescaled; the aspect '
    'ratio of the frames), e.g. 720,1280 for VIPER, 512,1024 for '
    'Cityscapes-Seq. Reading then skips the full-size decode and resize. '
    'Use its own --data_dir.',
)
_COMPUTE_FLOWS = flags.DEFINE_string(
    'compute_flows',
    None,
    'Compute the missing flows first with RAFT, from '
    'these weights (a torchvision RAFT file or a converted folder), into the '
    'flow folders (`python -m dastc_jax.flow` does only this step).',
)
flags.mark_flags_as_required(['dataset', 'manual_dir'])


def _size(value: list[str] | None) -> tuple[int, int] | None:
  if not value:
    return None
  try:
    h, w = (int(v) for v in value)
  except ValueError:
    raise app.UsageError(
        f'--train_size={",".join(value)}: expected H,W.'
    ) from None
  return h, w


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from dastc_jax.data.datasets import prepare  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.display_progress_bar(True)
  flow_dirs = {'train': _TRAIN_FLOW_DIR.value, 'val': _VAL_FLOW_DIR.value}
  if _COMPUTE_FLOWS.value:
    from dastc_jax.flow import estimate  # pylint: disable=g-import-not-at-top
    from dastc_jax.flow import generate  # pylint: disable=g-import-not-at-top

    splits, flow_dirs = generate.default_splits_and_dirs(
        _DATASET.value, _MANUAL_DIR.value, _SPLITS.value, flow_dirs
    )
    generate.run(
        _DATASET.value,
        _MANUAL_DIR.value,
        splits,
        flow_dirs,
        estimate.RaftEstimator(_COMPUTE_FLOWS.value),
    )
  counts = prepare.prepare(
      _DATASET.value,
      _MANUAL_DIR.value,
      _DATA_DIR.value,
      flow_dirs=flow_dirs,
      train_size=_size(_TRAIN_SIZE.value),
      splits=_SPLITS.value,
  )
  print(
      json.dumps(
          {
              'dataset': _DATASET.value,
              'data_dir': _DATA_DIR.value,
              'samples': counts,
          }
      )
  )


if __name__ == '__main__':
  app.run(errors.report_user_errors(main), flags_parser=flag_errors.parse)
