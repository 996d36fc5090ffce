"""How long the suite's largest programs take to build: the smoke DA-STC step.

    python -m tests.compile_time cnn            # configs/synthetic.py:smoke
    python -m tests.compile_time vit --devices=4 --bfloat16
    python -m tests.compile_time cnn --devices=4 --fsdp=4 --metrics
    python -m tests.compile_time vit --set=model.scan_blocks=False

Builds the ``:smoke`` config's DA-STC step (``train.source_only_steps=0``)
with the test suite's JAX settings (8 simulated CPU devices,
``jax_disable_most_optimizations``, ``XLA_FLAGS`` from the environment
appended) on the tiny synthetic world, and prints the seconds of tracing,
lowering to StableHLO and XLA compiling, and the StableHLO's size; with
``--metrics`` it then runs the step once and prints some of its metrics
(to compare XLA flags by what they compute, not only how fast). The step
is ``tests/test_dastc.py``'s. Nothing is cached, so every run compiles.
Used for ``benchmarks/test_suite.md``.
"""

import argparse
import ast
import os
import tempfile
import time

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', choices=('cnn', 'vit'))
  parser.add_argument(
      '--devices', type=int, default=1, help='devices of the mesh'
  )
  parser.add_argument(
      '--fsdp',
      type=int,
      default=1,
      help='of those, how many shard the parameters',
  )
  parser.add_argument(
      '--metrics',
      action='store_true',
      help='run the step once and print some metrics',
  )
  parser.add_argument(
      '--bfloat16',
      action='store_true',
      help='compute in bfloat16 (config.model.dtype)',
  )
  parser.add_argument(
      '--world_cache',
      default=os.path.join(tempfile.gettempdir(), 'dastc_compile_time_world'),
      help='where the tiny synthetic world is generated once',
  )
  parser.add_argument(
      '--set',
      action='append',
      default=[],
      metavar='KEY=VALUE',
      help='config override, e.g. model.scan_blocks=False (repeatable)',
  )
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  jax.config.update('jax_disable_most_optimizations', True)

  # pylint: disable=g-import-not-at-top
  from configs import synthetic
  from configs import viper_vit
  from dastc_jax import train
  from dastc_jax.data import pipeline
  from dastc_jax.runtime import sharding as sharding_lib
  from tests import test_dastc
  # pylint: enable=g-import-not-at-top

  c = (viper_vit if args.model == 'vit' else synthetic).get_config('smoke')
  c.data.synthetic.cache_dir = args.world_cache
  c.train.source_only_steps = 0
  if args.bfloat16:
    c.model.dtype = 'bfloat16'
  for item in args.set:
    key, value = item.split('=', 1)
    *path, leaf = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[leaf] = ast.literal_eval(value)
  root = train.resolve_data_root(c)
  batch = next(
      iter(
          pipeline.make_train_dataset(
              c, root, local_batch_size=c.train.batch_size
          )
      )
  )
  fn, state, state_sharding, data = test_dastc.jitted_step(
      c, root, args.devices, args.fsdp
  )
  state = jax.device_put(state, state_sharding)
  batch = sharding_lib.shard_batch(batch, data)

  t0 = time.perf_counter()
  traced = fn.trace(state, batch)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lines = lowered.as_text().count('\n')
  t3 = time.perf_counter()
  compiled = lowered.compile()
  t4 = time.perf_counter()
  print(
      f'{args.model} step, {args.devices} device(s) (fsdp {args.fsdp}), '
      f'{"bfloat16" if args.bfloat16 else "float32"}: trace {t1 - t0:.1f} s, '
      f'lower {t2 - t1:.1f} s, XLA compile {t4 - t3:.1f} s; '
      f'{lines} lines of StableHLO. '
      f'XLA_FLAGS={os.environ["XLA_FLAGS"].strip()}'
  )
  if args.metrics:
    _, metrics = compiled(state, batch)
    for k in (
        'loss',
        'grad_norm',
        'feat_rel_diff_to_t_f0',
        'feat_rel_diff_to_t_f1',
    ):
      print(f'  {k} = {float(metrics[k]):.7g}')


if __name__ == '__main__':
  main()
