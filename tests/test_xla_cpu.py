"""The XLA:CPU default flags: appended once, user settings win, valid flags."""

import os
import subprocess
import sys

import pytest

from dastc_jax.runtime import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_appends_defaults_once_and_keeps_user_flags():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  v = xla_cpu.set_defaults(env)
  assert v == (
      '--xla_force_host_platform_device_count=4 '
      '--xla_cpu_experimental_ynn_fusion_type=+eltwise'
  )
  assert xla_cpu.set_defaults(env) == v  # idempotent
  assert xla_cpu.set_defaults({}) == (
      '--xla_cpu_experimental_ynn_fusion_type=+eltwise'
  )


def test_the_fusion_flag_is_chosen_by_the_training_frame_size():
  """Only runs whose largest training frame is at most 256x512 get the
  flag: it doubles the step's temporaries at the real sizes."""
  from configs import gta5  # pylint: disable=g-import-not-at-top
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from configs import viper  # pylint: disable=g-import-not-at-top

  assert xla_cpu.train_pixels(viper.get_config()) == 720 * 1280
  assert xla_cpu.train_pixels(gta5.get_config()) == 512 * 512
  assert xla_cpu.train_pixels(synthetic.get_config()) == 72 * 128
  assert xla_cpu.train_pixels(synthetic.get_config('smoke')) == 40 * 72
  c = viper.get_config()
  c.data.source.image_size = None  # native size of a real dataset: unknown
  assert xla_cpu.train_pixels(c) is None
  flag = '--xla_cpu_experimental_ynn_fusion_type=+eltwise'
  assert xla_cpu.set_defaults({}, pixels=72 * 128) == flag
  assert xla_cpu.set_defaults({}, pixels=256 * 512) == flag
  assert xla_cpu.set_defaults({}, pixels=720 * 1280) == ''
  assert xla_cpu.set_defaults({'XLA_FLAGS': '--a=1'}, pixels=None) == '--a=1'
  # ...and by the model: the ResNet models get it, the transformers not.
  for name in ('accel_deeplabv2', 'deeplabv2'):
    assert xla_cpu.set_defaults({}, pixels=72 * 128, model=name) == flag
  for name in ('accel_daformer', 'daformer'):
    assert xla_cpu.set_defaults({}, pixels=72 * 128, model=name) == ''


def test_strip_defaults_restores_the_user_flags():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  assert xla_cpu.strip_defaults(xla_cpu.set_defaults(env)) == (
      '--xla_force_host_platform_device_count=4'
  )


def test_user_value_and_opt_out_win():
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=-reduce'}
  assert xla_cpu.set_defaults(env) == (
      '--xla_cpu_experimental_ynn_fusion_type=-reduce'
  )
  env = {'XLA_FLAGS': '--a=1', 'DASTC_XLA_CPU_DEFAULTS': '0'}
  assert xla_cpu.set_defaults(env) == '--a=1'


@pytest.mark.integration
def test_flags_are_accepted_by_this_jaxlib():
  # XLA aborts on an unknown flag when the backend starts; run a conv+BN+ReLU
  # with the defaults in a fresh process and compare with the default
  # fusion (same result up to float summation order).
  code = (
      'import numpy as np, jax, jax.numpy as jnp\n'
      'x = np.random.default_rng(0).normal(size=(1, 9, 9, 8)).astype("f")\n'
      'w = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype("f")\n'
      'f = lambda x, w: jax.nn.relu(0.5 * jax.lax.conv_general_dilated('
      'x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))'
      ' + x)\n'
      'print(repr(np.asarray(jax.jit(f)(x, w)).sum()))\n'
  )
  outs = []
  for opt in ('1', '0'):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(DASTC_XLA_CPU_DEFAULTS=opt, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    proc = subprocess.run(
        [
            sys.executable,
            '-c',
            'from dastc_jax.runtime import xla_cpu; xla_cpu.set_defaults()\n'
            + code,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(
        float(proc.stdout.strip().splitlines()[-1].strip('np.float32()'))
    )
  assert abs(outs[0] - outs[1]) <= 1e-4 * abs(outs[1])
