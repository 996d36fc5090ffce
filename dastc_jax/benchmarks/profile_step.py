"""Where a source-only train step's time goes, by part of the program.

  python -m dastc_jax.benchmarks.profile_step --model=vit --steps=3 \
      --output=benchmarks/profile_step_vit.md

Compiles the step of ``benchmarks/step.py`` (same config, sizes and CPU
settings), runs it under ``jax.profiler`` and sums the time of every XLA
operation the trace records on the compute threads, grouped by what the
operation's source (its ``op_name``) says it belongs to (XLA:CPU's threads
only, ``tf_XLA*`` in the trace):

* ``encoder blocks (scan)``: inside the scanned transformer/ResNet blocks,
  forward and backward;
* ``forward/backward outside the blocks``: patch embeddings or stem, the
  head, the flow fusion, the loss;
* ``optimizer and metrics``: everything after the backward pass;
* ``no source``: operations XLA created without one (layout copies).

The shares are of the summed operation time of all threads (not of wall
time), so they hold under other load on the machine; the largest single
operations outside the blocks are listed with their source.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

import jax

from dastc_jax.benchmarks import provenance
from dastc_jax.benchmarks import step as step_bench
from dastc_jax.runtime import host_malloc
from dastc_jax.runtime import xla_cpu

_SKIP = ('end:', 'Thunk', 'Await', 'Threadpool')


def category(op_name: str | None) -> str:
  """The part of the step an operation with this ``op_name`` belongs to."""
  if not op_name:
    return 'no source'
  if 'jvp(' not in op_name:
    return 'optimizer and metrics'
  if '/while/body' in op_name:
    return 'encoder blocks (scan)'
  return 'forward/backward outside the blocks'


def op_sources(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its ``op_name`` metadata in optimised HLO text."""
  return {
      m.group(1): m.group(2)
      for m in re.finditer(
          r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', hlo_text
      )
  }


def profile(model: str, hw: tuple[int, int], steps: int) -> dict:
  """Compiles and profiles ``steps`` steps; returns times per operation."""
  c = step_bench._config(1, 'float32', model=model)  # pylint: disable=protected-access
  # The step exactly as benchmarks/step.py builds and times it (one
  # warm-up step included).
  one, _ = step_bench.build_jax_step(c, 'source_only', hw, hw)
  sources = op_sources(one.compiled.as_text())
  one()  # a second warm-up step
  times = collections.Counter()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      one()
    jax.profiler.stop_trace()
    path = glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
      for line in plane.lines:
        if not line.name.startswith('tf_XLA'):
          continue  # Python and profiler threads: XLA's are tf_XLA*
        for ev in line.events:
          if any(s in ev.name for s in _SKIP):
            continue
          times[ev.name] += ev.duration_ns / steps
  return {'times': dict(times), 'sources': sources}


def report(res: dict, command: str, info: str, top: int = 15) -> str:
  """Shares per category and the largest operations outside the blocks."""
  times, sources = res['times'], res['sources']
  total = sum(times.values())
  by = collections.Counter()
  for name, ns in times.items():
    by[category(sources.get(name))] += ns
  lines = [
      "# Where the step's time goes",
      '',
      f'Command: `{command}`',
      '',
      info,
      '',
      f'Summed operation time per step (all threads): {total / 1e9:.2f} s.',
      '',
      '| part of the step | share of operation time |',
      '|---|---:|',
  ]
  for k, ns in by.most_common():
    lines.append(f'| {k} | {100 * ns / total:.1f}% |')
  lines += [
      '',
      'Largest operations outside the blocks:',
      '',
      '| operation | share | source (op_name) |',
      '|---|---:|---|',
  ]
  outside = sorted(
      (
          (ns, n)
          for n, ns in times.items()
          if category(sources.get(n)) != 'encoder blocks (scan)'
      ),
      reverse=True,
  )
  for ns, n in outside[:top]:
    lines.append(f'| {n} | {100 * ns / total:.1f}% | `{sources.get(n, "-")}` |')
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='vit', choices=('vit', 'accel'))
  p.add_argument('--size', default='128,256', help='frame H,W')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--output', required=True)
  a = p.parse_args(argv)
  hw = tuple(int(v) for v in a.size.split(','))
  host_malloc.configure(pixels=hw[0] * hw[1])
  xla_cpu.set_defaults(
      pixels=hw[0] * hw[1],
      model='accel_daformer' if a.model == 'vit' else 'accel_deeplabv2',
  )
  res = profile(a.model, hw, a.steps)
  info = (
      f'Model {a.model} (MiT-B5 for vit), batch 1, {hw[0]}x{hw[1]}, '
      f'float32, {os.cpu_count()} CPU cores, jax {jax.__version__}, code at '
      f'{provenance.commit()}, XLA_FLAGS `{os.environ.get("XLA_FLAGS", "")}`.'
  )
  text = report(
      res, 'python -m dastc_jax.benchmarks.profile_step ' + ' '.join(argv), info
  )
  print(text)
  with open(a.output, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main(sys.argv[1:])
