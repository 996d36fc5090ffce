"""Entry point: parses flags and calls train.py.

  python -m dastc_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m dastc_jax.main --config=configs/viper.py:smoke --workdir=/tmp/x \
      --config.train.num_steps=4
  python -m dastc_jax.main --config=configs/synthetic.py --workdir=runs/demo \
      --mode=eval [--checkpoint=STEP|DIR]

Set DASTC_DISTRIBUTED=1 (the launch/ scripts do) to call
``jax.distributed.initialize()`` for multi-host runs. On SLURM and Cloud TPU
it finds its peers itself; elsewhere set DASTC_COORDINATOR (host:port),
DASTC_NUM_PROCESSES and DASTC_PROCESS_ID.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dastc_jax import log_filter

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:variant]).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Output folder.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'What to run.')
flags.DEFINE_string('checkpoint', '', 'eval mode: step, step folder or '
                    'checkpoint folder (default: latest in workdir).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS

def _initialize_distributed() -> None:
  """``jax.distributed.initialize`` from the cluster or DASTC_* variables."""
  kw = {}
  if 'DASTC_COORDINATOR' in os.environ:
    kw = dict(coordinator_address=os.environ['DASTC_COORDINATOR'],
              num_processes=int(os.environ['DASTC_NUM_PROCESSES']),
              process_id=int(os.environ['DASTC_PROCESS_ID']))
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    # Cross-process collectives on CPU (tests, debugging).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kw)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  log_filter.install()
  if os.environ.get('DASTC_DISTRIBUTED', '0') == '1':
    _initialize_distributed()
  logging.info('JAX process %d/%d, local devices %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  from dastc_jax import train  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
