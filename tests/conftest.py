"""Test setup: 8 simulated CPU devices, parsed absl flags, shared fixtures."""

import os
import sys

# Must run before jax is imported anywhere. The simulated devices share 2
# cores with the other test worker: a device thread can fall behind its
# peers by more than XLA:CPU's 40 s before a collective, which XLA ends with
# an abort ("Termination timeout ... exceeded"); they get 10 minutes.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' --xla_force_host_platform_device_count=8'
    + ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
    + ' --xla_cpu_collective_timeout_seconds=600'
    # With XLA:CPU's concurrency-optimised scheduler, the 2-device HRDA
    # smoke step run after the 1- vs 4-device DA-STC test in one process
    # deadlocked in 4 of 4 tries (device 0 waiting in all-reduce op 136,
    # device 1 in op 36, until the timeout aborted the process); with the
    # default scheduler it passed. docs/testing.md.
    + ' --xla_cpu_enable_concurrency_optimized_scheduler=false'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# torch's dynamo (which transformers imports) imports triton whenever the
# package is installed, and triton loaded into a process that already holds
# TensorFlow (clu brings it in the train tests) segfaults it. The tests run
# PyTorch eagerly on the CPU, which needs no triton: a None entry makes its
# import fail cleanly, so torch treats it as absent.
sys.modules.setdefault('triton', None)

# grain reads absl flags in workers (google/grain#1355).
flags.FLAGS.mark_as_parsed()
# Share compiled executables between tests that build identical steps, and
# with the subprocess runs of test_faults.py and test_scale.py, which read
# this setting: JAX puts the folder's path into the compile options, so two
# spellings of it (`tests/../.jax_cache`, `.jax_cache`) give every program
# two cache keys.
jax.config.update(
    'jax_compilation_cache_dir',
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        '.jax_cache',
    ),
)
# Every program, however small: tests that run a model eagerly compile
# hundreds of single primitives (about 25 ms each), which a threshold would
# leave to be compiled again in every run (test_teacher_start.py's first
# test: 17.7 s -> 7.4 s with a warm cache).
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
# Tests are compile-bound (tiny models): trade run time for compile time.
jax.config.update('jax_disable_most_optimizations', True)


# Integration tests build the tiny synthetic world (any of these fixtures),
# train, evaluate, or run a command in a subprocess (marked by hand); every
# other test is a unit test of pure functions on tiny arrays. Both run in
# CI; `pytest -m "not integration"` runs the unit tests alone.
_WORLD_FIXTURES = frozenset(
    {'world_cache', 'tiny_world', 'tiny_data', 'smoke_config', 'weights'}
)
# The longest integration tests (SIGKILLed subprocess runs, multi-device
# DA-STC steps, the 2-process run) start first so that the two xdist
# workers finish together.
_LONGEST_FIRST = (
    'test_faults.py',
    'test_dastc.py',
    'test_vit.py',
    'test_scale.py',
)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if _WORLD_FIXTURES & set(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.integration)

  def order(item):
    module = item.path.name
    long_first = (
        _LONGEST_FIRST.index(module)
        if module in _LONGEST_FIRST
        else len(_LONGEST_FIRST)
    )
    # Grouped tests (one xdist worker each) first, so that the groups are
    # the first work units and go to different workers.
    return (
        item.get_closest_marker('integration') is None,
        item.get_closest_marker('xdist_group') is None,
        long_first,
    )

  items.sort(key=order)


@pytest.fixture(scope='session')
def world_cache(tmp_path_factory):
  """Cache folder shared by every test that needs the tiny synthetic world."""
  return str(tmp_path_factory.mktemp('world_cache'))


@pytest.fixture(scope='session')
def tiny_world(world_cache):
  """Generates (once) the tiny synthetic world; returns its folder."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from dastc_jax.data.synthetic import world as synthetic  # pylint: disable=g-import-not-at-top

  cfg = common.synthetic_world('tiny')
  cfg.cache_dir = world_cache
  return synthetic.ensure_world(cfg, num_workers=1)


@pytest.fixture
def smoke_config(world_cache):
  """The synthetic :smoke config with the world cached under pytest's tmp.

  Three steps (one source-only warm-start step, two DA-STC steps, the
  second of which pastes from the carried state). Tests that train DA-STC
  keep this config unchanged so that they share one compiled step.
  """
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top

  c = synthetic_config.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  c.train.num_steps = 3
  c.mesh.data = 4  # the global batch of 4 on 4 of the 8 devices
  return c


@pytest.fixture(scope='session')
def tiny_data(tiny_world):
  """The tiny world's prepared TFDS folder (what the pipeline reads)."""
  from dastc_jax.data.synthetic import world as synthetic  # pylint: disable=g-import-not-at-top

  return os.path.join(tiny_world, synthetic.TFDS_DIR)


@pytest.fixture
def weights(smoke_config, tmp_path):
  """Random weights of the smoke model as a (converted-style) checkpoint."""
  from dastc_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  _, params, stats = state_lib.init_model(smoke_config, 0)
  root = str(tmp_path / 'weights' / 'checkpoints')
  ckpt = checkpointing.Checkpointer(root, async_save=False)
  ckpt.save(0, {'params': params, 'batch_stats': stats})
  ckpt.close()
  return os.path.dirname(root)
