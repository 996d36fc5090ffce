"""Fault-injection benchmark: what each fault does to a training run.

  python -m dastc_jax.benchmarks.faults --output=benchmarks/faults.md

Runs ``python -m dastc_jax.main`` on the smoke DA-STC config (tiny model,
tiny synthetic world) in subprocesses and injects, one at a time:

* SIGKILL once checkpoint 2 is committed (on 1 and on 4 simulated devices),
  then the same command again;
* SIGTERM (a scheduler's preemption notice) at the same point;
* SIGKILL while a checkpoint is being written (a temporary checkpoint folder
  exists), at three delays;

and reports for each what the run did, the steps lost beyond the last
checkpoint, the checkpoints that look complete but do not restore, and
whether the final state equals (bitwise) an uninterrupted run's. The helpers
are shared with ``tests/test_faults.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from dastc_jax.benchmarks import provenance

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


DEVICE_FLAGS = '--xla_force_host_platform_device_count=8'


def command(
    workdir: str,
    cache_dir: str,
    devices: int,
    steps: int,
    extra: Sequence[str] = (),
) -> list[str]:
  """The training command of one fault run."""
  return [
      sys.executable,
      '-m',
      'dastc_jax.main',
      '--config=configs/synthetic.py:smoke',
      f'--workdir={workdir}',
      f'--config.data.synthetic.cache_dir={cache_dir}',
      f'--config.train.num_steps={steps}',
      f'--config.mesh.data={devices}',
      '--config.eval.splits=()',
      *extra,
  ]


def environment(
    jax_cache: str, xla_flags: str = DEVICE_FLAGS
) -> dict[str, str]:
  """The JAX setup of the test suite (8 simulated CPU devices, fast
  compiles, none of ``runtime/xla_cpu.py``'s defaults) with a shared
  compilation cache, so a run here computes bitwise what the same run
  inside pytest computes. ``xla_flags``: the test process's ``XLA_FLAGS``
  (they are part of the cache key)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(
      PYTHONPATH=REPO,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=xla_flags,
      DASTC_XLA_CPU_DEFAULTS='0',
      JAX_COMPILATION_CACHE_DIR=jax_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.25',
      JAX_DISABLE_MOST_OPTIMIZATIONS='1',
  )
  return env


def committed(workdir: str) -> list[int]:
  """Steps of the committed checkpoints (orbax renames them when done)."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def saving(workdir: str) -> bool:
  """True while orbax writes a checkpoint (its temporary folder exists)."""
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*')))


def run(
    workdir: str,
    cache_dir: str,
    devices: int,
    steps: int,
    extra: Sequence[str] = (),
    *,
    jax_cache: str,
    xla_flags: str = DEVICE_FLAGS,
    until: Callable[[str], bool] | None = None,
    delay: float = 0.0,
    sig: int = signal.SIGKILL,
) -> dict[str, Any]:
  """Runs training; sends ``sig`` ``delay`` s after ``until(workdir)`` holds.

  Returns:
    ``{'rc', 'log', 'signal_to_exit_s', 'last_logged_step'}``.
  """
  # The output goes to a file, not a pipe: a pipe nobody reads while the
  # loop below waits would fill up and block the run.
  with tempfile.TemporaryFile('w+') as log:
    proc = subprocess.Popen(
        command(workdir, cache_dir, devices, steps, extra),
        cwd=REPO,
        env=environment(jax_cache, xla_flags),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sent = None
    try:
      if until is not None:
        t0 = time.time()
        while proc.poll() is None and not until(workdir):
          if time.time() - t0 > 600:
            raise RuntimeError(
                f'{workdir}: the run never reached the fault ' 'point.'
            )
          time.sleep(0.002)
        if delay:
          time.sleep(delay)
        if proc.poll() is None:
          proc.send_signal(sig)
          sent = time.time()
      proc.wait(timeout=900)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.seek(0)
    out = log.read()
  logged = [int(m) for m in re.findall(r'step (\d+)/\d+', out)]
  return {
      'rc': proc.returncode,
      'log': out,
      'signal_to_exit_s': None if sent is None else time.time() - sent,
      'last_logged_step': max(logged) if logged else 0,
  }


def final_state(workdir: str, step: int) -> tuple[Any, dict[str, Any]]:
  """The raw saved train state and the data-iterator states of ``step``
  (``{file name: state}``, one per process)."""
  root = os.path.join(workdir, 'checkpoints')
  # On this process's first device, whatever topology saved it (a
  # multi-process run's checkpoint restores here too).
  path = os.path.join(root, str(step), 'state')
  ckpt = ocp.StandardCheckpointer()
  try:
    meta = ckpt.metadata(path)
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree
    )
    state = ckpt.restore(path, target)
  finally:
    ckpt.close()
  iters = {}
  for path in sorted(
      glob.glob(os.path.join(root, str(step), 'data_iter', 'process_*.json'))
  ):
    with open(path) as f:
      iters[os.path.basename(path)] = json.load(f)
  return state, iters


def bitwise_diff(a: Any, b: Any) -> list[str]:
  """Paths of the leaves that differ in structure, dtype, shape or bits."""

  def differs(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return (x.dtype, x.shape, x.tobytes()) != (y.dtype, y.shape, y.tobytes())

  try:
    flags = jax.tree_util.tree_map_with_path(
        lambda path, x, y: jax.tree_util.keystr(path)
        if differs(x, y)
        else None,
        a,
        b,
    )
  except ValueError:  # different tree structures
    return ['<tree structure>']
  return [p for p in jax.tree.leaves(flags) if p is not None]


def unrestorable(workdir: str) -> list[int]:
  """Committed steps whose state does not restore (must stay empty)."""
  bad = []
  for step in committed(workdir):
    try:
      final_state(workdir, step)
    except Exception:  # pylint: disable=broad-except
      bad.append(step)
  return bad


# ------------------------------------------------------------ the benchmark
def _scenarios(base: str, cache_dir: str, jax_cache: str) -> list[dict]:
  rows = []
  steps = 5
  extra = ('--config.train.checkpoint_every=2',)
  refs = {}
  for devices in (1, 4):
    ref = os.path.join(base, f'ref{devices}')
    r = run(ref, cache_dir, devices, steps, extra, jax_cache=jax_cache)
    assert r['rc'] == 0, r['log'][-3000:]
    refs[devices] = final_state(ref, steps)

  def resume_and_compare(name, workdir, devices, r, injected):
    last_ckpt = max(committed(workdir) or [0])
    lost = max(r['last_logged_step'] - last_ckpt, 0)
    broken = unrestorable(workdir)
    again = run(workdir, cache_dir, devices, steps, extra, jax_cache=jax_cache)
    state, it = (
        final_state(workdir, steps) if again['rc'] == 0 else (None, None)
    )
    diff = (
        bitwise_diff(refs[devices][0], state)
        if state is not None
        else ['<no final state>']
    )
    rows.append(
        {
            'fault': name,
            'injected': injected,
            'exit': r['rc'],
            'signal_to_exit_s': r['signal_to_exit_s'],
            'last_checkpoint': last_ckpt,
            'last_logged_step': r['last_logged_step'],
            'steps_lost': lost,
            'unrestorable_checkpoints': broken,
            'resume_exit': again['rc'],
            'bitwise_equal': not diff and it == refs[devices][1],
            'differing': diff[:3],
        }
    )

  for devices in (1, 4):
    w = os.path.join(base, f'kill{devices}')
    r = run(
        w,
        cache_dir,
        devices,
        steps,
        extra,
        jax_cache=jax_cache,
        until=lambda d: 2 in committed(d),
    )
    resume_and_compare(
        f'SIGKILL, {devices} device(s)',
        w,
        devices,
        r,
        'SIGKILL once checkpoint 2 is committed',
    )
  w = os.path.join(base, 'term')
  r = run(
      w,
      cache_dir,
      1,
      steps,
      extra,
      jax_cache=jax_cache,
      until=lambda d: 2 in committed(d),
      sig=signal.SIGTERM,
  )
  resume_and_compare(
      'SIGTERM (preemption)', w, 1, r, 'SIGTERM once checkpoint 2 is committed'
  )
  for delay in (0.0, 0.01, 0.05):
    w = os.path.join(base, f'save{delay}')
    r = run(
        w,
        cache_dir,
        1,
        steps,
        extra,
        jax_cache=jax_cache,
        until=lambda d: 2 in committed(d) and saving(d),
        delay=delay,
    )
    resume_and_compare(
        f'SIGKILL during a save (+{delay * 1000:.0f} ms)',
        w,
        1,
        r,
        'SIGKILL while a later checkpoint is written',
    )
  return rows


def report(rows: list[dict], cmd: str) -> str:
  """The markdown table of the scenarios."""
  lines = [
      '# Fault injection',
      '',
      f'Command: `{cmd}`',
      '',
      f'Date: {time.strftime("%Y-%m-%d")}, commit {provenance.commit()}. '
      'Smoke DA-STC config (tiny '
      'model, tiny synthetic world), 5 steps, checkpoints every 2 steps '
      '(and at the end), 2-core CPU with 8 simulated devices (the test '
      "suite's JAX setup: fast compiles, XLA's default CPU fusion), "
      'restarts with the same command. "Steps lost" = the '
      'last step the killed run logged minus its last committed '
      'checkpoint (work redone after the restart). "Bitwise" compares '
      'the final train state (parameters, optimizer, BatchNorm '
      'averages, EMA teacher, carried fusion clips, RNG, step) and the '
      'data-iterator position with an uninterrupted run.',
      '',
      '| fault | injected | exit status | signal to exit | last '
      'checkpoint | steps lost | checkpoints that look complete but '
      'do not restore | rerun | bitwise = uninterrupted |',
      '|---|---|---:|---:|---:|---:|---:|---:|---|',
  ]
  for r in rows:
    t = r['signal_to_exit_s']
    lines.append(
        f'| {r["fault"]} | {r["injected"]} | {r["exit"]} | '
        + (f'{t:.2f} s' if t is not None else '-')
        + f' | {r["last_checkpoint"]} | {r["steps_lost"]} | '
        f'{len(r["unrestorable_checkpoints"])} | exit {r["resume_exit"]} | '
        + ('yes' if r['bitwise_equal'] else f'**no** {r["differing"]}')
        + ' |'
    )
  lines += [
      '',
      'Exit status -9: killed by SIGKILL; 75: the preemption exit '
      '(EX_TEMPFAIL) after the SIGTERM save; 0: the run had already '
      'finished when the signal came.',
  ]
  return '\n'.join(lines) + '\n'


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv
  out = flags.FLAGS.output
  with tempfile.TemporaryDirectory() as base:
    cache_dir = flags.FLAGS.world_cache or os.path.join(base, 'world')
    rows = _scenarios(base, cache_dir, os.path.join(base, 'jax_cache'))
  md = report(
      rows, 'python -m dastc_jax.benchmarks.faults ' + ' '.join(sys.argv[1:])
  )
  print(md)
  if out:
    with open(out, 'w') as f:
      f.write(md)


if __name__ == '__main__':
  # Reading the runs' checkpoints needs their 8 simulated CPU devices; the
  # backend starts on first use, after this.
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('output', '', 'Markdown report.')
  flags.DEFINE_string(
      'world_cache',
      '',
      'Synthetic world cache folder ' '(default: a temporary one).',
  )
  app.run(main)
