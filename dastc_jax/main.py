"""Entry point: parses flags and calls train.py.

  python -m dastc_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m dastc_jax.main --config=configs/viper.py:smoke --workdir=/tmp/x \
      --config.train.num_steps=4
  python -m dastc_jax.main --config=configs/synthetic.py --workdir=runs/demo \
      --mode=eval [--checkpoint=STEP|DIR] [--watch]
  python -m dastc_jax.main --config=configs/viper.py --mode=predict \
      --checkpoint=WEIGHTS --input=VIDEO_OR_FRAMES --output=OUT

Set DASTC_DISTRIBUTED=1 (the launch/ scripts do) to call
``jax.distributed.initialize()`` for multi-host runs. On SLURM and Cloud TPU
it finds its peers itself; elsewhere set DASTC_COORDINATOR (host:port),
DASTC_NUM_PROCESSES and DASTC_PROCESS_ID.
"""

import sys

from dastc_jax.runtime import host_malloc
from dastc_jax.runtime import xla_cpu

# Before any thread allocates and before JAX starts the CPU backend; not
# for frames above host_malloc.MAX_PIXELS (the --config file decides).
_MALLOC = host_malloc.configure(
    pixels=host_malloc.pixels_from_argv(sys.argv[1:])
)

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from dastc_jax import errors  # pylint: disable=g-import-not-at-top
from dastc_jax import flag_errors  # pylint: disable=g-import-not-at-top
from dastc_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
from dastc_jax.runtime import log_filter  # pylint: disable=g-import-not-at-top
from dastc_jax.runtime import oom  # pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:variant]).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Output folder (train, eval).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to run.')
flags.DEFINE_string(
    'checkpoint',
    '',
    'eval/predict: a step, a step folder '
    '(that checkpoint), or a folder of checkpoints (eval: '
    'every one; predict: the latest); default: the '
    'checkpoints of --workdir.',
)
flags.DEFINE_bool(
    'watch',
    False,
    'eval: keep evaluating new checkpoints ' 'until the last training step.',
)
flags.DEFINE_float(
    'watch_interval', 60.0, 'eval --watch: seconds between ' 'polls.'
)
flags.DEFINE_float(
    'watch_timeout',
    3600.0,
    'eval --watch: stop after this '
    'many seconds without a new checkpoint (0 = never).',
)
flags.DEFINE_string(
    'input',
    None,
    'predict: a video file or a folder of frames (sorted by name); '
    "'synthetic': the built-in world's validation frames.",
)
flags.DEFINE_string('output', None, 'predict: output folder.')
flags.DEFINE_string(
    'flows',
    None,
    'predict: folder of flows t->t-1 '
    '(<frame name>.npy or .flo, [H, W, 2]); default: '
    'computed with RAFT (--flow_weights) or OpenCV DIS.',
)
flags.DEFINE_string(
    'flow_weights',
    None,
    'predict: RAFT weights (a '
    'torchvision RAFT file or a converted folder) to compute '
    'the flows with; default: OpenCV DIS.',
)
flags.DEFINE_enum(
    'video_format',
    'mp4',
    ['mp4', 'gif', 'none'],
    'predict: animation written beside the PNG overlays.',
)
flags.DEFINE_float(
    'fps',
    0.0,
    'predict: animation frame rate (default: '
    "the video's, or 10 for frames).",
)
flags.DEFINE_integer(
    'max_frames', 0, 'predict: stop after this many ' 'frames (0 = all).'
)
flags.DEFINE_bool(
    'allow_config_change',
    False,
    'train: resume a workdir although keys that change training differ from '
    'its last config (both configs are kept).',
)
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # XLA:CPU flags by the config's frame size, before the backend starts.
  xla_flags = xla_cpu.set_defaults(
      pixels=xla_cpu.train_pixels(FLAGS.config),
      model=FLAGS.config.model.name,
  )
  log_filter.install()
  distributed.initialize_if_requested()
  logging.info(
      'JAX process %d/%d, local devices %s',
      jax.process_index(),
      jax.process_count(),
      jax.local_devices(),
  )
  logging.info('Host malloc settings (host_malloc.py): %s', _MALLOC)
  logging.info('XLA_FLAGS (xla_cpu.py): %s', xla_flags or '(none)')
  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'predict':
    from dastc_jax.evaluation import predict

    for name in ('input', 'output'):
      if not getattr(FLAGS, name):
        raise app.UsageError(f'--mode=predict needs --{name}.')
    if not (FLAGS.checkpoint or FLAGS.workdir):
      raise app.UsageError(
          '--mode=predict needs --checkpoint (or the ' '--workdir of a run).'
      )
    with oom.reported('prediction'):
      predict.run(
          FLAGS.config,
          checkpoint=FLAGS.checkpoint,
          workdir=FLAGS.workdir or '.',
          input_path=FLAGS.input,
          output=FLAGS.output,
          flows=FLAGS.flows,
          flow_weights=FLAGS.flow_weights,
          video_format=FLAGS.video_format,
          fps=FLAGS.fps,
          max_frames=FLAGS.max_frames,
      )
    return
  if not FLAGS.workdir:
    raise app.UsageError(f'--mode={FLAGS.mode} needs --workdir.')
  if FLAGS.mode == 'train':
    from dastc_jax.runtime import preemption
    from dastc_jax import train
    # A SIGTERM saves a checkpoint, then exits with 75 (preemption.py).
    with oom.reported('training (train steps and evaluation)'):
      preemption.exit_if_preempted(
          train.train_and_evaluate,
          FLAGS.config,
          FLAGS.workdir,
          allow_config_change=FLAGS.allow_config_change,
      )
  else:
    from dastc_jax.evaluation import eval_job

    with oom.reported('evaluation'):
      eval_job.run(
          FLAGS.config,
          FLAGS.workdir,
          FLAGS.checkpoint,
          watch=FLAGS.watch,
          watch_interval=FLAGS.watch_interval,
          watch_timeout=FLAGS.watch_timeout,
      )


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(errors.report_user_errors(main), flags_parser=flag_errors.parse)
