r"""Command: computes a video dataset's optical flows with RAFT.

  python -m dastc_jax.flow --dataset=cityscapes_seq \
      --manual_dir=data/Cityscapes --weights=raft_large_C_T_SKHT_V2-ff5fadd5.pth

writes ``data/estimated_optical_flow_cityscapes_seq_{train,val}/`` (the
reference names, where ``prepare`` looks), or ``--train_flow_dir`` /
``--val_flow_dir``. ``--weights`` is a torchvision RAFT file or a folder
converted by ``python -m dastc_jax.convert``. The pairs of a batch are split
over the local devices; with DASTC_DISTRIBUTED=1 every host computes its
share of the files. Rerunning continues where a run stopped.
docs/optical_flow.md has the details.
"""

from __future__ import annotations

import json
from typing import Sequence

from dastc_jax.runtime import host_malloc
from dastc_jax.runtime import xla_cpu

host_malloc.configure()
xla_cpu.set_defaults()

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top

from dastc_jax import errors  # pylint: disable=g-import-not-at-top
from dastc_jax import flag_errors  # pylint: disable=g-import-not-at-top
from dastc_jax.flow import generate  # pylint: disable=g-import-not-at-top
from dastc_jax.flow import raft  # pylint: disable=g-import-not-at-top
from dastc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top

_DATASET = flags.DEFINE_enum(
    'dataset', None, generate.DATASETS, 'Video dataset whose flows to compute.'
)
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'The dataset folder in its original layout.'
)
_WEIGHTS = flags.DEFINE_string(
    'weights',
    None,
    'torchvision RAFT weights (.pth/.safetensors) or a '
    'folder converted by `python -m dastc_jax.convert`.',
)
_VARIANT = flags.DEFINE_enum(
    'variant',
    None,
    sorted(raft.VARIANTS),
    "Expected RAFT variant (default: the file's).",
)
_ITERATIONS = flags.DEFINE_integer(
    'iterations', 12, 'RAFT recurrent updates per pair.'
)
_SPLITS = flags.DEFINE_list(
    'splits', None, 'Splits (default: every split ' 'whose frames are present).'
)
_TRAIN_FLOW_DIR = flags.DEFINE_string(
    'train_flow_dir',
    None,
    'Output folder of the train split (default: the '
    'reference location beside --manual_dir, where prepare looks).',
)
_VAL_FLOW_DIR = flags.DEFINE_string(
    'val_flow_dir', None, 'Output folder of the val split.'
)
_SIZE = flags.DEFINE_list(
    'size',
    None,
    'H,W to estimate and store at '
    '(multiples of 8; default: the reference size).',
)
_BATCH = flags.DEFINE_integer(
    'batch_size', 0, 'Pairs per step (default: 2 ' 'per local device).'
)
flags.mark_flags_as_required(['dataset', 'manual_dir', 'weights'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize_if_requested()
  # pylint: disable=g-import-not-at-top
  from dastc_jax.flow import estimate

  size = None
  if _SIZE.value:
    try:
      size = tuple(int(v) for v in _SIZE.value)
      assert len(size) == 2
    except (ValueError, AssertionError):
      raise app.UsageError(
          f'--size={",".join(_SIZE.value)}: expected H,W.'
      ) from None
  splits, dirs = generate.default_splits_and_dirs(
      _DATASET.value,
      _MANUAL_DIR.value,
      _SPLITS.value,
      {'train': _TRAIN_FLOW_DIR.value, 'val': _VAL_FLOW_DIR.value},
  )
  estimator = estimate.RaftEstimator(
      _WEIGHTS.value, iterations=_ITERATIONS.value, variant=_VARIANT.value
  )
  logging.info(
      'RAFT %s on %d local device(s), host %d/%d',
      estimator.meta['variant'],
      len(estimator.devices),
      jax.process_index(),
      jax.process_count(),
  )
  stats = generate.run(
      _DATASET.value,
      _MANUAL_DIR.value,
      splits,
      dirs,
      estimator,
      hw=size,
      batch_size=_BATCH.value,
      host=(jax.process_index(), jax.process_count()),
  )
  print(
      json.dumps(
          {
              'dataset': _DATASET.value,
              'estimator': estimator.name,
              'splits': stats,
          }
      )
  )


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(errors.report_user_errors(main), flags_parser=flag_errors.parse)
