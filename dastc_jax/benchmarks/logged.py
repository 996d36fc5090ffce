r"""Training scalars of the adaptation benchmark's runs, averaged over a run.

For the runs of ``dastc_jax.benchmarks.adaptation`` (same ``--world``,
``--domain``, ``--model``, ``--workdir``, ``--seeds``, ``--variants``
flags) it reads TensorBoard scalars (``--tags``) from each run's workdir and
prints their mean over the logged steps (every ``train.log_every``), per
variant as seed mean ± std with the per-seed values. Example::

  python -m dastc_jax.benchmarks.logged --world=hard \
      --workdir=runs/adaptation_v3 --seeds=0,1,2 --variants=dastc \
      --tags=feat_rel_diff_to_t_f0,feat_rel_diff_same_s_f0,swap_area_to_t_f0

(The feature exchange logs each frame of the clip: ``_f0`` is frame t,
``_f1`` frame t-1.)
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from dastc_jax.benchmarks import adaptation
from dastc_jax.runtime import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_list('tags', ['loss_align', 'align_classes'], 'Scalar tags.')


def run_means(
    run_dir: str, tags: list[str], first_step: int = 1
) -> dict[str, float]:
  """Mean of each tag over the steps >= ``first_step`` logged in
  ``run_dir`` (NaN for a tag the run did not log)."""
  out = {}
  for tag in tags:
    values = [
        v for s, v in workdir_lib.read_scalars(run_dir, tag) if s >= first_step
    ]
    out[tag] = float(np.mean(values)) if values else float('nan')
  return out


def table(results: dict[str, list[dict[str, float]]], tags: list[str]) -> str:
  """Markdown: per variant and tag, seed mean ± std (per-seed values)."""
  rows = [
      '| run | ' + ' | '.join(tags) + ' |',
      '|---|' + '---:|' * len(tags),
  ]
  for name, per_seed in results.items():
    cells = []
    for tag in tags:
      v = np.array([r[tag] for r in per_seed])
      cell = f'{v.mean():.3f}'
      if len(v) > 1:
        cell += (
            f' ± {v.std(ddof=1):.3f} (' + ', '.join(f'{x:.3f}' for x in v) + ')'
        )
      cells.append(cell)
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  variants = FLAGS.variants or ['dastc']
  results = {
      v: [
          run_means(os.path.join(adaptation.seed_dir(s), v), FLAGS.tags)
          for s in seeds
      ]
      for v in variants
  }
  print(table(results, FLAGS.tags))


if __name__ == '__main__':
  app.run(main)
