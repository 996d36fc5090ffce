"""How good are a warm start's pseudo-labels? Per class, and per rule.

  python -m dastc_jax.benchmarks.pseudo_labels --world=hard --seed=0

Loads the adaptation benchmark's histogram-matched warm start
(``{workdir}/{world}-video/seed{S}/warm_hm``; run the adaptation benchmark
first), runs the DA-STC teacher on ``--batches`` target training batches,
and compares its cross-frame pseudo-labels of frame t with the held-out
target labels: pixel accuracy when keeping pixels above a probability
threshold, and per predicted class the share of pixels, the precision and
the share kept at probability >= 0.9. With and without pseudo-label
distribution alignment (``dastc.pl_distribution_alignment``; the running
priors start at the first batch, as in training).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax
import numpy as np

from dastc_jax.benchmarks import provenance
from dastc_jax import train
from dastc_jax.benchmarks import adaptation
from dastc_jax.data import labels as labels_lib
from dastc_jax.data import pipeline
from dastc_jax.method import dastc_step
from dastc_jax.ops import image as image_ops
from dastc_jax.runtime import log_filter
from dastc_jax.runtime import state as state_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('seed', 0, 'Seed of the warm start.')
flags.DEFINE_integer('batches', 60, 'Target batches (of 4 clips).')


def _teacher_labels(config, root, aligned: bool):
  """Pseudo-labels, confidences and true labels over the batches."""
  config = config.copy_and_resolve_references()
  config.dastc.pl_distribution_alignment = aligned
  graphdef, state, _ = state_lib.create_train_state(
      config, sizes=state_lib.carried_sizes(config, root)
  )
  state = state_lib.init_from_checkpoint(config, state)
  it = iter(pipeline.make_train_dataset(config, root, local_batch_size=4))

  @jax.jit
  def run(state, batch):
    tgt = batch['target']
    x = image_ops.normalize(tgt['frames'])
    pl, _, _, prior = dastc_step._pseudo_labels(  # pylint: disable=protected-access
        config,
        graphdef,
        None,  # the run's own EMA teacher
        state,
        x,
        tgt,
        x.shape[2:4],
        0,
        jax.random.key(0),
        jax.random.key(1),
        batch['source']['labels'],
    )
    carried = {
        **state.carried,
        'class_prior': prior,
        'has_prev': jax.numpy.asarray(True),
    }
    return pl['label_t'], pl['conf_t'], state.replace(carried=carried)

  out = []
  for _ in range(FLAGS.batches):
    batch = next(it)
    lab, conf, state = run(state, batch)
    out.append((np.asarray(lab), np.asarray(conf), batch['target']['label']))
  return [np.concatenate(x) for x in zip(*out)]


def report(lab, conf, gt, names) -> str:
  valid = gt < len(names)
  rows = ['| rule | pixels kept | accuracy |', '|---|---:|---:|']
  for th in (0.0, 0.5, 0.7, 0.9, 0.95):
    k = valid & (conf >= th)
    rows.append(
        f'| probability >= {th} | {k.sum() / valid.sum():.2f} | '
        f'{np.mean((lab == gt)[k]):.3f} |'
    )
  rows += [
      '',
      '| predicted class | share of pixels | true share | '
      'precision | precision at p >= 0.9 | kept at p >= 0.9 |',
      '|---|---:|---:|---:|---:|---:|',
  ]
  for c, name in enumerate(names):
    m = valid & (lab == c)
    if m.sum() < 100:
      continue
    hi = m & (conf >= 0.9)
    prec_hi = f'{np.mean(gt[hi] == c):.2f}' if hi.sum() else '-'
    rows.append(
        f'| {name} | {m.sum() / valid.sum():.3f} | '
        f'{np.sum(valid & (gt == c)) / valid.sum():.3f} | '
        f'{np.mean(gt[m] == c):.2f} | {prec_hi} | '
        f'{hi.sum() / m.sum():.2f} |'
    )
  return '\n'.join(rows)


def main(argv):
  del argv
  log_filter.install()
  config = adaptation.run_config(
      FLAGS.seed,
      'dastc',
      'hm',
      os.path.join(
          FLAGS.workdir, f'{FLAGS.world}-video', f'seed{FLAGS.seed}', 'warm_hm'
      ),
  )
  root = train.resolve_data_root(config)
  names = labels_lib.get_class_set(config.data.class_set).classes
  output = FLAGS.output or os.path.join(
      'benchmarks', f'pseudo_labels_{FLAGS.world}.md'
  )
  cmd = (
      'python -m dastc_jax.benchmarks.pseudo_labels '
      f'--world={FLAGS.world} --seed={FLAGS.seed} '
      f'--batches={FLAGS.batches} --workdir={FLAGS.workdir}'
  )
  text = [
      f'# Warm-start pseudo-labels: {FLAGS.world} world, seed '
      f'{FLAGS.seed}\n',
      f'Command: `{cmd}` (commit {provenance.commit()})\n',
      f'Teacher = the histogram-matched source-only warm start, on '
      f'{FLAGS.batches} target training batches of 4 clips (frame t, '
      'cross-frame labels), against the held-out target labels.\n',
  ]
  for aligned in (False, True):
    lab, conf, gt = _teacher_labels(config, root, aligned)
    text += [
        f'## pl_distribution_alignment={aligned}\n',
        report(lab, conf, gt, names),
        '',
    ]
  text = '\n'.join(text) + '\n'
  print(text)
  with open(output, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  app.run(main)
