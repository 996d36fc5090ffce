"""Input pipeline throughput against the train step's consumption.

  python -m dastc_jax.benchmarks.input --workdir=runs/input \
      --output=benchmarks/input.md

Writes VIPER and Cityscapes-Seq clips at the real resolutions (VIPER
1080x1920 JPEG frames with 576x1024 flows; Cityscapes 1024x2048 PNG frames
with 512x1024 flows), prepares them with the real builders, and measures in
one run:

* the paired DA-STC train stream of ``configs/viper.py`` (decode, resize to
  720x1280 / 512x1024, long-tail patches, histogram matching), batch 1, in
  clips/s for in-process threads and for 1, 2, ... worker processes;
* the DA-STC train step on this machine's first device at the same
  resolution (``--model``: ``tiny`` by default on CPU, where the full
  ResNet-101 takes minutes per step), in clips/s.

It reports the ratio loader / step and how many loader cores one device
needs to be fed at twice its consumption (one worker process ~ one core).
Content is random (smooth structure plus noise), so PNG/JPEG decode costs
are close to, not equal to, those of the real files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import AxisType
import numpy as np
from PIL import Image

from configs import common
from configs import viper as viper_config
from dastc_jax.benchmarks import provenance
from dastc_jax.data.datasets import layouts
from dastc_jax.data.datasets import prepare
from dastc_jax.data import pipeline
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import steps as step_lib


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack(
      [
          np.sin(xx / rng.uniform(20, 90)) * 60 + 120,
          np.cos(yy / rng.uniform(20, 90)) * 60 + 110,
          (xx + yy) / (h + w) * 150 + 40,
      ],
      -1,
  )
  noise = rng.normal(0, 12, (h, w, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _blocks(rng, ids, h, w, cell=64):
  small = rng.choice(np.asarray(ids, np.uint8), (-(-h // cell), -(-w // cell)))
  return np.kron(small, np.ones((cell, cell), np.uint8))[:h, :w]


def _save(path: str, arr: np.ndarray, **kw) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, **kw)


def _flow(path: str, rng, h: int, w: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, np.int16(rng.normal(0, 40, (h, w, 2))))


def write_real_size_data(root: str, clips: int, seed: int = 0) -> None:
  """VIPER and Cityscapes-Seq train clips at their real resolutions."""
  rng = np.random.default_rng(seed)
  viper_ids = [2, 3, 4, 6, 7, 8, 9, 11, 13, 14, 20, 22, 23, 24, 26, 27]
  for k in range(1, clips + 1):
    for f in (10 * k - 1, 10 * k):
      _save(
          layouts.viper_image(f'{root}/Viper', 'train', 1, f),
          _image(rng, 1080, 1920),
          quality=95,
      )
      _save(
          layouts.viper_label(f'{root}/Viper', 'train', 1, f),
          _blocks(rng, viper_ids, 1080, 1920),
      )
    _flow(
        layouts.viper_flow(
            f'{root}/estimated_optical_flow_viper_train', 1, 10 * k
        ),
        rng,
        576,
        1024,
    )
  cs_ids = [7, 8, 11, 13, 17, 19, 20, 21, 22, 23, 24, 26]
  flow_dir = f'{root}/estimated_optical_flow_cityscapes_seq_train'
  for k in range(clips):
    for f in (17, 18, 19):
      _save(
          layouts.cs_image(f'{root}/Cityscapes', 'train', 'aachen', k, f),
          _image(rng, 1024, 2048),
      )
    _save(
        layouts.cs_label(f'{root}/Cityscapes', 'train', 'aachen', k, 19),
        _blocks(rng, cs_ids, 1024, 2048),
    )
    for t, s in ((19, 18), (19, 17), (18, 17)):
      _flow(layouts.cs_flow(flow_dir, 'aachen', k, t, s), rng, 512, 1024)


def loader_rate(config, data_dir: str, workers: int, batches: int) -> float:
  """Paired clips/s of the train stream (the first batch is not timed)."""
  config.data.num_workers = workers
  it = iter(pipeline.make_train_dataset(config, data_dir, local_batch_size=1))
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches / (time.perf_counter() - t0)
  if hasattr(it, 'close'):
    it.close()
  return rate


def step_rate(config, data_dir: str, steps: int) -> dict[str, float]:
  """DA-STC train steps/s (= clips/s at batch 1) on the first device."""
  mesh = jax.make_mesh(
      (1,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:1]
  )
  data = sharding_lib.data_sharding(mesh)
  sizes = {
      'batch': 1,
      'source': tuple(config.data.source.image_size),
      'target': tuple(config.data.target.image_size),
  }
  graphdef, state, tx = state_lib.create_train_state(config, sizes=sizes)
  st_sh = sharding_lib.state_shardings(state, mesh)
  fn = jax.jit(
      step_lib.make_dastc_step(config, graphdef, tx),
      in_shardings=(st_sh, data),
      out_shardings=(st_sh, sharding_lib.replicated(mesh)),
      donate_argnums=0,
  )
  config.data.num_workers = 0
  it = iter(pipeline.make_train_dataset(config, data_dir, local_batch_size=1))
  batch = sharding_lib.shard_batch(next(it), data)
  state = jax.device_put(state, st_sh)
  t0 = time.perf_counter()
  state, m = fn(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = fn(state, batch)
  jax.block_until_ready(m)
  return {
      'clips_per_s': steps / (time.perf_counter() - t0),
      'first_step_s': compile_s,
  }


def _config(data_dir: str, model: str):
  c = viper_config.get_config()
  c.data.data_dir = data_dir
  c.train.batch_size = 1
  c.data.num_threads = 1
  c.data.prefetch = 2
  if model == 'tiny':
    common.tiny_model(c)
  elif model == 'demo':
    c.model.layers, c.model.width, c.model.head_features = (2, 2, 2, 2), 16, 64
  return c


def run(
    workdir: str,
    workers: list[int],
    batches: int,
    clips: int,
    model: str,
    steps: int,
) -> dict[str, Any]:
  """Prepares the data (once) and measures; returns the results."""
  root = os.path.join(workdir, 'data')
  data_dir = os.path.join(workdir, 'tfds')
  if not os.path.exists(os.path.join(root, 'done')):
    logging.info('Writing %d real-size clips per domain to %s', clips, root)
    write_real_size_data(root, clips)
    open(os.path.join(root, 'done'), 'w').close()
  small_dir = os.path.join(workdir, 'tfds_train_size')
  config = _config(data_dir, model)
  for folder, sizes in (
      (data_dir, (None, None)),
      (
          small_dir,
          (
              tuple(config.data.source.image_size),
              tuple(config.data.target.image_size),
          ),
      ),
  ):
    prepare.prepare(
        'viper',
        f'{root}/Viper',
        folder,
        check_counts=False,
        splits=['train'],
        train_size=sizes[0],
    )
    prepare.prepare(
        'cityscapes_seq',
        f'{root}/Cityscapes',
        folder,
        check_counts=False,
        splits=['train'],
        train_size=sizes[1],
    )
  rates, stored = {}, {}
  # Alternate the two storages per worker count (same machine state).
  for w in workers:
    rates[w] = loader_rate(config, data_dir, w, batches)
    stored[w] = loader_rate(_config(small_dir, model), small_dir, w, batches)
    logging.info(
        'loader, %d workers: %.2f clips/s native, %.2f stored at '
        'the training size',
        w,
        rates[w],
        stored[w],
    )
  step = step_rate(config, data_dir, steps)
  logging.info(
      'train step (%s model): %.3f clips/s', model, step['clips_per_s']
  )
  return {
      'loader_clips_per_s': rates,
      'stored_clips_per_s': stored,
      'step': step,
      'model': model,
      'device': str(jax.devices()[0].device_kind),
      'cpu_count': os.cpu_count(),
      'machine': platform.processor() or platform.machine(),
  }


def cores_needed(consumption: float, per_worker: float) -> int:
  """Loader cores to produce 2x ``consumption`` clips/s."""
  return max(1, math.ceil(2.0 * consumption / per_worker))


def report(res: dict[str, Any], command: str) -> str:
  """The markdown report of ``run``'s results."""
  rates = res['loader_clips_per_s']
  step = res['step']['clips_per_s']
  one = rates.get(1) or max(rates.values())
  lines = [
      '# Input pipeline vs train step',
      '',
      f'Command: `{command}`',
      '',
      f'Machine: {res["cpu_count"]} CPU cores ({res["machine"]}); train '
      f'step on {res["device"]} with the `{res["model"]}` model. Date: '
      f'{time.strftime("%Y-%m-%d")}, commit {provenance.commit()}.',
      '',
      'Paired DA-STC stream of `configs/viper.py` at batch 1: VIPER '
      '1080x1920 JPEG -> 720x1280, Cityscapes-Seq 1024x2048 PNG -> 512x1024, '
      'four flows, long-tail patches, histogram matching.',
      '',
      '| loader | clips/s | x step consumption |',
      '|---|---:|---:|',
  ]
  for w, r in sorted(rates.items()):
    name = (
        'in-process (1 decode thread)' if w == 0 else f'{w} worker process(es)'
    )
    lines.append(f'| {name} | {r:.2f} | {r / step:.1f} |')
  stored = res.get('stored_clips_per_s')
  if stored:
    lines += [
        '',
        'The same clips prepared with `prepare --train_size` (frames, labels '
        'and flows stored at 720x1280 / 512x1024, the training sizes), read '
        'in the same run, alternating with the native copy:',
        '',
        '| loader | native storage clips/s | stored at training size '
        'clips/s | speed-up |',
        '|---|---:|---:|---:|',
    ]
    for w, r in sorted(rates.items()):
      name = (
          'in-process (1 decode thread)'
          if w == 0
          else f'{w} worker process(es)'
      )
      lines.append(
          f'| {name} | {r:.2f} | {stored[w]:.2f} | '
          f'**{stored[w] / r:.2f}x** |'
      )
  lines += [
      '',
      f'Train step (DA-STC, `{res["model"]}` model, real resolution): '
      f'{step:.3f} clips/s; first step (compile) '
      f'{res["step"]["first_step_s"]:.1f} s.',
      '',
      f'One worker process (about one core) yields {one:.2f} clips/s. '
      f'Feeding this device at 2x its consumption needs '
      f'{cores_needed(step, one)} loader core(s).',
      '',
      'For an accelerator that consumes `c` clips/s, the loader needs '
      f'`ceil(2 c / {one:.2f})` cores (derived from the measured per-worker '
      'rate, not measured on an accelerator):',
      '',
      '| accelerator step time (batch 1) | clips/s | loader cores for 2x |',
      '|---:|---:|---:|',
  ]
  for t in (0.25, 0.5, 1.0, 2.0):
    lines.append(f'| {t} s | {1 / t:.1f} | {cores_needed(1 / t, one)} |')
  return '\n'.join(lines) + '\n'


def _define_flags() -> dict[str, Any]:
  """Command-line flags (defined only when run as a program, so that the
  module imports next to the other benchmarks)."""
  return {
      'workdir': flags.DEFINE_string(
          'workdir', 'runs/input', 'Scratch folder.'
      ),
      'output': flags.DEFINE_string(
          'output', '', 'Markdown report (optional).'
      ),
      'workers': flags.DEFINE_list(
          'workers',
          ['0', '1', '2'],
          'Worker processes to measure (0 = in-process).',
      ),
      'batches': flags.DEFINE_integer(
          'batches', 12, 'Timed batches per setting.'
      ),
      'clips': flags.DEFINE_integer('clips', 6, 'Clips written per domain.'),
      'model': flags.DEFINE_enum(
          'model',
          'tiny',
          ['tiny', 'demo', 'full'],
          'Model of the measured train step.',
      ),
      'steps': flags.DEFINE_integer('steps', 3, 'Timed train steps.'),
  }


def main(argv, f: dict[str, Any]):
  del argv
  v = {k: h.value for k, h in f.items()}
  res = run(
      v['workdir'],
      [int(w) for w in v['workers']],
      v['batches'],
      v['clips'],
      v['model'],
      v['steps'],
  )
  command = (
      'python -m dastc_jax.benchmarks.input '
      f'--workdir={v["workdir"]} --workers={",".join(v["workers"])}'
      f' --batches={v["batches"]} --model={v["model"]}'
      + (f' --output={v["output"]}' if v['output'] else '')
  )
  md = report(res, command)
  print(md)
  if v['output']:
    with open(v['output'], 'w') as out:
      out.write(md)
    with open(os.path.splitext(v['output'])[0] + '.json', 'w') as out:
      json.dump(
          {
              **res,
              'loader_clips_per_s': {
                  str(k): v for k, v in res['loader_clips_per_s'].items()
              },
              'command': command,
          },
          out,
          indent=2,
      )


if __name__ == '__main__':
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
