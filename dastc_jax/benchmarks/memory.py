"""The DA-STC train step of the real configs at their configured sizes:
compile time, XLA's memory analysis and (optionally) a measured step.

  python -m dastc_jax.benchmarks.memory --configs=viper,synthia_seq \
      --variants=float32,remat --output=benchmarks/memory.json
  python -m dastc_jax.benchmarks.memory --report=benchmarks/memory.json \
      --output=benchmarks/memory.md

Each (config, variant) runs in its own process, set up as ``python -m
dastc_jax.main`` sets itself up (host allocator, the XLA:CPU flags chosen by
the config's frame size), so its peak resident memory is its own. It builds
the config's DA-STC step exactly as training does (abstract state, the
state and batch shardings, buffer donation), lowers and compiles it for a
batch of the config's sizes, and records:

* the seconds to trace and lower, and to compile; the StableHLO size;
* ``compiled.memory_analysis()``: arguments (state + batch), outputs,
  aliased (donated) bytes, temporaries, and what the device needs at the
  step's peak: arguments + outputs - aliased + temporaries;
* with ``--run_steps=N``: N steps on a random batch (the first step's
  seconds include nothing but the step; compile is done), and the process's
  peak resident memory.

Variants (``VARIANTS``): ``float32`` (the config as it is), ``bfloat16``
(``model.dtype``), ``remat`` (``model.remat``: each encoder block
recomputed in the backward pass),
``remat_bfloat16``, ``unrolled``/``scan`` (``model.scan_blocks``, alone
or with ``_remat``), and ``scan_keep`` (the scan without recomputing its
body, ``model.scan_recompute=False``). On an accelerator the same
command gives the device's figures.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from dastc_jax.benchmarks import provenance

_REPO = provenance.REPO
VARIANTS = {
    'float32': {},
    'bfloat16': {'model.dtype': 'bfloat16'},
    'remat': {'model.remat': True},
    'remat_bfloat16': {'model.remat': True, 'model.dtype': 'bfloat16'},
    'unrolled': {'model.scan_blocks': False},
    'unrolled_remat': {'model.scan_blocks': False, 'model.remat': True},
    'scan': {'model.scan_blocks': True},
    'scan_remat': {'model.scan_blocks': True, 'model.remat': True},
    # The scan keeping its iterations' activations (no recomputation).
    'scan_keep': {'model.scan_blocks': True, 'model.scan_recompute': False},
    # Only stages of 7 or more blocks scanned (MiT-B5: the third).
    'scan_stage3': {'model.scan_blocks': True, 'model.scan_min_blocks': 7},
    # The CPU speed choices as taken at 128x256 (im2col kernel gradients
    # everywhere and the YNNPACK elementwise fusion), at the real size.
    'im2col_eltwise': {'model.conv_kernel_grad': 'im2col', '_eltwise': True},
    'eltwise': {'_eltwise': True},
    # Every crop (and HRDA's detail crop) at half its side: what fits this
    # 23 GiB machine when the configured size does not (gta5_hrda: 31 GB).
    'half_size': {'_size_scale': 0.5},
}
GB = 1e9


def _config(name: str, variant: str):
  """``name`` is a file of configs/, optionally with its config variant
  (``viper:smoke``)."""
  module, _, arg = name.partition(':')
  c = importlib.import_module(f'configs.{module}').get_config(arg or None)
  for key, value in VARIANTS[variant].items():
    if key == '_size_scale':
      _scale_sizes(c, value)
    if key.startswith('_'):
      continue  # a process setting (_CHILD) or a size change
    section, leaf = key.split('.')
    c[section][leaf] = value
  c.mesh.data = 1
  return c


def _scale_sizes(c, scale: float) -> None:
  """Every crop (and HRDA's detail crop) of ``c`` scaled by ``scale``."""

  def scaled(hw):
    return tuple(int(round(v * scale)) for v in hw)

  for key in ('source', 'target'):
    d = c.data[key]
    if d.crop_size:
      d.crop_size = scaled(d.crop_size)
    else:
      d.image_size = scaled(d.image_size)
  if c.model.get('hrda') and c.model.hrda.get('enabled'):
    c.model.hrda.detail_crop = scaled(c.model.hrda.detail_crop)


def _sizes(config) -> dict[str, Any]:
  def hw(key):
    d = config.data[key]
    return tuple(d.crop_size or d.image_size)

  return {
      'batch': config.train.batch_size,
      'source': hw('source'),
      'target': hw('target'),
  }


def fake_batch(config, sizes: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  """A random DA-STC batch with the keys and shapes of the input pipeline
  (clips of 2 or 3 frames with flows, or single frames for the image
  domain)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dastc_jax import models  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  b, (hs, ws), (ht, wt) = sizes['batch'], sizes['source'], sizes['target']
  c, k = config.model.num_classes, config.dastc.num_rare_classes
  n = models.clip_length(config.model)
  u8 = lambda *s: rng.integers(0, 256, s, dtype=np.uint8)
  ids = lambda *s: rng.integers(0, c, s).astype(np.uint8)
  flow = lambda h, w: rng.normal(0, 3, (b, h, w, 2)).astype(np.float32)
  src = {
      'frames': u8(b, n, hs, ws, 3),
      'labels': ids(b, n, hs, ws),
      'crop': np.zeros((b, 2), np.int32),
      'rare_frames': u8(b, k, ht, wt, 3),
      'rare_labels': ids(b, k, ht, wt),
      'rare_classes': np.full((b, k), 3, np.int32),
  }
  tgt = {
      'frames': u8(b, 3 if n == 2 else 1, ht, wt, 3),
      'label': ids(b, ht, wt),
  }
  if n == 2:
    src['flow'] = flow(hs, ws)
    tgt.update(
        flow=flow(ht, wt), flow_t_t2=flow(ht, wt), flow_t1_t2=flow(ht, wt)
    )
  return {'source': src, 'target': tgt}


def measure(name: str, variant: str, run_steps: int) -> dict[str, Any]:
  """Builds, compiles (and runs) one config's DA-STC step in this process
  (its XLA flags must already be set)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import steps as step_lib  # pylint: disable=g-import-not-at-top

  c = _config(name, variant)
  sizes = _sizes(c)
  mesh = jax.make_mesh(
      (1, 1),
      sharding_lib.BATCH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
      devices=jax.devices()[:1],
  )
  data = sharding_lib.data_sharding(mesh)
  t0 = time.perf_counter()
  graphdef, state, tx = state_lib.create_train_state(
      c, abstract=True, sizes=sizes
  )
  st_sh = sharding_lib.state_shardings(state, mesh)
  fn = jax.jit(
      step_lib.make_dastc_step(c, graphdef, tx),
      in_shardings=(st_sh, data),
      out_shardings=(st_sh, sharding_lib.replicated(mesh)),
      donate_argnums=(0,),
  )
  host = fake_batch(c, sizes)
  batch_spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data), host
  )
  state_spec = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state,
      st_sh,
  )
  lowered = fn.lower(state_spec, batch_spec)
  hlo = lowered.as_text()
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  res = {
      'config': name,
      'variant': variant,
      'sizes': sizes,
      'model': c.model.name,
      'layers': tuple(c.model.layers),
      'mit_variant': c.model.mit_variant,
      'scan_blocks': bool(c.model.get('scan_blocks', False)),
      'remat': bool(c.model.remat),
      'dtype': c.model.dtype,
      'conv_kernel_grad': c.model.conv_kernel_grad,
      'device': jax.devices()[0].device_kind,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'trace_lower_s': lower_s,
      'compile_s': compile_s,
      'hlo_lines': hlo.count('\n'),
      'hlo_mb': len(hlo) / 1e6,
      'argument_gb': arg / GB,
      'output_gb': out / GB,
      'alias_gb': alias / GB,
      'temp_gb': temp / GB,
      'peak_gb': (arg + out - alias + temp) / GB,
  }
  res['peak_rss_gb'] = _rss_gb()
  # Recorded before the steps run: a step the host cannot hold is killed.
  print('COMPILED', json.dumps(res), flush=True)
  if run_steps:
    del lowered, hlo
    _, real_state, _ = state_lib.create_train_state(c, sizes=sizes)
    real_state = jax.device_put(real_state, st_sh)
    batch = sharding_lib.shard_batch(host, data)
    times = []
    for _ in range(run_steps):
      t0 = time.perf_counter()
      real_state, metrics = compiled(real_state, batch)
      loss = float(metrics['loss'])
      times.append(time.perf_counter() - t0)
    res.update(step_s=times, loss=loss)
  res['peak_rss_gb'] = _rss_gb()
  return res


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from dastc_jax.runtime import host_malloc
from dastc_jax.benchmarks import memory
from dastc_jax.runtime import xla_cpu
config = memory._config({name!r}, {variant!r})
pixels = xla_cpu.train_pixels(config)
host_malloc.configure(pixels=pixels)  # as main.py sets it
force = memory.VARIANTS[{variant!r}].get('_eltwise', False)
xla_cpu.set_defaults(
    pixels=0 if force else pixels, model=None if force else config.model.name
)
print('RESULT', json.dumps(memory.measure({name!r}, {variant!r}, {steps})))
"""


def in_child(
    name: str, variant: str, run_steps: int, timeout: float
) -> dict[str, Any]:
  """:func:`measure` in a fresh process; failures are recorded, not
  raised (an out-of-memory step is a result)."""
  code = _CHILD.format(repo=_REPO, name=name, variant=variant, steps=run_steps)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
  except subprocess.TimeoutExpired:
    return {
        'config': name,
        'variant': variant,
        'error': f'not finished within {timeout:.0f} s',
    }
  lines = {
      ln.split(' ', 1)[0]: ln.split(' ', 1)[1]
      for ln in proc.stdout.splitlines()
      if ln.startswith(('RESULT ', 'COMPILED '))
  }
  if proc.returncode or 'RESULT' not in lines:
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
    why = (
        "killed (SIGKILL: the kernel's out-of-memory killer when the "
        'host runs out)'
        if proc.returncode == -9
        else f'exit {proc.returncode}: ' + ' | '.join(tail)[-600:]
    )
    res = {'config': name, 'variant': variant}
    if 'COMPILED' in lines:  # compiled, then the step failed
      res = json.loads(lines['COMPILED'])
      why = 'the step ' + why
    res['error'] = why
    res['wall_s'] = time.perf_counter() - t0
    return res
  res = json.loads(lines['RESULT'])
  res['wall_s'] = time.perf_counter() - t0
  return res


def _row_head(r: dict[str, Any]) -> str:
  """A result's first cells: config, variant, model, sizes, device."""
  model = (
      f'MiT-{r["mit_variant"].upper()}'
      if 'daformer' in r['model']
      else f'R{3 * sum(r["layers"]) + 2}'
  )
  s = r['sizes']
  how = (
      f'{"scan" if r.get("scan_blocks") else "unrolled"}, '
      f'{"remat" if r.get("remat") else "no remat"}, '
      f'{r.get("dtype", "float32")}'
  )
  return (
      f'| {r["config"]} | {r["variant"]}: {how} | {r["model"]} {model} | '
      f'{s["source"][0]}x{s["source"][1]} / {s["target"][0]}x'
      f'{s["target"][1]} ({s["batch"]}) | {r["device"]} | '
  )


def report(results: list[dict[str, Any]], command: str) -> str:
  """The markdown table of :func:`measure` results."""
  lines = [
      "# The real configs' DA-STC step at their configured sizes",
      '',
      f'Command: `{command}`',
      '',
      "Memory from XLA's `compiled.memory_analysis()` of the jitted step "
      '(state donated): *peak* = arguments + outputs - aliased + '
      'temporaries, what the device must hold at once. Host *RSS* is the '
      "process's peak resident memory (build, compile and, where timed, "
      'the steps). CPU figures are from 2 cores; times are wall seconds.',
      '',
      '| config | variant: scan, remat, dtype | model | source / target '
      '(batch) | device | lower s | compile s | HLO lines | args GB | '
      'temps GB | peak GB | step s | RSS GB | commit |',
      '|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ]
  notes = []
  for r in results:
    if r.get('note'):
      notes.append(f'- {r["config"]} {r["variant"]}: {r["note"]}.')
    if 'compile_s' not in r:
      lines.append(
          f'| {r["config"]} | {r["variant"]} | {r["error"]} |' + ' |' * 11
      )
      continue
    step = (
        'failed: ' + r['error'].split(' | ')[-1][-120:]
        if 'error' in r
        else ''
        if 'step_s' not in r
        else ', '.join(f'{t:.0f}' for t in r['step_s'])
    )
    lines.append(
        _row_head(r) + f'{r["trace_lower_s"]:.0f} | {r["compile_s"]:.0f} | '
        f'{r["hlo_lines"]:,} | {r["argument_gb"]:.2f} | {r["temp_gb"]:.1f} | '
        f'{r["peak_gb"]:.1f} | {step} | {r["peak_rss_gb"]:.1f} | '
        f'{r.get("commit", "")} |'
    )
  if notes:
    lines += ['', 'Rows of code that has changed since:', ''] + notes
  return '\n'.join(lines) + '\n'


# benchmarks/step.md's section of real-size rows (written here, kept by
# benchmarks/step.py when it rewrites the rest of that file).
STEP_MD_BEGIN = (
    '<!-- real-size rows: written by python -m '
    'dastc_jax.benchmarks.memory --step_md -->'
)
STEP_MD_END = '<!-- end of the real-size rows -->'


def step_section(results: list[dict[str, Any]]) -> str:
  """The rows of ``results`` that ran steps, as step.md's real-size table."""
  lines = [
      STEP_MD_BEGIN,
      '',
      '## At the configured sizes',
      '',
      "The real configs' DA-STC step at their configured crop sizes, depth "
      'and batch, from `python -m dastc_jax.benchmarks.memory '
      '--configs=CONFIG --variants=VARIANT --run_steps=2 '
      '--output=benchmarks/memory.json --step_md=benchmarks/step.md` (each '
      'row has its commit; benchmarks/memory.md has the rows that were only '
      "compiled). Memory from XLA's `compiled.memory_analysis()`: "
      'arguments, outputs, temporaries and peak (arguments + outputs - '
      "donated + temporaries); RSS is the process's peak resident memory. "
      'Step seconds: each timed step, after compiling; on the CPU rows, 2 '
      "cores. `half_size` rows halve every crop (and HRDA's detail crop) "
      'where the configured size does not fit this machine; compare them '
      'with each other.',
      '',
      '| config | variant: scan, remat, dtype | model | source / target '
      '(batch) | device | compile s | args GB | outputs GB | temps GB | '
      'peak GB | step s | RSS GB | commit |',
      '|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|',
  ]
  rows = [r for r in results if r.get('step_s') and 'error' not in r]
  for r in rows:
    lines.append(
        _row_head(r) + f'{r["compile_s"]:.0f} | {r["argument_gb"]:.2f} | '
        f'{r["output_gb"]:.2f} | {r["temp_gb"]:.1f} | {r["peak_gb"]:.1f} | '
        + ', '.join(f'{t:.0f}' for t in r['step_s'])
        + f' | {r["peak_rss_gb"]:.1f} | {r.get("commit", "")} |'
    )
  if not rows:
    lines.append('| (none measured yet) |' + ' |' * 12)
  return '\n'.join(lines + ['', STEP_MD_END])


def with_step_section(text: str, section: str) -> str:
  """``text`` (a step.md) with its real-size section replaced by
  ``section`` (appended where it has none)."""
  if STEP_MD_BEGIN in text and STEP_MD_END in text:
    head, rest = text.split(STEP_MD_BEGIN, 1)
    tail = rest.split(STEP_MD_END, 1)[1]
    return head + section + tail
  return text.rstrip('\n') + '\n\n' + section + '\n'


def existing_step_section(path: str) -> str | None:
  """The real-size section of the step.md at ``path``, if it has one."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read()
  if STEP_MD_BEGIN not in text or STEP_MD_END not in text:
    return None
  return (
      STEP_MD_BEGIN
      + text.split(STEP_MD_BEGIN, 1)[1].split(STEP_MD_END, 1)[0]
      + STEP_MD_END
  )


def _write_step_md(path: str, results: list[dict[str, Any]]) -> None:
  with open(path) as f:
    text = f.read()
  with open(path + '.tmp', 'w') as f:
    f.write(with_step_section(text, step_section(results)))
  os.replace(path + '.tmp', path)


def main(argv: list[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
      '--configs',
      default='viper,synthia_seq,viper_vit,gta5_vit',
      help='config names in configs/',
  )
  p.add_argument(
      '--variants',
      default='float32',
      help=f'comma-separated, of {sorted(VARIANTS)}',
  )
  p.add_argument(
      '--run_steps', type=int, default=0, help='also run this many steps'
  )
  p.add_argument(
      '--timeout',
      type=float,
      default=3600.0,
      help='seconds per (config, variant) process',
  )
  p.add_argument(
      '--output',
      required=True,
      help='.json: measure and add to it; .md: --report to it',
  )
  p.add_argument('--report', default='', help='a .json of results')
  p.add_argument(
      '--step_md',
      default='',
      help='also rewrite the real-size section of this step.md '
      '(benchmarks/step.md) from the rows that ran steps',
  )
  a = p.parse_args(argv)
  if a.report:
    with open(a.report) as f:
      data = json.load(f)
    with open(a.output, 'w') as f:
      f.write(report(data['results'], data['command']))
    if a.step_md:
      _write_step_md(a.step_md, data['results'])
    return
  bad = set(a.variants.split(',')) - set(VARIANTS)
  if bad:
    raise SystemExit(
        f'error: unknown --variants {sorted(bad)}; expected '
        f'{sorted(VARIANTS)}.'
    )
  data = {'results': []}
  if os.path.exists(a.output):
    with open(a.output) as f:
      data = json.load(f)
  data['command'] = 'python -m dastc_jax.benchmarks.memory ' + ' '.join(argv)
  for name in a.configs.split(','):
    for variant in a.variants.split(','):
      print(f'{name} {variant} ...', flush=True)
      res = in_child(name, variant, a.run_steps, a.timeout)
      res['commit'] = provenance.commit()
      print(json.dumps(res), flush=True)
      data['results'] = [
          r
          for r in data['results']
          if (r['config'], r['variant']) != (name, variant)
      ] + [res]
      with open(a.output + '.tmp', 'w') as f:
        json.dump(data, f, indent=1)
      os.replace(a.output + '.tmp', a.output)
      if a.step_md:
        _write_step_md(a.step_md, data['results'])


if __name__ == '__main__':
  main(sys.argv[1:])
