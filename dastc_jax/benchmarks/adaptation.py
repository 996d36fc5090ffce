"""Does adaptation help? DA-STC, baselines and ablations on the synthetic world.

  python -m dastc_jax.benchmarks.adaptation --workdir=runs/adaptation

For every seed: one source-only warm start (``--warm_steps``), then every
variant continues from that checkpoint for ``--adapt_steps`` with the same
data and budget (the reference likewise adapts from a pre-trained model):

* ``source_only``: more source-only training (the baseline);
* ``pseudo_label_only``: TPS-like - cross-frame pseudo-labels and the
  strong-augmentation consistency, no fusion, no alignment;
* ``dastc``: DA-STC, all parts;
* ``no_image_fusion`` (no fused clips, hence no feature fusion either),
  ``no_feature_fusion``, ``no_alignment``, ``mmd_alignment`` (the
  reference's RBF-MMD instead of the contrastive alignment);
* ``oracle``: trained on the target's labels.

Not in the default list: ``reference_teacher``, DA-STC with the released
code's teacher (the frozen warm start for the first 20% of the steps, as 8k
of 40k in the reference, then the student itself) instead of the EMA mean
teacher; ``--variants=dastc,reference_teacher --output=benchmarks/teacher.md``
compares the two (finished runs are reused, not retrained);
``no_histogram_match``, DA-STC without matching the source frames'
histograms to the target frame.

Each run is an ordinary training run in ``{workdir}/seed{S}/{variant}``
(resumable); the table of target-val mIoU (last checkpoint, mean +- std over
seeds) goes to ``--output`` (markdown) and a JSON beside it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from configs import synthetic as synthetic_config
from dastc_jax import log_filter
from dastc_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/adaptation', 'Output folder of the runs.')
flags.DEFINE_string('output', 'benchmarks/adaptation.md', 'Markdown table.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (all of them are reported).')
flags.DEFINE_list('variants', None, 'Subset of variants (default: all).')
flags.DEFINE_integer('warm_steps', 1200, 'Source-only warm-start steps.')
flags.DEFINE_integer('adapt_steps', 250, 'Steps of every variant.')
flags.DEFINE_integer('warm_batch_size', 4, 'Warm-start global batch.')
flags.DEFINE_integer('batch_size', 4, 'Global batch of the variants.')


def _dastc(**changes) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(c):
    c.method = 'dastc'
    for path, value in changes.items():
      node = c
      *parents, leaf = path.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
  return apply


def _method(name: str) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(c):
    c.method = name
  return apply


VARIANTS = {
    'source_only': _method('source_only'),
    'pseudo_label_only': _dastc(**{'dastc.image_fusion': False,
                                   'dastc.feature_fusion': False,
                                   'dastc.alignment.kind': 'none'}),
    'dastc': _dastc(),
    'no_image_fusion': _dastc(**{'dastc.image_fusion': False,
                                 'dastc.feature_fusion': False}),
    'no_feature_fusion': _dastc(**{'dastc.feature_fusion': False}),
    'no_alignment': _dastc(**{'dastc.alignment.kind': 'none'}),
    'mmd_alignment': _dastc(**{'dastc.alignment.kind': 'mmd',
                               'dastc.alignment.weight': 0.01,
                               'dastc.alignment.feature': 'logits'}),
    'oracle': _method('target_only'),
    'reference_teacher': _dastc(**{'dastc.teacher': 'reference'}),
    'no_histogram_match': _dastc(**{'data.histogram_match': False}),
}
EXTRA_VARIANTS = ('reference_teacher', 'no_histogram_match')
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in EXTRA_VARIANTS]


def run_config(seed: int, variant: str | None, warm_dir: str
               ) -> ml_collections.ConfigDict:
  """The config of one run (``variant=None``: the warm start)."""
  c = synthetic_config.get_config()
  c.seed = seed
  c.train.batch_size = (FLAGS.warm_batch_size if variant is None else
                        FLAGS.batch_size)
  c.eval.num_overlays = 0
  c.train.source_only_steps = 0
  if variant is None:
    c.method = 'source_only'
    c.train.num_steps = FLAGS.warm_steps
    c.eval.splits = ('target_val',)
  else:
    VARIANTS[variant](c)
    c.train.num_steps = FLAGS.adapt_steps
    c.dastc.teacher_switch_steps = FLAGS.adapt_steps // 5
    c.train.init_from = os.path.join(warm_dir, 'checkpoints')
    c.eval.splits = ('target_val',)
  c.train.checkpoint_every = c.train.num_steps
  return c


def _run(config: ml_collections.ConfigDict, workdir: str) -> tuple[float, bool]:
  """Trains (or reuses a finished run); returns target-val mIoU, trained."""
  final = os.path.join(workdir, 'eval', f'step_{config.train.num_steps}',
                       'results.json')
  trained = not os.path.exists(final)
  if trained:
    train.train_and_evaluate(config, workdir)
  with open(final) as f:
    return json.load(f)['splits']['target_val']['miou'], trained


def _table(results: dict[str, dict[int, float]], seeds: list[int]) -> str:
  rows = ['| variant | target-val mIoU (mean ± std) | ' +
          ' | '.join(f'seed {s}' for s in seeds) + ' |',
          '|---|---:|' + '---:|' * len(seeds)]
  for name, per_seed in results.items():
    vals = np.array([per_seed[s] for s in seeds])
    rows.append(f'| {name} | {vals.mean():.1f} ± {vals.std(ddof=1):.1f} | '
                + ' | '.join(f'{v:.1f}' for v in vals) + ' |')
  return '\n'.join(rows)


def main(argv):
  del argv
  log_filter.install()
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(FLAGS.workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  seeds = [int(s) for s in FLAGS.seeds]
  variants = FLAGS.variants or DEFAULT_VARIANTS
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'Unknown --variants {unknown}; expected some of '
                         f'{sorted(VARIANTS)}.')
  results = {v: {} for v in variants}
  start = time.time()
  reused = 0
  for seed in seeds:
    warm = os.path.join(FLAGS.workdir, f'seed{seed}', 'warm')
    warm_miou, trained = _run(run_config(seed, None, warm), warm)
    reused += not trained
    logging.info('seed %d warm start: target mIoU %.1f', seed, warm_miou)
    for v in variants:
      results[v][seed], trained = _run(
          run_config(seed, v, warm),
          os.path.join(FLAGS.workdir, f'seed{seed}', v))
      reused += not trained
      logging.info('seed %d %s: target mIoU %.1f (%.0f s so far)', seed, v,
                   results[v][seed], time.time() - start)
  minutes = (time.time() - start) / 60
  table = _table(results, seeds)
  cmd = ('python -m dastc_jax.benchmarks.adaptation '
         f'--workdir={FLAGS.workdir} --seeds={",".join(map(str, seeds))} '
         f'--warm_steps={FLAGS.warm_steps} --adapt_steps={FLAGS.adapt_steps} '
         f'--warm_batch_size={FLAGS.warm_batch_size} '
         f'--batch_size={FLAGS.batch_size}')
  if FLAGS.variants:
    cmd += f' --variants={",".join(variants)} --output={FLAGS.output}'
  note = (f' ({reused} finished runs were reused from an earlier invocation, '
          'not retrained.)' if reused else '')
  text = (f'# Adaptation on the synthetic world\n\nCommand: `{cmd}`\n\n'
          f'Target (Cityscapes-Seq layout) val mIoU (%) of the last '
          f'checkpoint, {len(seeds)} seeds; every variant continues from the '
          f'same {FLAGS.warm_steps}-step source-only warm start (global '
          f'batch {FLAGS.warm_batch_size}) for {FLAGS.adapt_steps} steps '
          f'(global batch {FLAGS.batch_size}). '
          f'Wall time {minutes:.0f} min on this machine.{note}\n\n'
          f'{table}\n')
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, 'w') as f:
    f.write(text)
  with open(os.path.splitext(FLAGS.output)[0] + '.json', 'w') as f:
    json.dump({'command': cmd, 'minutes': minutes, 'reused_runs': reused,
               'results': results}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
