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

import glob
import os
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


def _config_path(argv: list[str]) -> str | None:
  """The file of ``--config=PATH[:variant]`` in ``argv`` (None: absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return value.split(':', 1)[0]
  return None


def _chain(e: BaseException) -> list[BaseException]:
  """``e`` and the exceptions it was raised while handling."""
  out = [e]
  while out[-1].__context__ is not None and len(out) < 20:
    out.append(out[-1].__context__)
  return out


def _flag_error_line(e: Exception, argv: list[str]) -> str:
  """One line for a bad ``--config`` variant or override (or any other
  flag error: its first line)."""
  chain = _chain(e)
  hinted = next(
      (
          x
          for x in chain
          if isinstance(x, KeyError) and 'Did you mean' in str(x.args[0])
      ),
      None,
  )
  if hinted is not None:
    lines = str(hinted.args[0]).strip().splitlines()
    key = lines[0].strip('\'"')
    flag = next(
        (
            a.split('=')[0]
            for a in argv
            if a.startswith('--config.') and key in a
        ),
        '--config.*',
    )
    return (
        f'{flag}: the config has no key {key!r}. {" ".join(lines[1:])} '
        '(configs/common.py declares every key)'
    )
  variant = next(
      (
          x
          for x in reversed(chain)
          if isinstance(x, ValueError)
          and not isinstance(x, flags.Error)
          and 'variant' in str(x)
      ),
      None,
  )
  if variant is not None:
    return f'--config: {variant}'
  text = str(e).strip()
  first = text.splitlines()[0] if text else repr(e)
  return first[len('flag ') :] if first.startswith('flag --') else first


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a missing config file, an unknown variant or a
  misspelt override ends with one line on stderr and exit status 2."""
  path = _config_path(argv[1:])
  if path is not None and not os.path.exists(path):
    near = sorted(glob.glob(os.path.join(os.path.dirname(path) or '.', '*.py')))
    near = [os.path.basename(p) for p in near if not p.endswith('__init__.py')]
    print(
        f'error: --config: no such file {path!r}'
        + (
            f'; {os.path.dirname(path) or "."} has {", ".join(near)}'
            if near
            else ''
        )
        + '.',
        file=sys.stderr,
    )
    sys.exit(2)
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    print(f'error: {_flag_error_line(e, argv)}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # XLA:CPU flags by the config's frame size, before the backend starts.
  xla_flags = xla_cpu.set_defaults(pixels=xla_cpu.train_pixels(FLAGS.config))
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
  app.run(errors.report_user_errors(main), flags_parser=parse_flags)
