"""Does adaptation help? DA-STC, baselines and ablations on the synthetic world.

  python -m dastc_jax.benchmarks.adaptation --world=default
  python -m dastc_jax.benchmarks.adaptation --world=hard
  python -m dastc_jax.benchmarks.adaptation --world=default --domain=image

Each command is one sub-benchmark (each under 2 hours on 2 cores). For every
seed, two source-only warm starts are trained (``--warm_steps``): a plain one
and one on source frames histogram-matched to target frames (the input-level
adaptation that a DA-STC run's warm-start phase also uses). Every variant
continues from one of them for ``--adapt_steps`` with the same data and
budget (the reference likewise adapts from a pre-trained model):

* ``source_only``: more plain source-only training (from the plain warm
  start): the model that never saw the target;
* ``source_only_hm``: more source-only training with histogram matching:
  the input-level adaptation alone;
* ``pseudo_label_only``: TPS-like - cross-frame pseudo-labels and the
  strong-augmentation consistency, no fusion, no alignment;
* ``dastc``: DA-STC, all parts;
* ``no_image_fusion`` (no fused clips, hence no feature fusion either),
  ``no_feature_fusion``, ``no_alignment``;
* ``oracle``: trained on the target's labels.

Extra variants (``--variants=...``): ``mmd_alignment`` (the reference's
RBF-MMD on logits), ``blend_feature_fusion`` (the reference decoder
variant's blend), ``feature_swap_to_target`` and ``feature_swap_to_source``
(the feature exchange in one direction only), ``feature_layer2`` and
``feature_layer3`` (the exchange after a deeper ResNet stage),
``pairs_alignment`` (the reference's per-pair aggregation),
``uniform_temporal``, ``student_labels_alignment``, ``reference_teacher``
(the frozen warm start for the first 20% of the steps, then the student),
``no_histogram_match``, ``no_distribution_alignment`` and
``pseudo_label_only_no_distribution_alignment`` (without the pseudo-label
distribution alignment), ``alignment_weight_1`` (the alignment loss at 10x
its default weight), ``cosine_alignment`` (the intra-class pull alone).

The image domain (``--domain=image``) trains single-frame DeepLabv2 on the
world's GTA5-layout source and Cityscapes-layout target (19 classes) with
``source_only``, ``source_only_hm``, ``pseudo_label_only`` and ``dastc``.

``--model=mit_b0`` swaps the demo's DeepLabv2-ResNet for the transformer
(MiT-B0 encoder, DAFormer head; the ACCEL-style video model, or the image
model with ``--domain=image``), from scratch with the demo's optimizer.
``--model=mit_b0_hrda`` is the same transformer inside HRDA: it reads the
frames at twice the single-scale size (the world's rendered size at
``--size_scale=1``), segments them downscaled by 0.5 (the single-scale
model's input) for context and in a detail crop of half the frame's height
and width at full resolution, fused by the learned scale attention; the
detail pass slides over the frame for evaluation and pseudo-labels. The
variants ``mic`` and ``pseudo_label_only_mic`` add MIC (8-px blocks, ratio
0.7, weight 1: the released 64-px blocks at the world's 1/8 of Cityscapes'
frame size) to ``dastc`` and ``pseudo_label_only``; docs/benchmarks.md has
the multi-resolution comparison's protocol.

Each run is an ordinary training run in
``{workdir}/{world}-{domain}[-mit-b0[-hrda]]/seed{S}/{variant}`` (resumable;
finished runs are reused). The report (``--output``, markdown plus a JSON
beside it) has target-val mIoU of the last checkpoint (mean +- std over
seeds, per seed), the paired per-seed difference to ``dastc`` and the
training wall time.
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

from configs import common
from configs import synthetic as synthetic_config
from dastc_jax.benchmarks import provenance
from dastc_jax.runtime import log_filter
from dastc_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/adaptation', 'Output folder of the runs.')
flags.DEFINE_enum(
    'world',
    'default',
    ['default', 'hard', 'winter'],
    'Synthetic world (data.synthetic.shift).',
)
flags.DEFINE_enum(
    'domain',
    'video',
    ['video', 'image'],
    'Video (ACCEL, VIPER/Cityscapes-Seq layouts) or image '
    '(DeepLabv2, GTA5/Cityscapes layouts).',
)
flags.DEFINE_enum(
    'model',
    'deeplab',
    ['deeplab', 'mit_b0', 'mit_b0_hrda'],
    "'deeplab': the demo's small DeepLabv2-ResNet (ACCEL for "
    "video); 'mit_b0': the transformer (MiT-B0 + DAFormer "
    "head, ACCEL-style video model) from scratch; 'mit_b0_hrda': "
    'the same inside HRDA, on frames twice the size (a 0.5 context pass '
    'and a detail crop of half the frame).',
)
flags.DEFINE_string(
    'output',
    '',
    'Markdown report (default: '
    'benchmarks/adaptation_{world}[_image][_mit_b0].md).',
)
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (all of them are reported).')
flags.DEFINE_list(
    'variants',
    None,
    'Subset of variants (default: the ' "domain's default list).",
)
flags.DEFINE_integer('warm_steps', 1200, 'Source-only warm-start steps.')
flags.DEFINE_integer('adapt_steps', 250, 'Steps of every variant.')
flags.DEFINE_integer('warm_batch_size', 4, 'Warm-start global batch.')
flags.DEFINE_integer('batch_size', 4, 'Global batch of the variants.')
flags.DEFINE_integer(
    'checkpoint_every',
    250,
    'Save every this many steps (and at the end), so that a stopped run '
    'resumes close to where it stopped; saving does not change training.',
)
flags.DEFINE_integer(
    'size_scale',
    1,
    "Train and evaluate at this multiple of the demo's frame sizes (2: the "
    "synthetic world's rendered size, 144x256 source / 128x256 target; a "
    '17x33 score grid). Use its own --workdir.',
    lower_bound=1,
)
flags.DEFINE_bool(
    'report_only',
    False,
    'Train nothing: report the finished '
    'runs (only seeds where every run finished).',
)

Change = Callable[[ml_collections.ConfigDict], None]


def _set(c: ml_collections.ConfigDict, path: str, value) -> None:
  node = c
  *parents, leaf = path.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value


def _dastc(**changes) -> Change:
  def apply(c):
    c.method = 'dastc'
    for path, value in changes.items():
      _set(c, path, value)

  return apply


def _method(name: str, **changes) -> Change:
  def apply(c):
    c.method = name
    for path, value in changes.items():
      _set(c, path, value)

  return apply


_PSEUDO_LABEL_ONLY = {
    'dastc.image_fusion': False,
    'dastc.feature_fusion': False,
    'dastc.alignment.kind': 'none',
}
_MIC = {
    'dastc.mic.enabled': True,
    'dastc.mic.block_size': 8,
    'dastc.mic.ratio': 0.7,
    'dastc.mic.weight': 1.0,
}

# name -> (change, warm start: 'hm' or 'plain').
VARIANTS: dict[str, tuple[Change, str]] = {
    'source_only': (_method('source_only'), 'plain'),
    'source_only_hm': (_method('source_only_hm'), 'hm'),
    'pseudo_label_only': (_dastc(**_PSEUDO_LABEL_ONLY), 'hm'),
    'dastc': (_dastc(), 'hm'),
    'no_image_fusion': (
        _dastc(**{'dastc.image_fusion': False, 'dastc.feature_fusion': False}),
        'hm',
    ),
    'no_feature_fusion': (_dastc(**{'dastc.feature_fusion': False}), 'hm'),
    'no_alignment': (_dastc(**{'dastc.alignment.kind': 'none'}), 'hm'),
    'oracle': (_method('target_only'), 'hm'),
    # Extras.
    'mmd_alignment': (
        _dastc(
            **{
                'dastc.alignment.kind': 'mmd',
                'dastc.alignment.weight': 0.01,
                'dastc.alignment.feature': 'logits',
            }
        ),
        'hm',
    ),
    'blend_feature_fusion': (_dastc(**{'dastc.feature_mode': 'blend'}), 'hm'),
    'feature_swap_to_target': (
        _dastc(**{'dastc.feature_swap_directions': 'to_target'}),
        'hm',
    ),
    'feature_swap_to_source': (
        _dastc(**{'dastc.feature_swap_directions': 'to_source'}),
        'hm',
    ),
    # Controls of the exchange: the features exchanged under the receiving
    # clip's own labels (must hurt if the exchange carries content), and
    # the same regions moved as pixels (if it scores the same, the
    # exchange is one more class-mix).
    'feature_swap_kept_labels': (
        _dastc(**{'dastc.feature_swap_labels': 'kept'}),
        'hm',
    ),
    'pixel_swap': (_dastc(**{'dastc.feature_mode': 'pixel_swap'}), 'hm'),
    'feature_layer2': (_dastc(**{'dastc.feature_layer': 'layer2'}), 'hm'),
    'feature_layer3': (_dastc(**{'dastc.feature_layer': 'layer3'}), 'hm'),
    'pairs_alignment': (
        _dastc(
            **{
                'dastc.alignment.aggregation': 'pairs',
                'dastc.alignment.target_labels': 'student',
            }
        ),
        'hm',
    ),
    'uniform_temporal': (
        _dastc(**{'dastc.alignment.temporal': 'uniform'}),
        'hm',
    ),
    'student_labels_alignment': (
        _dastc(**{'dastc.alignment.target_labels': 'student'}),
        'hm',
    ),
    'reference_teacher': (_dastc(**{'dastc.teacher': 'reference'}), 'hm'),
    'no_histogram_match': (_dastc(**{'data.histogram_match': False}), 'hm'),
    'no_distribution_alignment': (
        _dastc(**{'dastc.pl_distribution_alignment': False}),
        'hm',
    ),
    # DAFormer's quality-weighted pseudo-label losses.
    'quality_weighting': (_dastc(**{'dastc.pl_weighting': 'quality'}), 'hm'),
    'pseudo_label_only_quality_weighting': (
        _dastc(**_PSEUDO_LABEL_ONLY, **{'dastc.pl_weighting': 'quality'}),
        'hm',
    ),
    # Class-balanced pseudo-label selection (CBST's final portion, 0.5).
    'class_balanced': (_dastc(**{'dastc.pl_class_balanced': 0.5}), 'hm'),
    'pseudo_label_only_class_balanced': (
        _dastc(**_PSEUDO_LABEL_ONLY, **{'dastc.pl_class_balanced': 0.5}),
        'hm',
    ),
    # MIC: the target's block-masked copy against the teacher's labels of
    # the whole frame. The released 64-px blocks on Cityscapes frames
    # 2048 (HRDA) or 1024 (DAFormer) wide; the world's frames are 1/8 of
    # those, so 8 px, whatever the model's input size.
    'mic': (_dastc(**_MIC), 'hm'),
    'pseudo_label_only_mic': (_dastc(**_PSEUDO_LABEL_ONLY, **_MIC), 'hm'),
    'alignment_weight_1': (_dastc(**{'dastc.alignment.weight': 1.0}), 'hm'),
    # Weight 1.0: the pull's gradient per unit of cosine is 1, the
    # contrastive's (unsaturated) up to 1/tau = 10 at its weight 0.1.
    'cosine_alignment': (
        _dastc(
            **{'dastc.alignment.kind': 'cosine', 'dastc.alignment.weight': 1.0}
        ),
        'hm',
    ),
    'pseudo_label_only_no_distribution_alignment': (
        _dastc(
            **_PSEUDO_LABEL_ONLY, **{'dastc.pl_distribution_alignment': False}
        ),
        'hm',
    ),
}
DEFAULT_VARIANTS = {
    'video': [
        'source_only',
        'source_only_hm',
        'pseudo_label_only',
        'dastc',
        'no_image_fusion',
        'no_feature_fusion',
        'no_alignment',
        'oracle',
    ],
    'image': ['source_only', 'source_only_hm', 'pseudo_label_only', 'dastc'],
}


def _image_domain(c: ml_collections.ConfigDict) -> None:
  """The world's GTA5/Cityscapes-layout copies with single-frame DeepLabv2
  (the demo model's size; 19 Cityscapes classes)."""
  c.data.class_set = 'cityscapes19'
  c.model.num_classes = 19
  c.model.name = 'deeplabv2'
  c.data.source = common.domain('gta5', 'train', (72, 128))
  c.data.target = common.domain('cityscapes', 'train', (64, 128))
  c.data.target_val = common.domain(
      'cityscapes', 'val', (64, 128), label_size='native'
  )
  del c.data['source_val']
  c.dastc.alignment.pairs = 1
  c.dastc.num_rare_classes = 2


def _mit_b0(c: ml_collections.ConfigDict) -> None:
  """The transformer at MiT-B0 size with the demo's optimizer: a 256-d
  DAFormer head, trained BatchNorm affines, no auxiliary head, the feature
  exchange after the first MiT stage, no weight decay on the LayerNorms."""
  c.model.name = 'daformer' if FLAGS.domain == 'image' else 'accel_daformer'
  c.model.mit_variant = 'b0'
  c.model.head_features = 256
  c.model.freeze_bn_affine = False
  c.loss.aux_weight = 0.0
  c.dastc.feature_layer = 'c1'
  c.optim.no_weight_decay = ('norm',)


def _hrda(c: ml_collections.ConfigDict) -> None:
  """HRDA around the model, on frames already doubled by the caller, with
  the config's released defaults (0.5-scale context pass, i.e. the
  single-scale input; detail loss 0.1; class-wise attention; sliding
  detail pass for evaluation and pseudo-labels) and a detail crop of half
  the target frame's height and width, in multiples of ``crop_divisible``.
  The world has no ego vehicle, so no pseudo-label margins."""
  h = c.model.hrda
  h.enabled = True
  height, width = c.data.target.image_size
  d = h.crop_divisible
  h.detail_crop = (height // 2 // d * d, width // 2 // d * d)


def run_config(
    seed: int, variant: str | None, warm: str, warm_dir: str
) -> ml_collections.ConfigDict:
  """The config of one run (``variant=None``: the ``warm`` warm start)."""
  c = synthetic_config.get_config()
  # The variants are the paper's DA-STC and its ablations: without the
  # demo recipe's class-balanced selection, which is the `class_balanced`
  # variants (the tables of docs/benchmarks.md were measured so).
  c.dastc.pl_class_balanced = 0.0
  c.data.synthetic.shift = FLAGS.world
  if FLAGS.domain == 'image':
    _image_domain(c)
  if FLAGS.model in ('mit_b0', 'mit_b0_hrda'):
    _mit_b0(c)
  hrda = FLAGS.model == 'mit_b0_hrda'
  scale = FLAGS.size_scale * (2 if hrda else 1)
  for split in ('source', 'source_val', 'target', 'target_val'):
    if split in c.data:
      h, w = c.data[split].image_size
      c.data[split].image_size = (h * scale, w * scale)
  if hrda:
    _hrda(c)
  c.seed = seed
  c.train.batch_size = (
      FLAGS.warm_batch_size if variant is None else FLAGS.batch_size
  )
  c.eval.num_overlays = 0
  c.eval.splits = ('target_val',)
  c.train.source_only_steps = 0
  if variant is None:
    c.method = 'source_only_hm' if warm == 'hm' else 'source_only'
    c.train.num_steps = FLAGS.warm_steps
  else:
    VARIANTS[variant][0](c)
    c.train.num_steps = FLAGS.adapt_steps
    c.dastc.teacher_switch_steps = FLAGS.adapt_steps // 5
    c.train.init_from = os.path.join(warm_dir, 'checkpoints')
  c.train.checkpoint_every = min(FLAGS.checkpoint_every, c.train.num_steps)
  return c


def model_flag() -> str:
  """``'--model=... --size_scale=... '`` for a report's command: the flags
  that choose what is trained, each left out at its default."""
  flag = '' if FLAGS.model == 'deeplab' else f'--model={FLAGS.model} '
  if FLAGS.size_scale != 1:
    flag += f'--size_scale={FLAGS.size_scale} '
  return flag


def seed_dir(seed: int) -> str:
  """The folder of one seed's runs: ``{workdir}/{world}-{domain}[-model]``
  ``/seed{S}``."""
  model = (
      '' if FLAGS.model == 'deeplab' else f'-{FLAGS.model}'.replace('_', '-')
  )
  return os.path.join(
      FLAGS.workdir, f'{FLAGS.world}-{FLAGS.domain}{model}', f'seed{seed}'
  )


def _run(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[float | None, float | None, dict[str, float] | None]:
  """Trains (or reuses a finished run); returns (target-val mIoU, training
  minutes or None for a reused run, per-class IoU); None for the scores of
  an unfinished run under ``--report_only``."""
  final = os.path.join(
      workdir, 'eval', f'step_{config.train.num_steps}', 'results.json'
  )
  minutes = None
  if not os.path.exists(final):
    if FLAGS.report_only:
      return None, None, None
    start = time.time()
    train.train_and_evaluate(config, workdir)
    minutes = (time.time() - start) / 60
  with open(final) as f:
    scores = json.load(f)['splits']['target_val']
  return scores['miou'], minutes, scores['iou']


def _fmt(vals: np.ndarray) -> str:
  if len(vals) < 2:
    return f'{vals.mean():.1f}'
  return f'{vals.mean():.1f} ± {vals.std(ddof=1):.1f}'


def table(
    results: dict[str, dict[int, float]],
    seeds: list[int],
    minutes: dict[str, list[float]],
) -> str:
  """Markdown: mean ± std, per seed, paired difference to ``dastc``."""
  ref = results.get('dastc')
  rows = [
      '| run | target-val mIoU | '
      + ' | '.join(f'seed {s}' for s in seeds)
      + ' | paired diff. to dastc (mean ± std; per seed) | wins vs dastc '
      '| min/run |',
      '|---|---:|' + '---:|' * len(seeds) + '---|---:|---:|',
  ]
  for name, per_seed in results.items():
    vals = np.array([per_seed[s] for s in seeds])
    diff = wins = '-'
    if ref is not None and name != 'dastc':
      d = vals - np.array([ref[s] for s in seeds])
      diff = f'{_fmt(d)} ({", ".join(f"{x:+.1f}" for x in d)})'
      wins = f'{int(np.sum(d < 0))}/{len(seeds)}'
    m = minutes.get(name) or []
    mins = f'{np.mean(m):.1f}' if m else 'reused'
    rows.append(
        f'| {name} | {_fmt(vals)} | '
        + ' | '.join(f'{v:.1f}' for v in vals)
        + f' | {diff} | {wins} | {mins} |'
    )
  return '\n'.join(rows)


def class_table(
    per_class: dict[str, dict[int, dict[str, float | None]]], seeds: list[int]
) -> str:
  """Markdown: per class (rows), each run's IoU averaged over ``seeds``.
  Classes at 0.0 in every run, and classes without a score (absent from
  the evaluated labels: IoU None), are named below the table instead."""
  runs = [r for r in per_class if all(s in per_class[r] for s in seeds)]
  if not runs or not seeds:
    return ''
  classes = list(per_class[runs[0]][seeds[0]])

  def mean(r, k):
    v = [per_class[r][s][k] for s in seeds if per_class[r][s][k] is not None]
    return float(np.mean(v)) if v else None

  means = {r: {k: mean(r, k) for k in classes} for r in runs}
  absent = [k for k in classes if all(means[r][k] is None for r in runs)]
  zero = [
      k
      for k in classes
      if k not in absent and all(not means[r][k] for r in runs)
  ]
  rows = [
      '| class | ' + ' | '.join(runs) + ' |',
      '|---|' + '---:|' * len(runs),
  ]
  for k in classes:
    if k not in zero and k not in absent:
      cells = (
          '-' if means[r][k] is None else f'{means[r][k]:.1f}' for r in runs
      )
      rows.append(f'| {k} | ' + ' | '.join(cells) + ' |')
  if zero:
    rows.append(f'\n0.0 in every run: {", ".join(zero)}.')
  if absent:
    rows.append(f'\nNot in the evaluated labels: {", ".join(absent)}.')
  return '\n'.join(rows)


def main(argv):
  del argv
  log_filter.install()
  jax.config.update(
      'jax_compilation_cache_dir', os.path.join(FLAGS.workdir, 'jax_cache')
  )
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  seeds = [int(s) for s in FLAGS.seeds]
  variants = FLAGS.variants or DEFAULT_VARIANTS[FLAGS.domain]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(
        f'Unknown --variants {unknown}; expected some of '
        f'{sorted(VARIANTS)}.'
    )
  model_tag = '' if FLAGS.model == 'deeplab' else f'_{FLAGS.model}'
  output = FLAGS.output or os.path.join(
      'benchmarks',
      f'adaptation_{FLAGS.world}'
      f'{"_image" if FLAGS.domain == "image" else ""}{model_tag}.md',
  )
  warms = sorted({VARIANTS[v][1] for v in variants})
  results = {f'warm start ({w})': {} for w in warms}
  results.update({v: {} for v in variants})
  minutes = {k: [] for k in results}
  per_class = {k: {} for k in results}
  start = time.time()
  for seed in seeds:
    base = seed_dir(seed)
    warm_dirs = {w: os.path.join(base, f'warm_{w}') for w in warms}
    for w, wdir in warm_dirs.items():
      miou, mins, iou = _run(run_config(seed, None, w, wdir), wdir)
      if miou is None:
        continue
      results[f'warm start ({w})'][seed] = miou
      per_class[f'warm start ({w})'][seed] = iou
      if mins is not None:
        minutes[f'warm start ({w})'].append(mins)
      logging.info('seed %d warm start (%s): target mIoU %.1f', seed, w, miou)
    for v in variants:
      wdir = warm_dirs[VARIANTS[v][1]]
      miou, mins, iou = _run(
          run_config(seed, v, VARIANTS[v][1], wdir), os.path.join(base, v)
      )
      if miou is None:
        continue
      results[v][seed] = miou
      per_class[v][seed] = iou
      if mins is not None:
        minutes[v].append(mins)
      logging.info(
          'seed %d %s: target mIoU %.1f (%.0f s so far)',
          seed,
          v,
          miou,
          time.time() - start,
      )
  total = (time.time() - start) / 60
  complete = [s for s in seeds if all(s in r for r in results.values())]
  if not complete:
    raise app.UsageError(
        f'No seed of {seeds} has all its runs finished under '
        f'{os.path.dirname(seed_dir(seeds[0]))}: nothing to report, '
        f'{output} is left as it was.'
    )
  partial = ''
  if complete != seeds:
    partial = (
        f' **Partial report** (`--report_only`): seeds '
        f'{[s for s in seeds if s not in complete]} have unfinished '
        'runs and are left out.'
    )
    seeds = complete
  cmd = (
      'python -m dastc_jax.benchmarks.adaptation '
      f'--world={FLAGS.world} --domain={FLAGS.domain} '
      f'{model_flag()}--workdir={FLAGS.workdir} '
      f'--seeds={",".join(map(str, seeds))} '
      f'--warm_steps={FLAGS.warm_steps} --adapt_steps={FLAGS.adapt_steps} '
      f'--warm_batch_size={FLAGS.warm_batch_size} '
      f'--batch_size={FLAGS.batch_size}'
  )
  if FLAGS.variants:
    cmd += f' --variants={",".join(variants)}'
  if FLAGS.output:
    cmd += f' --output={FLAGS.output}'
  if FLAGS.report_only:
    cmd += ' --report_only'
  reused = sum(1 for k in results for s in seeds) - sum(
      len(m) for m in minutes.values()
  )
  note = (
      f' {reused} finished runs were reused from an earlier invocation '
      '(their time is not counted).'
      if reused
      else ''
  )
  text = (
      f'# Adaptation on the synthetic world: {FLAGS.world} world, '
      f'{FLAGS.domain} domain, {FLAGS.model}\n\nCommand: `{cmd}`\n\n'
      f'Target val mIoU (%) of the last checkpoint, {len(seeds)} seed(s). '
      f'Warm starts: {FLAGS.warm_steps} source-only steps (global batch '
      f'{FLAGS.warm_batch_size}), plain or on histogram-matched source '
      f'frames (hm); every variant continues from one of them for '
      f'{FLAGS.adapt_steps} steps (global batch {FLAGS.batch_size}): '
      '`source_only` from the plain one, all others from hm. "paired '
      'diff." is the variant minus `dastc` on the same seed; "wins vs '
      'dastc" counts the seeds where dastc is better. Wall time '
      f'{total:.0f} min on this machine, code at commit '
      f'{provenance.commit()}.{note}{partial}\n\n'
      f'{table(results, seeds, minutes)}\n\n'
      f'Per class, IoU (%) averaged over the seeds:\n\n'
      f'{class_table(per_class, seeds)}\n'
  )
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'w') as f:
    f.write(text)
  with open(os.path.splitext(output)[0] + '.json', 'w') as f:
    json.dump(
        {
            'command': cmd,
            'minutes': total,
            'run_minutes': minutes,
            'results': results,
            'per_class': per_class,
        },
        f,
        indent=2,
    )


if __name__ == '__main__':
  app.run(main)
