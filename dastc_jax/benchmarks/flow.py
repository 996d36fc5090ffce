r"""Optical flow: quality on the synthetic world, speed against torchvision.

  python -m dastc_jax.benchmarks.flow --output=benchmarks/flow.md
  python -m dastc_jax.benchmarks.flow \
      --raft_large=raft_large_C_T_SKHT_V2-ff5fadd5.pth \
      --raft_small=raft_small_C_T_V2-01064c6d.pth --output=benchmarks/flow.md
  python -m dastc_jax.benchmarks.flow --demo --output=benchmarks/flow.md

Three parts, in one run:

* **End-point error** against the synthetic world's exact flows (stored as
  ``int16(10 F)``, so exact to the 0.1 px quantisation) for every flow file
  of the VIPER-layout source (t->t-1) and of the Cityscapes-Seq-layout target
  (train t->t-1, t->t-2, t-1->t-2; val t->t-1): OpenCV DIS always, RAFT for
  each ``--raft_*`` weight file given (torchvision's trained weights; they
  cannot be downloaded by this code).
* **Throughput** of our jitted RAFT against torchvision's RAFT in eager
  PyTorch on the same CPU threads, same random weights, same pairs, timed
  alternately (``--reps`` pairs each), at ``--size``.
* ``--demo``: the demo (``configs/synthetic.py``) trained and evaluated
  twice, with the world's exact flows and with OpenCV DIS flows written by
  ``python -m dastc_jax.flow``'s code path and prepared by ``prepare``: the
  target/source val mIoU of each (about 20 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

from dastc_jax.benchmarks import provenance
from dastc_jax.runtime import host_malloc
from dastc_jax.runtime import xla_cpu

host_malloc.configure()
xla_cpu.set_defaults()

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import common  # pylint: disable=g-import-not-at-top
from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
from dastc_jax.data import io  # pylint: disable=g-import-not-at-top
from dastc_jax.data.synthetic import world as synthetic  # pylint: disable=g-import-not-at-top
from dastc_jax.flow import dis  # pylint: disable=g-import-not-at-top
from dastc_jax.flow import estimate  # pylint: disable=g-import-not-at-top
from dastc_jax.flow import generate  # pylint: disable=g-import-not-at-top
from dastc_jax.flow import weights  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('output', None, 'Markdown report to write.')
flags.DEFINE_enum(
    'world',
    'default',
    ['tiny', 'default'],
    'Synthetic world size of the EPE and --demo parts.',
)
flags.DEFINE_string(
    'raft_large',
    None,
    'torchvision raft_large weights '
    '(.pth or converted folder) for an EPE row.',
)
flags.DEFINE_string('raft_small', None, 'torchvision raft_small weights.')
flags.DEFINE_integer('iterations', 12, 'RAFT updates per pair.')
flags.DEFINE_list('size', ['256', '512'], 'H,W of the throughput pairs.')
flags.DEFINE_integer('reps', 5, 'Timed calls per implementation.')
flags.DEFINE_list(
    'batch',
    ['1', '2'],
    'Pairs per call of the throughput '
    'rows (the flow command runs 2 per device by default).',
)
flags.DEFINE_bool(
    'demo',
    False,
    'Also train the demo with DIS flows and '
    'with exact flows (about 20 minutes).',
)
flags.DEFINE_string(
    'workdir',
    'runs/flow_benchmark',
    '--demo: runs and ' 'the DIS-flow copy of the world.',
)
flags.DEFINE_integer(
    'demo_steps',
    0,
    '--demo: override train.num_steps ' "(0 = the demo's; for quick checks).",
)

# (dataset, layout folder, split): the world's flow files.
_SETS = (
    ('viper', 'Viper', 'train'),
    ('cityscapes_seq', 'Cityscapes', 'train'),
    ('cityscapes_seq', 'Cityscapes', 'val'),
)


_KINDS = {'flow': 't->t-1', 'flow_t_t2': 't->t-2', 'flow_t1_t2': 't-1->t-2'}


def _world_dir() -> str:
  return synthetic.ensure_world(
      common.synthetic_world(FLAGS.world), num_workers=1
  )


def epe_rows(world: str, estimators: dict[str, Any]) -> list[dict[str, Any]]:
  """EPE of each estimator on each set of the world's flow files."""
  rows = []
  for dataset, folder, split in _SETS:
    manual = os.path.join(world, folder)
    _, dirs = generate.default_splits_and_dirs(dataset, manual, [split], {})
    jobs = generate.list_jobs(dataset, manual, split, dirs[split])
    groups: dict[str, list[generate.Job]] = {}
    for job in jobs:
      groups.setdefault(_KINDS[job.kind], []).append(job)
    for kind, group in sorted(groups.items()):
      exact = np.stack([io.read_flow(j.output) for j in group])
      hw = exact.shape[1:3]
      pairs = [generate._read_pair(j, hw) for j in group]  # pylint: disable=protected-access
      for name, est in estimators.items():
        start = time.time()
        got = np.concatenate(
            [
                est.flows(
                    np.stack([p[0] for p in pairs[i : i + 8]]),
                    np.stack([p[1] for p in pairs[i : i + 8]]),
                )
                for i in range(0, len(pairs), 8)
            ]
        )
        seconds = time.time() - start
        err = np.linalg.norm(got - exact, axis=-1)
        rows.append(
            {
                'set': f'{dataset} {split} {kind}',
                'estimator': name,
                'pairs': len(group),
                'size': f'{hw[0]}x{hw[1]}',
                'epe': float(err.mean()),
                'over_1px': float((err > 1).mean() * 100),
                'over_3px': float((err > 3).mean() * 100),
                'mean_flow': float(np.linalg.norm(exact, axis=-1).mean()),
                'pairs_per_s': len(group) / seconds,
            }
        )
        logging.info('%s', rows[-1])
  return rows


def throughput(
    variant: str,
    hw: tuple[int, int],
    reps: int,
    iterations: int,
    batch: int = 1,
) -> dict[str, Any]:
  """Seconds per pair of our RAFT (jit) and torchvision's (eager), calls of
  ``batch`` pairs timed alternately."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models import optical_flow as tv_flow  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  tm = getattr(tv_flow, variant)(weights=None).eval()
  model = weights.from_state_dict(
      {k: v.numpy() for k, v in tm.state_dict().items()}
  )
  run = jax.jit(lambda a, b: model(a, b, iterations))
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (batch, *hw, 3)).astype(np.float32)
  b = rng.uniform(-1, 1, (batch, *hw, 3)).astype(np.float32)
  ta = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))
  tb = torch.from_numpy(np.ascontiguousarray(np.moveaxis(b, -1, 1)))
  start = time.time()
  run(a, b).block_until_ready()
  compile_s = time.time() - start
  with torch.no_grad():
    tm(ta, tb, num_flow_updates=iterations)  # warm-up
  ours, theirs = [], []
  for _ in range(reps):
    start = time.time()
    run(a, b).block_until_ready()
    ours.append((time.time() - start) / batch)
    with torch.no_grad():
      start = time.time()
      tm(ta, tb, num_flow_updates=iterations)
      theirs.append((time.time() - start) / batch)
  return {
      'variant': variant,
      'size': f'{hw[0]}x{hw[1]}',
      'batch': batch,
      'ours_s': float(np.median(ours)),
      'torch_s': float(np.median(theirs)),
      'ours_all': ours,
      'torch_all': theirs,
      'compile_s': compile_s,
      'torch_threads': torch.get_num_threads(),
      'torch': torch.__version__,
  }


def demo(world: str, workdir: str) -> list[dict[str, Any]]:
  """Trains the demo with exact and with DIS flows; their val mIoU."""
  from dastc_jax import train  # pylint: disable=g-import-not-at-top
  from dastc_jax.data.datasets import prepare  # pylint: disable=g-import-not-at-top

  est = dis.DisFlow()
  tfds_dir = os.path.join(workdir, 'tfds_dis')
  flow_root = os.path.join(workdir, 'flows_dis')
  for dataset, folder in (('viper', 'Viper'), ('cityscapes_seq', 'Cityscapes')):
    manual = os.path.join(world, folder)
    splits, dirs = generate.default_splits_and_dirs(
        dataset,
        manual,
        None,
        {
            s: os.path.join(flow_root, f'{dataset}_{s}')
            for s in ('train', 'val')
        },
    )
    for split in splits:
      jobs = generate.list_jobs(dataset, manual, split, dirs[split])
      hw = io.image_size(jobs[0].frame_t)
      generate.claim_folder(dirs[split], generate.estimator_info(est, hw))
      generate.generate(jobs, est.flows, hw=hw, batch_size=8)
    prepare.prepare(
        dataset,
        manual,
        tfds_dir,
        flow_dirs=dirs,
        splits=splits,
        check_counts=False,
    )
  rows = []
  for name in ('exact', 'dis'):
    c = synthetic_config.get_config()
    c.data.synthetic = common.synthetic_world(FLAGS.world)
    c.data.synthetic.enabled = True
    if FLAGS.demo_steps:
      c.train.source_only_steps = FLAGS.demo_steps * 4 // 5
      c.train.num_steps = FLAGS.demo_steps
    if name == 'dis':
      c.data.synthetic.enabled = False
      c.data.data_dir = tfds_dir
    out = os.path.join(workdir, name)
    final = os.path.join(
        out, 'eval', f'step_{c.train.num_steps}', 'results.json'
    )
    start, minutes = time.time(), None
    if not os.path.exists(final):
      train.train_and_evaluate(c, out)
      minutes = (time.time() - start) / 60
    with open(final) as f:
      splits = json.load(f)['splits']
    rows.append(
        {
            'flows': name,
            'target_val': splits['target_val']['miou'],
            'source_val': splits.get('source_val', {}).get('miou'),
            'minutes': minutes,
        }
    )
    logging.info('%s', rows[-1])
  return rows


def _report(
    epe: list[dict[str, Any]],
    speed: list[dict[str, Any]],
    demo_rows: list[dict[str, Any]] | None,
    missing: list[str],
) -> str:
  cmd = 'python -m dastc_jax.benchmarks.flow ' + ' '.join(sys.argv[1:])
  lines = [
      '# Optical flow',
      '',
      f'Command: `{cmd}`',
      '',
      f'Machine: {platform.processor() or platform.machine()}, '
      f'{os.cpu_count()} CPU cores, JAX {jax.__version__} on '
      f'{jax.devices()[0].platform}; commit {provenance.commit()}.',
      '',
      '## End-point error on the synthetic world',
      '',
      f'World `{FLAGS.world}`; every flow file of each set; EPE in '
      'pixels of the stored grid, against the exact flows (0.1 px '
      'quantised); the mean exact flow length for scale.',
      '',
      '| set | estimator | pairs | size | mean flow (px) | EPE (px) | '
      '> 1 px (%) '
      '| > 3 px (%) | pairs/s |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in epe:
    lines.append(
        f'| {r["set"]} | {r["estimator"]} | {r["pairs"]} | '
        f'{r["size"]} | {r["mean_flow"]:.2f} | {r["epe"]:.3f} | '
        f'{r["over_1px"]:.1f} | {r["over_3px"]:.1f} | '
        f'{r["pairs_per_s"]:.1f} |'
    )
  for m in missing:
    lines.append(f'\n{m}')
  lines += [
      '',
      '## Throughput: our RAFT (jit) vs torchvision RAFT (eager)',
      '',
      'Same random weights and pairs, '
      f'{FLAGS.iterations} iterations; calls of `batch` pairs (the '
      'flow command runs 2 per device by default), median of '
      f'{FLAGS.reps} calls each, timed alternately in one process; '
      'times per pair.',
      '',
      '| variant | size | batch | ours (s/pair) | torchvision (s/pair) '
      '| ours pairs/s | torchvision pairs/s | time ratio ours/torch | '
      'our compile (s) |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in speed:
    lines.append(
        f'| {r["variant"]} | {r["size"]} | {r["batch"]} | '
        f'{r["ours_s"]:.3f} | '
        f'{r["torch_s"]:.3f} | {1 / r["ours_s"]:.2f} | '
        f'{1 / r["torch_s"]:.2f} | **{r["ours_s"] / r["torch_s"]:.2f}**'
        f' | {r["compile_s"]:.1f} |'
    )
  if speed:
    lines += [
        '',
        f'torch {speed[0]["torch"]}, '
        f'{speed[0]["torch_threads"]} threads. Per-pair times (s): '
        + '; '.join(
            f'{r["variant"]} batch {r["batch"]} ours '
            + ', '.join(f'{t:.3f}' for t in r['ours_all'])
            + ' / torch '
            + ', '.join(f'{t:.3f}' for t in r['torch_all'])
            for r in speed
        ),
    ]
  if demo_rows:
    lines += [
        '',
        '## The demo with estimated flows',
        '',
        'configs/synthetic.py, trained and evaluated with each kind of '
        'flow (train and val splits alike).',
        '',
        '| flows | target val mIoU | source val mIoU | minutes |',
        '|---|---|---|---|',
    ]
    for r in demo_rows:
      src = '-' if r['source_val'] is None else f'{r["source_val"]:.1f}'
      mins = (
          'reused (an earlier run in --workdir)'
          if r['minutes'] is None
          else f'{r["minutes"]:.1f}'
      )
      lines.append(
          f'| {r["flows"]} | {r["target_val"]:.1f} | {src} | ' f'{mins} |'
      )
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  world = _world_dir()
  estimators: dict[str, Any] = {'OpenCV DIS': dis.DisFlow()}
  missing = []
  for variant in ('raft_large', 'raft_small'):
    path = getattr(FLAGS, variant)
    if path:
      estimators[f'RAFT {variant}'] = estimate.RaftEstimator(
          path, iterations=FLAGS.iterations, variant=variant
      )
    else:
      missing.append(
          f'RAFT {variant}: not measured (pass --{variant}=WEIGHTS; '
          "torchvision's trained weights, see docs/optical_flow.md)."
      )
  epe = epe_rows(world, estimators)
  hw = tuple(int(v) for v in FLAGS.size)
  speed = [
      throughput(v, hw, FLAGS.reps, FLAGS.iterations, int(b))
      for v in ('raft_small', 'raft_large')
      for b in FLAGS.batch
  ]
  demo_rows = demo(world, FLAGS.workdir) if FLAGS.demo else None
  text = _report(epe, speed, demo_rows, missing)
  print(text)
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  app.run(main)
