"""How long the suite's largest programs take to build: the smoke DA-STC step.

    python -m tests.compile_time cnn            # configs/synthetic.py:smoke
    python -m tests.compile_time vit --devices=4 --bfloat16

Builds the ``:smoke`` config's DA-STC step (``train.source_only_steps=0``)
with the test suite's JAX settings (8 simulated CPU devices,
``jax_disable_most_optimizations``, ``XLA_FLAGS`` from the environment
appended) on the tiny synthetic world, and prints the seconds of tracing,
lowering to StableHLO and XLA compiling, and the StableHLO's size. Nothing
is cached, so every run compiles. Used for ``benchmarks/test_suite.md``.
"""

import argparse
import os
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', choices=('cnn', 'vit'))
  parser.add_argument('--devices', type=int, default=1,
                      help='data-parallel devices of the mesh')
  parser.add_argument('--bfloat16', action='store_true',
                      help='compute in bfloat16 (config.model.dtype)')
  parser.add_argument('--world_cache', default=os.path.join(
      tempfile.gettempdir(), 'dastc_compile_time_world'),
                      help='where the tiny synthetic world is generated once')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  jax.config.update('jax_disable_most_optimizations', True)

  # pylint: disable=g-import-not-at-top
  from configs import synthetic
  from configs import viper_vit
  from dastc_jax import train
  from dastc_jax.data import pipeline
  from dastc_jax.runtime import sharding as sharding_lib
  from dastc_jax.runtime import state as state_lib
  from dastc_jax.runtime import steps
  # pylint: enable=g-import-not-at-top

  c = (viper_vit if args.model == 'vit' else synthetic).get_config('smoke')
  c.data.synthetic.cache_dir = args.world_cache
  c.train.source_only_steps = 0
  if args.bfloat16:
    c.model.dtype = 'bfloat16'
  root = train.resolve_data_root(c)
  batch = next(iter(pipeline.make_train_dataset(
      c, root, local_batch_size=c.train.batch_size)))
  graphdef, state, tx = state_lib.create_train_state(
      c, sizes=state_lib.carried_sizes(c, root))
  mesh = jax.make_mesh((args.devices, 1), sharding_lib.BATCH_AXES,
                       axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:args.devices])
  data = sharding_lib.data_sharding(mesh)
  state_sharding = sharding_lib.state_shardings(state, mesh)
  fn = jax.jit(steps.make_dastc_step(c, graphdef, tx),
               in_shardings=(state_sharding, data),
               out_shardings=(state_sharding, sharding_lib.replicated(mesh)))
  state = jax.device_put(state, state_sharding)
  batch = sharding_lib.shard_batch(batch, data)

  t0 = time.perf_counter()
  traced = fn.trace(state, batch)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lines = lowered.as_text().count('\n')
  t3 = time.perf_counter()
  lowered.compile()
  t4 = time.perf_counter()
  print(f'{args.model} step, {args.devices} device(s), '
        f'{"bfloat16" if args.bfloat16 else "float32"}: trace {t1 - t0:.1f} s, '
        f'lower {t2 - t1:.1f} s, XLA compile {t4 - t3:.1f} s; '
        f'{lines} lines of StableHLO. '
        f'XLA_FLAGS={os.environ["XLA_FLAGS"].strip()}')


if __name__ == '__main__':
  main()
