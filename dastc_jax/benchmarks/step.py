"""Train-step performance: JAX against a PyTorch eager baseline, in one run.

  python -m dastc_jax.benchmarks.step --output=benchmarks/step.md

Measures, on this machine's first device, for ACCEL-DeepLabv2-ResNet-101:

* the source-only step (frames t and t-1, flow fusion, CE + 0.1 aux, SGD)
  and the full DA-STC step (teacher, strong clip, both fused clips, the t-2
  pair for the alignment): step time (median), frames/s, compile time, peak
  memory, FLOPs per step (XLA's cost analysis), achieved FLOP/s and the
  utilisation against a peak: a float32 matmul measured in the same run on
  CPU, the published dense bf16 peak on GPU/TPU;
* the same source-only step written in PyTorch eager (``torch`` is an
  optional benchmark dependency), restated here layer by layer, and the
  JAX / PyTorch time ratio;
* weak scaling of the source-only step on 1, 2, 4 and 8 simulated CPU
  devices (batch 1 per device; the devices share this machine's cores, so
  this measures the sharding overhead, not a speed-up).

Accelerators run the real resolution (target 512x1024, VIPER source
720x1280); CPU runs ``--cpu_size`` (default 128x256 for both domains).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import AxisType
import jax.numpy as jnp
import numpy as np

from configs import viper as viper_config
from configs import viper_vit as viper_vit_config
from dastc_jax.benchmarks import provenance
from dastc_jax.benchmarks import memory
from dastc_jax.models import mit
from dastc_jax.runtime import host_malloc
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import steps as step_lib
from dastc_jax.runtime import xla_cpu

_REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)

# Published dense bf16 peaks (FLOP/s) by device kind.
BF16_PEAK = {
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5p': 459e12,
}


def _config(
    batch: int,
    dtype: str,
    bn_group_size: int = 1,
    model: str = 'accel',
    mit_variant: str = 'b5',
):
  """The VIPER config of the benchmarked model: ``accel`` (ACCEL-DeepLabv2-
  ResNet-101) or ``vit`` (QuadMix-ViT: MiT ``mit_variant`` + DAFormer)."""
  if model == 'vit':
    c = viper_vit_config.get_config()
    c.model.mit_variant = mit_variant
  else:
    c = viper_config.get_config()
  c.train.batch_size = batch
  c.model.dtype = dtype
  c.model.bn_group_size = bn_group_size
  c.mesh.data = 1
  return c


def fake_batch(
    config, batch: int, src_hw, tgt_hw, seed: int = 0, dastc: bool = True
) -> dict[str, Any]:
  """A random batch with every key a step reads (uint8 frames, ids)."""
  rng = np.random.default_rng(seed)
  c = config.model.num_classes
  k = config.dastc.num_rare_classes
  u8 = lambda *s: rng.integers(0, 256, s, dtype=np.uint8)
  ids = lambda *s: rng.integers(0, c, s).astype(np.uint8)
  flow = lambda h, w: rng.normal(0, 3, (batch, h, w, 2)).astype(np.float32)
  hs, ws = src_hw
  ht, wt = tgt_hw
  src = {
      'frames': u8(batch, 2, hs, ws, 3),
      'labels': ids(batch, 2, hs, ws),
      'flow': flow(hs, ws),
  }
  if not dastc:
    return {'source': src}
  src.update(
      crop=np.zeros((batch, 2), np.int32),
      rare_frames=u8(batch, k, ht, wt, 3),
      rare_labels=ids(batch, k, ht, wt),
      rare_classes=np.full((batch, k), 3, np.int32),
  )
  tgt = {
      'frames': u8(batch, 3, ht, wt, 3),
      'flow': flow(ht, wt),
      'flow_t_t2': flow(ht, wt),
      'flow_t1_t2': flow(ht, wt),
      'label': ids(batch, ht, wt),
  }
  return {'source': src, 'target': tgt}


def _mesh(n: int):
  return jax.make_mesh(
      (n, 1),
      sharding_lib.BATCH_AXES,
      axis_types=(AxisType.Auto, AxisType.Auto),
      devices=jax.devices()[:n],
  )


def build_jax_step(
    config, kind: str, src_hw, tgt_hw, n_devices: int = 1
) -> tuple[Callable[[], float], dict[str, Any]]:
  """Compiles one step kind (``source_only`` or ``dastc``).

  Returns:
    A closure that runs one step to completion and returns its seconds, and
    the compile facts (compile time, FLOPs, frames per step).
  """
  batch_size = config.train.batch_size
  mesh = _mesh(n_devices)
  data = sharding_lib.data_sharding(mesh)
  sizes = {
      'batch': batch_size,
      'source': tuple(src_hw),
      'target': tuple(tgt_hw),
  }
  config.method = 'dastc' if kind == 'dastc' else 'source_only'
  graphdef, state, tx = state_lib.create_train_state(
      config, sizes=sizes if kind == 'dastc' else None
  )
  st_sh = sharding_lib.state_shardings(state, mesh)
  make = (
      step_lib.make_dastc_step if kind == 'dastc' else step_lib.make_train_step
  )
  fn = jax.jit(
      make(config, graphdef, tx),
      in_shardings=(st_sh, data),
      out_shardings=(st_sh, sharding_lib.replicated(mesh)),
      donate_argnums=0,
  )
  batch = sharding_lib.shard_batch(
      fake_batch(config, batch_size, src_hw, tgt_hw, dastc=kind == 'dastc'),
      data,
  )
  box = {'state': jax.device_put(state, st_sh)}
  t0 = time.perf_counter()
  compiled = fn.lower(box['state'], batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  def one() -> float:
    t = time.perf_counter()
    box['state'], m = compiled(box['state'], batch)
    jax.block_until_ready(m)
    box['loss'] = float(m['loss'])
    return time.perf_counter() - t

  one()  # warm-up
  one.compiled = compiled  # for profile_step.py (its optimised HLO)
  return one, {
      'compile_s': compile_s,
      'flops': float((cost or {}).get('flops', float('nan'))),
      'frames_per_step': batch_size * (2 if kind == 'source_only' else 12),
  }


def interleaved(
    runners: dict[str, Callable[[], float]], steps: int
) -> dict[str, list[float]]:
  """Times ``steps`` calls of each runner, alternating them call by call.

  This machine's speed drifts by 10% and more between minutes; alternating
  puts every runner under the same drift.
  """
  times = {k: [] for k in runners}
  for _ in range(steps):
    for k, one in runners.items():
      times[k].append(one())
  return times


def paired_ratios(a: list[float], b: list[float]) -> dict[str, float]:
  """Statistics of ``a[i] / b[i]`` over steps timed back to back."""
  r = sorted(x / y for x, y in zip(a, b))
  if len(r) < 2:
    return {}
  q = statistics.quantiles(r, n=4, method='inclusive')
  return {
      'median': statistics.median(r),
      'q1': q[0],
      'q3': q[2],
      'min': r[0],
      'max': r[-1],
      'n': len(r),
  }


def summarize(info: dict[str, Any], times: list[float]) -> dict[str, Any]:
  """Step-time statistics of a JAX step from its compile facts and times."""
  stats = jax.devices()[0].memory_stats() or {}
  step_s = statistics.median(times)
  return {
      **info,
      'step_s': step_s,
      'times': times,
      'flop_per_s': info['flops'] / step_s,
      'frames_per_s': info['frames_per_step'] / step_s,
      'peak_bytes': stats.get('peak_bytes_in_use'),
  }


def time_jax_step(
    config, kind: str, src_hw, tgt_hw, steps: int, n_devices: int = 1
) -> dict[str, Any]:
  """Compiles and times one step kind on its own."""
  one, info = build_jax_step(config, kind, src_hw, tgt_hw, n_devices)
  return summarize(info, interleaved({kind: one}, steps)[kind])


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Best float32 matmul FLOP/s of this device (the CPU utilisation peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


# --------------------------------------------------------------- PyTorch
def build_torch_step(
    config, batch: int, src_hw
) -> tuple[Callable[[], float], dict[str, Any]] | None:
  """The source-only step of ``config.model`` (ACCEL-DeepLabv2 with SGD, or
  the transformer video model with AdamW) in PyTorch eager (None without
  torch, or without ``transformers`` for the transformer).

  Returns:
    A closure that runs one step and returns its seconds, and facts about
    the PyTorch build.
  """
  m = config.model
  try:
    import torch  # pylint: disable=g-import-not-at-top

    # The PyTorch restatements the parity tests check us against (run the
    # benchmark from the repository root).
    from tests import torch_accel  # pylint: disable=g-import-not-at-top

    versions = {'version': torch.__version__}
    if m.name == 'accel_daformer':
      from tests import torch_daformer  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top

      versions['transformers'] = transformers.__version__
  except ImportError:
    logging.warning(
        'PyTorch (or transformers) is not installed: no ' 'baseline.'
    )
    return None
  torch.manual_seed(0)
  b = fake_batch(config, batch, src_hw, src_hw, dastc=False)['source']
  if m.name == 'accel_daformer':
    spec = mit.VARIANTS[m.mit_variant]
    model = torch_daformer.VitVideo(
        spec.dims,
        spec.depths,
        spec.heads,
        spec.sr_ratios,
        m.num_classes,
        m.head_features,
        tuple(m.daformer_dilations),
        m.drop_path_rate,
    )
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
    )
    loss_fn = torch_daformer.source_loss
    mean = torch.tensor(mit.IMAGENET_MEAN_RGB)
    std = torch.tensor(mit.IMAGENET_STD_RGB)
    x = (torch.from_numpy(b['frames']).float() - mean) / std  # RGB
  else:
    model = torch_accel.AccelDeepLab(
        m.num_classes,
        tuple(m.layers),
        m.width,
        m.head_features,
        tuple(m.aspp_dilations),
    )
    opt = torch.optim.SGD(
        model.parameters(), lr=config.optim.lr, momentum=0.9, weight_decay=5e-4
    )
    loss_fn = torch_accel.source_loss
    mean = torch.tensor([104.00698793, 116.66876762, 122.67891434])
    x = torch.from_numpy(b['frames'][..., ::-1].copy()).float() - mean  # BGR
  x = x.permute(0, 1, 4, 2, 3).contiguous()  # [B, T, 3, H, W]
  y = torch.from_numpy(b['labels'][:, 0]).long()
  flow = torch.from_numpy(b['flow']).permute(0, 3, 1, 2).contiguous()
  model.train()

  def one() -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, x[:, 0], x[:, 1], flow, y)
    loss.backward()
    opt.step()
    loss.item()
    return time.perf_counter() - t0

  one()  # warm-up
  return one, {'threads': torch.get_num_threads(), **versions}


_CHILD = """
import json, os, sys
sys.path.insert(0, {repo!r})
_MODEL_NAMES = {{'vit': 'accel_daformer', 'accel': 'accel_deeplabv2'}}
from dastc_jax.runtime import host_malloc
malloc = host_malloc.configure()
if {framework!r} == 'jax':
  from dastc_jax.runtime import xla_cpu
  xla_cpu.set_defaults(model=_MODEL_NAMES[{model!r}])
import resource
from dastc_jax.benchmarks import step as b
c = b._config({batch}, 'float32', model={model!r}, mit_variant={mit!r})
if {framework!r} == 'jax':
  for key, value in {overrides!r}.items():
    section, name = key.split('.')
    setattr(getattr(c, section), name, value)
  built = b.build_jax_step(c, 'source_only', {hw}, {hw})
  built[1]['xla_flags'] = os.environ.get('XLA_FLAGS', '')
else:
  built = b.build_torch_step(c, {batch}, {hw})
if built is None:
  print('NOTORCH', flush=True)
  sys.exit(0)
one, info = built
print('READY', json.dumps({{**info, 'host_malloc': malloc}}), flush=True)
for _ in sys.stdin:
  print('STEP', one(),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
"""


class StepProcess:
  """A source-only step in a child process, run one step per ``__call__``.

  Each framework keeps its own process, as a user runs it: in one process,
  libgomp's spinning workers and XLA's thread pool share the two cores and
  slow each other down. The child's allocator and XLA settings come from
  ``env`` (``DASTC_MALLOC_DEFAULTS``, ``DASTC_XLA_CPU_DEFAULTS``), which are
  read when a process starts. The parent blocks on the pipe while the child
  runs, so the steps still alternate and see the same machine drift.
  """

  def __init__(
      self,
      framework: str,
      batch: int,
      hw,
      env: dict[str, str] | None = None,
      overrides: dict[str, Any] | None = None,
      model: str = 'accel',
      mit_variant: str = 'b5',
  ):
    code = _CHILD.format(
        repo=_REPO,
        framework=framework,
        batch=batch,
        hw=tuple(hw),
        overrides=dict(overrides or {}),
        model=model,
        mit=mit_variant,
    )
    self.framework = framework
    # The child applies xla_cpu's defaults itself (or not, by `env`): start
    # it from the user's XLA_FLAGS, not from this process's.
    flags = xla_cpu.strip_defaults(os.environ.get('XLA_FLAGS', ''))
    self._proc = subprocess.Popen(
        [sys.executable, '-c', code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            'JAX_PLATFORMS': 'cpu',
            'XLA_FLAGS': flags,
            **(env or {}),
        },
    )
    self.info = None
    self.peak_rss = None
    first = self._read(('READY', 'NOTORCH'))
    if first.startswith('READY'):
      self.info = json.loads(first[6:])

  def _read(self, prefixes) -> str:
    for line in self._proc.stdout:
      if line.startswith(prefixes):
        return line.strip()
    raise RuntimeError(
        f'The {self.framework} benchmark process ended early '
        f'(exit {self._proc.wait()}); its error is above.'
    )

  def __call__(self) -> float:
    self._proc.stdin.write('step\n')
    self._proc.stdin.flush()
    _, seconds, rss = self._read(('STEP',)).split()
    self.peak_rss = int(rss)
    return float(seconds)

  def close(self) -> None:
    if self._proc.stdin:
      self._proc.stdin.close()
    self._proc.wait(timeout=60)


# ----------------------------------------------------------- weak scaling
_SUBPROCESS = """
import os, sys, json
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count={n}'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, {repo!r})
from dastc_jax.runtime import host_malloc
host_malloc.configure()
from dastc_jax.runtime import xla_cpu
xla_cpu.set_defaults()
from dastc_jax.benchmarks import step as b
c = b._config({n}, 'float32')
b._shrink(c, {depth!r})
r = b.time_jax_step(c, 'source_only', {hw}, {hw}, {steps}, n_devices={n})
print('RESULT', json.dumps({{'step_s': r['step_s'], 'compile_s': r['compile_s'],
                             'xla_flags': os.environ['XLA_FLAGS']}}))
"""


def _shrink(config, depth: str) -> None:
  if depth == 'r50':
    config.model.layers = (3, 4, 6, 3)


def _in_subprocess(n: int, hw, steps: int, depth: str) -> dict[str, Any]:
  """Times the source-only step on ``n`` simulated CPU devices in a child."""
  code = _SUBPROCESS.format(
      n=n, repo=_REPO, hw=tuple(hw), steps=steps, depth=depth
  )
  proc = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=3600
  )
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT')]
  if proc.returncode or not line:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(line[0][7:])


def weak_scaling(hw, steps: int, depth: str) -> dict[int, float]:
  """Source-only step time at batch 1 per device on n simulated devices."""
  out = {}
  for n in (1, 2, 4, 8):
    out[n] = _in_subprocess(n, hw, steps, depth)['step_s']
    logging.info('weak scaling: %d devices, %.2f s/step', n, out[n])
  return out


# ---------------------------------------------------------------- report
def run(args: dict[str, Any]) -> dict[str, Any]:
  """Every measurement of the module doc; returns the results."""
  dev = jax.devices()[0]
  on_cpu = dev.platform == 'cpu'
  if on_cpu:
    src_hw = tgt_hw = tuple(args['cpu_size'])
  else:
    src_hw, tgt_hw = (720, 1280), (512, 1024)
  dtype = 'float32' if on_cpu else args['dtype']
  res = {
      'device': dev.device_kind,
      'platform': dev.platform,
      'cpu_count': os.cpu_count(),
      'machine': platform.processor(),
      'src_hw': src_hw,
      'tgt_hw': tgt_hw,
      'dtype': dtype,
      'batch': args['batch'],
      'date': time.strftime('%Y-%m-%d'),
      'commit': provenance.commit(),
      'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'host_malloc': args.get('host_malloc', 'not called'),
  }
  which = {'model': args['model'], 'mit_variant': args['mit_variant']}
  res['model'] = (
      f'QuadMix-ViT (MiT-{args["mit_variant"].upper()} + '
      'DAFormer head + flow fusion)'
      if args['model'] == 'vit'
      else 'ACCEL-DeepLabv2-ResNet-101'
  )
  res['peak'] = matmul_peak() if on_cpu else BF16_PEAK.get(dev.device_kind)
  res['peak_kind'] = (
      'measured float32 matmul' if on_cpu else 'published dense bf16'
  )
  # Source-only comparison rows, each alternated step by step with the
  # JAX step: name -> (runner, facts).
  rows = {}
  compare = 'source_only' in args['kinds']
  torch_row = args['torch'] and compare
  if torch_row and not on_cpu:
    # build_torch_step runs PyTorch on the CPU: no like-for-like baseline.
    logging.warning(
        'The PyTorch baseline runs on the CPU only; skipped on ' '%s.',
        dev.platform,
    )
  elif torch_row and args['torch_process'] == 'same':
    built = build_torch_step(
        _config(args['batch'], 'float32', **which), args['batch'], src_hw
    )
    if built:
      rows['torch'] = built[0], {**built[1], 'process': 'same'}
  elif torch_row:
    wanted = {'torch': {'DASTC_MALLOC_DEFAULTS': '0'}}
    if args['torch_malloc_row']:
      wanted['torch_malloc'] = {'DASTC_MALLOC_DEFAULTS': '1'}
    for name, env in wanted.items():
      proc = StepProcess('torch', args['batch'], src_hw, env, **which)
      if not proc.info:
        logging.warning('PyTorch is not installed: no baseline.')
        break
      rows[name] = proc, {**proc.info, 'process': 'separate'}
  if on_cpu and compare:
    # Every JAX variant in its own process too, set up at start-up like
    # `python -m dastc_jax.main` (allocator and XLA settings are read then).
    variants = {'source_only': ({}, {})}
    if args['malloc_row']:
      variants['jax_glibc'] = {'DASTC_MALLOC_DEFAULTS': '0'}, {}
    if args['xla_default_fusion'] and args['model'] == 'vit':
      # The transformer runs without xla_cpu's flag: the row with it.
      variants['xla_eltwise'] = {
          'XLA_FLAGS': ' '.join(xla_cpu.DEFAULT_FLAGS)
      }, {}
    elif args['xla_default_fusion']:
      variants['xla_default'] = {'DASTC_XLA_CPU_DEFAULTS': '0'}, {}
    if args['conv_wgrad_row']:
      # XLA's backward conv for the kernel gradients.
      variants['conv_wgrad'] = {}, {'model.conv_kernel_grad': 'conv'}
    if args['unrolled_row'] and args['model'] == 'vit':
      # The blocks one after another, each keeping its activations for the
      # backward pass (no scan, no recomputation, no stacked parameters).
      variants['unrolled'] = {}, {'model.scan_blocks': False}
      # The scan as configured, keeping its activations.
      variants['scan_keep'] = {}, {'model.scan_recompute': False}
      # Only the 40-block third stage scanned (stages of 3, 6, 3 unrolled).
      variants['scan_stage3'] = {}, {'model.scan_min_blocks': 7}
    for name, (env, overrides) in variants.items():
      proc = StepProcess('jax', args['batch'], src_hw, env, overrides, **which)
      rows[name] = proc, {**proc.info, 'process': 'separate'}
  for kind in args['kinds']:
    if kind == 'source_only' and 'source_only' in rows:
      main_step, info = rows.pop('source_only')
    else:
      main_step, info = build_jax_step(
          _config(args['batch'], dtype, **which), kind, src_hw, tgt_hw
      )
    runners = {kind: main_step}
    if kind == 'source_only':
      runners.update({name: r for name, (r, _) in rows.items()})
    times = interleaved(runners, args['steps'])
    res[kind] = summarize(info, times[kind])
    if isinstance(main_step, StepProcess):
      res[kind]['peak_rss'] = main_step.peak_rss
      main_step.close()
    for name, (runner, facts) in rows.items():
      if name in times:
        res[name] = {
            **facts,
            'times': times[name],
            'step_s': statistics.median(times[name]),
            'peak_rss': getattr(runner, 'peak_rss', None),
        }
    logging.info('%s: %.3f s/step', kind, res[kind]['step_s'])
    del main_step, runners
    if kind == 'source_only':
      for runner, _ in rows.values():
        if isinstance(runner, StepProcess):
          runner.close()  # frees their memory before the DA-STC step
      rows = {}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  res['peak_rss'] = rss
  if on_cpu and args['weak_scaling']:
    res['weak'] = weak_scaling(
        args['weak_size'], args['steps'], args['weak_depth']
    )
  return res


# Comparison rows of the report: result key -> label.
_ROWS = (
    ('torch', 'PyTorch eager, glibc malloc defaults (as users run it)'),
    ('torch_malloc', 'PyTorch eager with the host_malloc.py settings'),
    (
        'jax_glibc',
        'JAX, glibc malloc defaults (`DASTC_MALLOC_DEFAULTS=0`, '
        'child process)',
    ),
    (
        'xla_default',
        "JAX, XLA:CPU's default fusion "
        '(`DASTC_XLA_CPU_DEFAULTS=0`, child process)',
    ),
    (
        'xla_eltwise',
        'JAX with `--xla_cpu_experimental_ynn_fusion_type=+eltwise` (what '
        'the ResNet models get at this size; child process)',
    ),
    (
        'conv_wgrad',
        "JAX, XLA's backward convolution for the 3x3/7x7 kernel "
        "gradients (`model.conv_kernel_grad='conv'`)",
    ),
    (
        'unrolled',
        'JAX, MiT blocks unrolled: no scan, no recomputation in the '
        'backward pass, no stacked parameters (`model.scan_blocks=False`, '
        'which the MiT-B5 configs do not use: models/scan.py)',
    ),
    (
        'scan_keep',
        'JAX, MiT blocks scanned but not recomputed in the backward pass '
        '(`model.scan_recompute=False`)',
    ),
    (
        'scan_stage3',
        "JAX, only MiT-B5's 40-block third stage scanned, the other "
        'stages unrolled (`model.scan_min_blocks=7`)',
    ),
)


def _gb(x):
  return '-' if x is None else f'{x / 2**30:.2f} GiB'


def report(res: dict[str, Any], command: str) -> str:
  """The markdown table of ``run``'s results."""
  lines = [
      '# Train step: JAX vs PyTorch',
      '',
      f'Command: `{command}`',
      '',
      f'Hardware: {res["device"]} ({res["platform"]}; '
      f'{res["cpu_count"]} CPU cores), jax {res["jax"]}, '
      f'{res["date"]}, commit {res.get("commit", "unknown")}. '
      f'{res.get("model", "ACCEL-DeepLabv2-ResNet-101")}, batch '
      f'{res["batch"]}, source {res["src_hw"][0]}x{res["src_hw"][1]}, '
      f'target {res["tgt_hw"][0]}x{res["tgt_hw"][1]}, {res["dtype"]}.',
      '',
      '| step | s/step | frames/s | compile s | GFLOP/step | GFLOP/s '
      f'| utilisation ({res["peak_kind"]}) | peak memory |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  peak = res.get('peak')
  for kind in ('source_only', 'dastc'):
    if kind not in res:
      continue
    r = res[kind]
    util = f'{100 * r["flop_per_s"] / peak:.0f}%' if peak else '-'
    mem = _gb(r['peak_bytes']) if r['peak_bytes'] else '-'

    lines.append(
        f'| {kind} | {r["step_s"]:.3f} | {r["frames_per_s"]:.2f} | '
        f'{r["compile_s"]:.1f} | {r["flops"] / 1e9:.0f} | '
        f'{r["flop_per_s"] / 1e9:.1f} | {util} | {mem} |'
    )
  if peak:
    lines += [
        '',
        f'Peak used for utilisation: {peak / 1e9:.1f} GFLOP/s '
        f'({res["peak_kind"]}).',
    ]
  if not any(
      res.get(k, {}).get('peak_bytes') for k in ('source_only', 'dastc')
  ):
    own = res.get('source_only', {}).get('peak_rss')
    lines += [
        '',
        'This device reports no memory statistics; peak resident '
        'memory of the process after the JAX steps: '
        f'{_gb(res["peak_rss"])}'
        + (f" (the source-only step's own process: {_gb(own)})" if own else '')
        + '.',
    ]
  j = res.get('source_only', {})
  t = res.get('torch')
  if t:
    where = (
        'in a separate process'
        if t.get('process') == 'separate'
        else 'in the same process as JAX'
    )
    enc = (
        f', encoder from transformers {t["transformers"]}'
        if t.get('transformers')
        else ''
    )
    lines += [
        '',
        f'PyTorch {t["version"]} eager{enc}, same source-only step '
        f'({t["threads"]} threads, {where}; host_malloc: '
        f'{t.get("host_malloc", res.get("host_malloc"))}), timed '
        'alternately with the '
        f'JAX step, step by step: {t["step_s"]:.3f} s/step (JAX '
        f'{j["step_s"]:.3f}). **JAX / PyTorch time ratio: '
        f'{j["step_s"] / t["step_s"]:.2f}** (below 1: JAX is '
        'faster). Per-step times, JAX: '
        + ', '.join(f'{x:.2f}' for x in j['times'])
        + '; PyTorch: '
        + ', '.join(f'{x:.2f}' for x in t['times'])
        + '.',
    ]
  rows = [(name, label) for name, label in _ROWS if name in res]
  if rows:
    lines += [
        '',
        'Every row below was timed in the same loop as the JAX '
        'source-only step, one step each in turn. The paired '
        'ratio divides each JAX step by the step of that row timed '
        'right after it, which cancels the drift between minutes.',
        '',
        '| source-only step | s/step | JAX / row (medians) | '
        'paired JAX / row: median (quartiles; range) |',
        '|---|---:|---:|---|',
    ]
    for name, label in rows:
      r = res[name]
      p = paired_ratios(j['times'], r['times'])
      pq = (
          f'{p["median"]:.2f} ({p["q1"]:.2f}-{p["q3"]:.2f}; '
          f'{p["min"]:.2f}-{p["max"]:.2f}, {p["n"]} pairs)'
          if p
          else '-'
      )
      lines.append(
          f'| {label} | {r["step_s"]:.3f} | '
          f'{j["step_s"] / r["step_s"]:.2f} | {pq} |'
      )
  lines += [
      '',
      f'XLA_FLAGS of the JAX steps: `{res.get("xla_flags", "")}` '
      '(dastc_jax/runtime/xla_cpu.py). Host malloc settings of this '
      f'process: {res.get("host_malloc", "not recorded")} '
      '(dastc_jax/runtime/host_malloc.py).',
  ]
  w = res.get('weak')
  if w:
    lines += [
        '',
        'Weak scaling, source-only step, batch 1 per simulated '
        'CPU device (the devices share the same cores):',
        '',
        '| devices | s/step | efficiency (t1 / tn) |',
        '|---:|---:|---:|',
    ]
    for n, s in sorted(w.items(), key=lambda kv: int(kv[0])):
      lines.append(f'| {n} | {s:.2f} | {w[min(w)] / s:.2f} |')
  return '\n'.join(lines) + '\n'


def _define_flags():
  return {
      'output': flags.DEFINE_string('output', '', 'Markdown report.'),
      'batch': flags.DEFINE_integer('batch', 1, 'Global batch.'),
      'steps': flags.DEFINE_integer('steps', 3, 'Timed steps per setting.'),
      'cpu_size': flags.DEFINE_list(
          'cpu_size', ['128', '256'], 'H,W of both domains on CPU.'
      ),
      'dtype': flags.DEFINE_string(
          'dtype', 'bfloat16', 'Compute dtype on accelerators.'
      ),
      'kinds': flags.DEFINE_list(
          'kinds', ['source_only', 'dastc'], 'Steps to measure.'
      ),
      'torch': flags.DEFINE_bool('torch', True, 'PyTorch baseline.'),
      'model': flags.DEFINE_enum(
          'model',
          'accel',
          ['accel', 'vit'],
          'ACCEL-DeepLabv2-ResNet-101, or the transformer video model '
          '(its PyTorch baseline needs transformers).',
      ),
      'mit_variant': flags.DEFINE_string(
          'mit_variant', 'b5', '--model=vit: the MiT size.'
      ),
      'torch_process': flags.DEFINE_enum(
          'torch_process',
          'separate',
          ['separate', 'same'],
          'Run the PyTorch step in its own process (driven step by step '
          'over a pipe) or in the JAX process.',
      ),
      'conv_wgrad_row': flags.DEFINE_bool(
          'conv_wgrad_row',
          True,
          "CPU: also time the source-only step with conv_kernel_grad='conv'.",
      ),
      'unrolled_row': flags.DEFINE_bool(
          'unrolled_row',
          True,
          '--model=vit on CPU: also time the source-only step with the '
          'MiT blocks unrolled (model.scan_blocks=False) and scanned '
          'without recomputation (model.scan_recompute=False).',
      ),
      'xla_default_fusion': flags.DEFINE_bool(
          'xla_default_fusion',
          True,
          'CPU: also time the source-only step without xla_cpu defaults.',
      ),
      'malloc_row': flags.DEFINE_bool(
          'malloc_row',
          True,
          'CPU: also time the source-only step with glibc malloc defaults '
          '(no host_malloc settings).',
      ),
      'torch_malloc_row': flags.DEFINE_bool(
          'torch_malloc_row',
          True,
          'Also time PyTorch with the host_malloc settings.',
      ),
      'weak_scaling': flags.DEFINE_bool(
          'weak_scaling', True, 'CPU weak scaling.'
      ),
      'weak_size': flags.DEFINE_list(
          'weak_size', ['64', '128'], 'H,W of the weak-scaling step.'
      ),
      'weak_depth': flags.DEFINE_enum(
          'weak_depth',
          'r50',
          ['r50', 'r101'],
          'Depth of the weak-scaling model.',
      ),
  }


def main(argv, f, malloc: str):
  del argv
  args = {k: h.value for k, h in f.items()}
  args['host_malloc'] = malloc
  for k in ('cpu_size', 'weak_size'):
    args[k] = [int(v) for v in args[k]]
  res = run(args)
  command = 'python -m dastc_jax.benchmarks.step ' + ' '.join(
      a for a in sys.argv[1:]
  )
  md = report(res, command.strip())
  print(md)
  if args['output']:
    # The real-size rows come from benchmarks/memory.py; kept as they are.
    kept = memory.existing_step_section(args['output'])
    if kept:
      md = memory.with_step_section(md, kept)
    with open(args['output'], 'w') as out:
      out.write(md)
    with open(os.path.splitext(args['output'])[0] + '.json', 'w') as out:
      json.dump({**res, 'command': command}, out, indent=2, default=str)


if __name__ == '__main__':
  # Before any thread allocates and before the CPU backend starts.
  _malloc = host_malloc.configure()
  xla_cpu.set_defaults(
      model='accel_daformer' if '--model=vit' in sys.argv else None
  )
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags, _malloc))
