"""Scale-out: the (data, fsdp) mesh, BatchNorm groups, bf16, FSDP on the 8
simulated devices, a real 2-process jax.distributed run, and the launch
scripts. (The DA-STC step on 1 device, 4 data-parallel devices and 4 FSDP
devices: tests/test_dastc.py.)"""

import os
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dastc_jax.data import pipeline
from dastc_jax.models import layers
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import steps as step_lib
from dastc_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp_shards_the_largest_divisible_dimension():
  spec = sharding_lib._fsdp_spec  # pylint: disable=protected-access
  assert spec((3, 3, 64, 256), 4) == jax.P(None, None, None, 'fsdp')
  assert spec((1024, 30), 4) == jax.P('fsdp', None)
  assert spec((30, 1022), 4) == jax.P()  # nothing divisible: replicated
  assert spec((256,), 4) == jax.P()  # small leaves stay replicated
  assert spec((3, 3, 64, 256), 1) == jax.P()


def test_mesh_from_config():
  c = ml_collections.ConfigDict({'mesh': {'data': -1, 'fsdp': 2}})
  mesh = sharding_lib.make_mesh(c)
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {
      'data': 4,
      'fsdp': 2,
  }
  assert sharding_lib.data_sharding(mesh).spec == jax.P(('data', 'fsdp'))
  c.mesh.fsdp = 3
  with pytest.raises(ValueError, match='must divide the 8 devices'):
    sharding_lib.make_mesh(c)
  c.mesh.fsdp, c.mesh.data = 2, 8
  with pytest.raises(ValueError, match='8 devices are available'):
    sharding_lib.make_mesh(c)


def test_bn_group_size_one_normalises_each_example_on_its_own():
  x = (
      jax.random.normal(jax.random.key(0), (4, 5, 6, 3))
      * jnp.array([1.0, 2.0, 3.0])
      + jnp.arange(4.0)[:, None, None, None]
  )
  grouped = layers.BatchNorm(3, group_size=1)
  y = grouped(x, train=True)
  for i in range(4):
    alone = layers.BatchNorm(3)
    np.testing.assert_allclose(
        y[i : i + 1], alone(x[i : i + 1], train=True), rtol=1e-5, atol=1e-5
    )
  # Running averages move by the mean of the groups' statistics.
  mean = jnp.mean(x, axis=(1, 2))  # [4, C]
  np.testing.assert_allclose(
      grouped.mean[...], 0.1 * jnp.mean(mean, 0), rtol=1e-5
  )
  whole = layers.BatchNorm(3, group_size=0)
  assert not np.allclose(whole(x, train=True), y)
  with pytest.raises(ValueError, match='does not divide the batch'):
    layers.BatchNorm(3, group_size=3)(x, train=True)


def _one_step(config, state, batch, mesh):
  data = sharding_lib.data_sharding(mesh)
  st_sh = sharding_lib.state_shardings(state, mesh)
  graphdef, _, tx = state_lib.create_train_state(config)
  fn = jax.jit(
      step_lib.make_train_step(config, graphdef, tx),
      in_shardings=(st_sh, data),
      out_shardings=(st_sh, sharding_lib.replicated(mesh)),
  )
  new_state, metrics = fn(
      jax.device_put(state, st_sh), sharding_lib.shard_batch(batch, data)
  )
  return new_state, jax.device_get(metrics)


def test_fsdp_step_on_8_devices_matches_single_device(smoke_config):
  """data=2 x fsdp=4 (8 devices), global batch 8, against 1 device; the
  parameters and optimizer state really live in quarters. Then data=8."""
  assert jax.device_count() == 8
  c = smoke_config
  c.method = 'source_only'
  c.train.batch_size = 8
  c.optim.name, c.optim.lr, c.optim.momentum = 'sgd', 0.01, 0.9
  root = train.resolve_data_root(c)
  batch = next(
      iter(
          pipeline.make_train_dataset(
              c, root, local_batch_size=8, with_target=False
          )
      )
  )
  _, state, _ = state_lib.create_train_state(c)
  c.mesh.data, c.mesh.fsdp = 1, 1
  s1, m1 = _one_step(c, state, batch, sharding_lib.make_mesh(c))
  c.mesh.data, c.mesh.fsdp = 2, 4
  s4, m4 = _one_step(c, state, batch, sharding_lib.make_mesh(c))
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m4['grad_norm'], m1['grad_norm'], rtol=1e-5)
  sharded = [
      x
      for x in jax.tree.leaves((s4.params, s4.opt_state))
      if 'fsdp' in str(x.sharding.spec)
  ]
  assert len(sharded) > 10  # kernels and their momentum buffers
  for x in sharded:
    assert x.addressable_shards[0].data.size * 4 == x.size
  chex.assert_trees_all_close(
      jax.device_get(s4.params), jax.device_get(s1.params), rtol=1e-5, atol=1e-6
  )
  # Pure data parallelism over all 8 devices: the same step again. Params
  # agree to a few float32 ULPs (updates are ~1e-6 of them); the BatchNorm
  # averages to reduction-order noise.
  c.mesh.data, c.mesh.fsdp = 8, 1
  s8, m8 = _one_step(c, state, batch, sharding_lib.make_mesh(c))
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-5)
  s1, s8 = jax.device_get(s1), jax.device_get(s8)
  chex.assert_trees_all_close(s8.params, s1.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(
      s8.batch_stats, s1.batch_stats, rtol=1e-4, atol=1e-5
  )


def test_bf16_compute_stays_close_to_float32(smoke_config):
  c = smoke_config
  c.method = 'source_only'
  c.train.batch_size = 8  # the float32 step is the FSDP test's 1-device one
  c.optim.name, c.optim.lr, c.optim.momentum = 'sgd', 0.01, 0.9
  root = train.resolve_data_root(c)
  it = iter(
      pipeline.make_train_dataset(
          c, root, local_batch_size=8, with_target=False
      )
  )
  batches = [next(it) for _ in range(3)]
  c.mesh.data, c.mesh.fsdp = 1, 1
  mesh = sharding_lib.make_mesh(c)
  _, init, _ = state_lib.create_train_state(c)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    c.model.dtype = dtype
    state, losses[dtype] = init, []
    for b in batches:
      state, m = _one_step(c, state, b, mesh)
      losses[dtype].append(float(m['loss']))
    # Parameters, BN averages and optimizer state stay float32.
    for x in jax.tree.leaves(
        (state.params, state.batch_stats, state.opt_state)
    ):
      assert x.dtype in (jnp.float32, jnp.int32), x.dtype
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=2e-2)
  assert losses['bfloat16'] != losses['float32']  # really computed in bf16


def _launch_two(workdir, world_cache, steps, port, **kw):
  procs, logs = _start_two(workdir, world_cache, steps, port, **kw)
  outs = []
  for p, log in zip(procs, logs):
    p.wait(timeout=600)
    log.seek(0)
    outs.append(log.read())
    log.close()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _start_two(workdir, world_cache, steps, port, checkpoint_every=None):
  """Starts the two processes of a source-only smoke run; returns them and
  their log files."""
  procs, logs = [], []
  for pid in range(2):
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        DASTC_DISTRIBUTED='1',
        DASTC_COORDINATOR=f'localhost:{port}',
        DASTC_NUM_PROCESSES='2',
        DASTC_PROCESS_ID=str(pid),
        XLA_FLAGS='--xla_force_host_platform_device_count=1',
        # Fast compiles, shared between the launches (CI budget).
        JAX_DISABLE_MOST_OPTIMIZATIONS='1',
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1',
    )
    # Output to files: two pipes read one after the other could block.
    logs.append(tempfile.TemporaryFile('w+'))
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'dastc_jax.main',
                '--config=configs/synthetic.py:smoke',
                f'--workdir={workdir}',
                '--config.method=source_only',
                f'--config.train.num_steps={steps}',
                f'--config.data.synthetic.cache_dir={world_cache}',
                '--config.mesh.data=-1',
                f'--config.train.checkpoint_every={checkpoint_every or steps}',
                '--config.train.log_every=1',
                '--config.eval.splits=()',
            ],
            env=env,
            cwd=REPO,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
  return procs, logs


@pytest.mark.integration
def test_preemption_notice_to_one_of_two_processes(
    tmp_path, world_cache, tiny_world
):
  """A real 2-process ``jax.distributed`` run (one CPU device each) trains,
  saves and resumes. SIGTERM reaches process 1 only: both processes stop
  at the same step
  (JAX's preemption sync point), save one consistent checkpoint and exit
  75; the rerun resumes from it and ends bitwise equal (train state and
  both processes' data iterators) to an uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from dastc_jax.benchmarks import faults  # pylint: disable=g-import-not-at-top

  del tiny_world
  steps = 12
  port = 21000 + os.getpid() % 20000
  ref = str(tmp_path / 'ref')
  outs = _launch_two(ref, world_cache, steps, port)
  assert 'JAX process 1/2' in outs[1] and 'JAX process 0/2' in outs[0]
  run = str(tmp_path / 'run')
  procs, logs = _start_two(
      run, world_cache, steps, port + 1, checkpoint_every=100
  )
  t0 = time.time()
  while time.time() - t0 < 300:
    logs[1].flush()
    logs[1].seek(0)
    if f'step 3/{steps}' in logs[1].read():
      break
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = []
  for p, log in zip(procs, logs):
    p.wait(timeout=300)
    log.seek(0)
    outs.append(log.read())
    log.close()
  assert [p.returncode for p in procs] == [75, 75], outs[1][-3000:]
  saved = [int(s) for s in os.listdir(os.path.join(run, 'checkpoints'))]
  assert len(saved) == 1 and 3 <= saved[0] < steps
  for out in outs:  # both stopped at that step
    assert f'saved checkpoint step {saved[0]}' in out
  outs = _launch_two(run, world_cache, steps, port + 2, checkpoint_every=100)
  assert f'Training from step {saved[0]} to {steps}' in outs[0]
  a, ia = faults.final_state(ref, steps)
  b, ib = faults.final_state(run, steps)
  assert not faults.bitwise_diff(a, b)
  assert ia == ib and len(ia) == 2


def _dry(script, *args):
  proc = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', script), '--dry-run', *args],
      capture_output=True,
      text=True,
      timeout=30,
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


@pytest.mark.integration
def test_launch_scripts_dry_run(tmp_path):
  out = _dry(
      'tpu_pod.sh',
      '--setup',
      'my-tpu',
      'us-central2-b',
      '--',
      '--config=configs/viper.py',
      '--workdir=gs://b/run',
  )
  assert 'gcloud compute tpus tpu-vm ssh my-tpu' in out
  assert '--worker=all' in out and 'jax\\[tpu\\]==0.10.2' in out
  assert 'DASTC_DISTRIBUTED=1' in out and 'tpu-vm scp' in out
  out = _dry(
      'slurm.sh',
      '--nodes=2',
      '--gpus-per-node=4',
      '--',
      '--config=configs/viper.py',
      '--workdir=/nfs/run',
  )
  assert '#SBATCH --nodes=2' in out and '#SBATCH --ntasks-per-node=4' in out
  assert "srun bash -c 'export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in out
  out = _dry('slurm.sh', '--per=node', '--', '--workdir=/nfs/run')
  assert '#SBATCH --ntasks-per-node=1' in out
  assert 'CUDA_VISIBLE_DEVICES' not in out
  for step in (300, 600, 1200):
    os.makedirs(tmp_path / 'checkpoints' / str(step))
  os.makedirs(tmp_path / 'checkpoints' / '900.orbax-checkpoint-tmp-5')
  out = _dry(
      'eval_array.sh',
      '--',
      '--config=configs/viper.py',
      f'--workdir={tmp_path}',
  )
  assert 'checkpoint steps: 300 600 1200' in out  # not the unfinished 900
  assert '#SBATCH --array=0-2' in out
  out = _dry('single_node.sh', '--config=configs/viper.py', '--workdir=x')
  assert 'python -m dastc_jax.main --config=configs/viper.py' in out
