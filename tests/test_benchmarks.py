"""The benchmarks' run configs and reports (no training here)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dastc_jax.benchmarks import adaptation
from dastc_jax.data import labels as labels_lib


def test_every_variant_continues_from_its_warm_start():
  warm = adaptation.run_config(0, None, 'hm', '/w/seed0/warm_hm')
  assert warm.method == 'source_only_hm'
  assert warm.train.init_from == ''
  assert warm.train.num_steps == adaptation.FLAGS.warm_steps
  assert adaptation.run_config(0, None, 'plain', '/w').method == 'source_only'
  configs = {
      v: adaptation.run_config(0, v, w, f'/w/seed0/warm_{w}')
      for v, (_, w) in adaptation.VARIANTS.items()
  }
  for v, c in configs.items():
    w = adaptation.VARIANTS[v][1]
    assert c.train.init_from == f'/w/seed0/warm_{w}/checkpoints', v
    assert c.train.num_steps == adaptation.FLAGS.adapt_steps, v
    assert c.train.source_only_steps == 0, v
    assert c.seed == 0, v
    assert c.data.synthetic.shift == adaptation.FLAGS.world
  # The plain baseline never reads the target; everything else starts from
  # the histogram-matched warm start.
  assert adaptation.VARIANTS['source_only'][1] == 'plain'
  assert configs['source_only'].method == 'source_only'
  assert configs['source_only_hm'].method == 'source_only_hm'
  assert configs['oracle'].method == 'target_only'
  d = {v: c.dastc for v, c in configs.items()}
  assert (
      d['dastc'].image_fusion,
      d['dastc'].feature_fusion,
      d['dastc'].alignment.kind,
      d['dastc'].teacher,
  ) == (True, True, 'contrastive', 'ema')
  assert (
      d['pseudo_label_only'].image_fusion,
      d['pseudo_label_only'].feature_fusion,
      d['pseudo_label_only'].alignment.kind,
  ) == (False, False, 'none')
  assert not d['no_image_fusion'].image_fusion
  assert d['no_image_fusion'].alignment.kind == 'contrastive'
  assert d['no_feature_fusion'].image_fusion
  assert not d['no_feature_fusion'].feature_fusion
  assert d['no_alignment'].alignment.kind == 'none'
  assert d['mmd_alignment'].alignment.kind == 'mmd'
  assert d['reference_teacher'].teacher == 'reference'
  assert (
      d['reference_teacher'].teacher_switch_steps
      == adaptation.FLAGS.adapt_steps // 5
  )
  # Apart from the switched parts, every DA-STC variant is the same run.
  base = configs['dastc'].to_dict()
  for v in ('no_feature_fusion', 'no_alignment'):
    other = configs[v].to_dict()
    diff = {k for k in base['dastc'] if base['dastc'][k] != other['dastc'][k]}
    assert diff == (
        {'feature_fusion'} if v == 'no_feature_fusion' else {'alignment'}
    ), (v, diff)
  assert 'reference_teacher' not in adaptation.DEFAULT_VARIANTS['video']
  assert configs['dastc'].data.histogram_match
  assert not configs['no_histogram_match'].data.histogram_match
  # The paper's DA-STC and its ablations, without the demo recipe's
  # class-balanced selection (the `class_balanced` variants have it).
  assert configs['dastc'].dastc.pl_class_balanced == 0.0
  assert configs['no_alignment'].dastc.pl_class_balanced == 0.0
  assert configs['class_balanced'].dastc.pl_class_balanced == 0.5
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  cb = synthetic.get_config().dastc.pl_class_balanced
  assert configs['class_balanced'].dastc.pl_class_balanced == cb
  # --size_scale=2 trains at the world's rendered size.
  assert configs['dastc'].data.target.image_size == (64, 128)
  flags = adaptation.FLAGS
  old = flags.size_scale
  flags.size_scale = 2
  try:
    c = adaptation.run_config(0, 'no_alignment', 'hm', '/w/seed0/warm_hm')
    # Reports (adaptation's and prototypes') print the flag in the command.
    assert adaptation.model_flag() == '--size_scale=2 '
  finally:
    flags.size_scale = old
  assert c.data.source.image_size == (144, 256)
  assert c.data.source_val.image_size == (144, 256)
  assert c.data.target.image_size == (128, 256)
  assert c.data.target_val.image_size == (128, 256)


def test_table_reports_mean_std_and_paired_differences():
  table = adaptation.table(
      {'dastc': {0: 12.0, 1: 21.0, 2: 33.0}, 'a': {0: 10.0, 1: 20.0, 2: 30.0}},
      [0, 1, 2],
      {'a': [2.0, 4.0]},
  )
  assert '| dastc | 22.0 ± 10.5 | 12.0 | 21.0 | 33.0 | - | - | reused |' in (
      table
  )
  assert (
      '| a | 20.0 ± 10.0 | 10.0 | 20.0 | 30.0 | -2.0 ± 1.0 (-2.0, -1.0, '
      '-3.0) | 3/3 | 3.0 |'
  ) in table


def test_unknown_variant_is_refused():
  with pytest.raises(KeyError, match='no_such_variant'):
    adaptation.run_config(0, 'no_such_variant', 'hm', '/w')


def test_input_benchmark_report_and_core_count():
  from dastc_jax.benchmarks import input as input_bench  # pylint: disable=g-import-not-at-top

  assert input_bench.cores_needed(1.0, 1.33) == 2  # 2 clips/s from 1.33
  assert input_bench.cores_needed(0.1, 1.33) == 1
  assert input_bench.cores_needed(4.0, 1.0) == 8
  res = {
      'loader_clips_per_s': {0: 1.4, 1: 1.0, 2: 1.9},
      'step': {'clips_per_s': 0.5, 'first_step_s': 3.0},
      'model': 'tiny',
      'device': 'cpu',
      'cpu_count': 2,
      'machine': 'x86_64',
  }
  md = input_bench.report(res, 'python -m dastc_jax.benchmarks.input')
  assert '| 1 worker process(es) | 1.00 | 2.0 |' in md
  assert 'needs 1 loader core(s)' in md
  assert '| 0.25 s | 4.0 | 8 |' in md


def test_step_benchmark_batch_and_report():
  from configs import viper  # pylint: disable=g-import-not-at-top
  from dastc_jax.benchmarks import step as step_bench  # pylint: disable=g-import-not-at-top

  c = viper.get_config()
  b = step_bench.fake_batch(c, 2, (24, 40), (16, 32))
  assert b['source']['frames'].shape == (2, 2, 24, 40, 3)
  assert b['source']['rare_frames'].shape == (
      2,
      c.dastc.num_rare_classes,
      16,
      32,
      3,
  )
  assert b['target']['frames'].shape == (2, 3, 16, 32, 3)
  assert set(b['target']) >= {'flow', 'flow_t_t2', 'flow_t1_t2'}
  res = {
      'device': 'cpu',
      'platform': 'cpu',
      'cpu_count': 2,
      'jax': '0',
      'date': 'd',
      'batch': 1,
      'src_hw': (8, 16),
      'tgt_hw': (8, 16),
      'dtype': 'float32',
      'peak': 50e9,
      'peak_kind': 'measured',
      'peak_rss': 2**30,
      'xla_flags': '--f=1',
      'source_only': {
          'step_s': 2.0,
          'frames_per_s': 1.0,
          'compile_s': 3,
          'flops': 60e9,
          'flop_per_s': 30e9,
          'peak_bytes': None,
          'times': [2.0, 2.1],
      },
      'torch': {
          'step_s': 1.6,
          'threads': 2,
          'version': 't',
          'times': [1.6, 1.5],
      },
      'torch_malloc': {'step_s': 1.5, 'times': [1.5, 1.5]},
      'xla_default': {'step_s': 2.5, 'times': [2.5, 2.5]},
      'unrolled': {'step_s': 1.8, 'times': [1.8, 2.0]},
      'host_malloc': 'applied',
      'weak': {1: 1.0, 2: 1.25},
  }
  md = step_bench.report(res, 'cmd')
  assert '| source_only | 2.000 | 1.00 | 3.0 | 60 | 30.0 | 60% | - |' in md
  assert (
      'peak resident memory of the process after the JAX steps: 1.00 GiB' in md
  )
  assert 'JAX / PyTorch time ratio: 1.25' in md
  assert 'JAX: 2.00, 2.10; PyTorch: 1.60, 1.50.' in md
  # 2.0/1.6 = 1.25 and 2.1/1.5 = 1.40, paired step by step.
  assert (
      '| PyTorch eager, glibc malloc defaults (as users run it) | 1.600 '
      '| 1.25 | 1.33 (1.29-1.36; 1.25-1.40, 2 pairs) |'
  ) in md
  assert 'XLA_FLAGS of the JAX steps: `--f=1`' in md
  assert 'Host malloc settings of this process: applied' in md
  # Rows: the ratio of medians (2.0 / 1.5) and the pairs 2.0/1.5, 2.1/1.5.
  assert (
      '| PyTorch eager with the host_malloc.py settings | 1.500 | 1.33 | '
      '1.37 (1.35-1.38; 1.33-1.40, 2 pairs) |'
  ) in md
  assert "| JAX, XLA:CPU's default fusion" in md
  assert '| 2.500 | 0.80 | 0.82 (0.81-0.83; 0.80-0.84, 2 pairs) |' in md
  # The MiT blocks unrolled: 2.0/1.8 (step_s), pairs 2.0/1.8 and 2.1/2.0.
  assert '| JAX, MiT blocks unrolled: no scan' in md
  assert '| 1.800 | 1.11 | 1.08 (1.07-1.10; 1.05-1.11, 2 pairs) |' in md
  assert '| 2 | 1.25 | 0.80 |' in md


def test_step_benchmark_vit_rows_build_both_frameworks():
  """``--model=vit``: the transformer video model's config, and its PyTorch
  eager baseline (transformers' MiT + the restated DAFormer head + the flow
  fusion, AdamW) builds and runs a training step, also in a process that
  already loaded TensorFlow (as a test worker that ran the train tests has:
  triton imported after it segfaulted the process; conftest.py)."""
  import tensorflow  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  from dastc_jax.benchmarks import step as step_bench  # pylint: disable=g-import-not-at-top

  c = step_bench._config(1, 'float32', model='vit', mit_variant='tiny')  # pylint: disable=protected-access
  assert (c.model.name, c.model.mit_variant) == ('accel_daformer', 'tiny')
  c.model.head_features = 16
  one, info = step_bench.build_torch_step(c, 1, (32, 64))
  assert info['transformers'] and info['version']
  assert one() > 0
  res = {
      'device': 'cpu',
      'platform': 'cpu',
      'cpu_count': 2,
      'jax': '0',
      'date': 'd',
      'batch': 1,
      'src_hw': (8, 16),
      'tgt_hw': (8, 16),
      'dtype': 'float32',
      'peak': None,
      'peak_kind': 'measured',
      'peak_rss': 2**30,
      'model': 'QuadMix-ViT (MiT-B5 + DAFormer head + ' 'flow fusion)',
  }
  assert 'QuadMix-ViT (MiT-B5' in step_bench.report(res, 'cmd')


def test_step_benchmark_alternates_runners():
  from dastc_jax.benchmarks import step as step_bench  # pylint: disable=g-import-not-at-top

  calls = []
  runners = {
      'a': lambda: calls.append('a') or 1.0,
      'b': lambda: calls.append('b') or 2.0,
  }
  times = step_bench.interleaved(runners, 3)
  assert calls == ['a', 'b'] * 3
  assert times == {'a': [1.0] * 3, 'b': [2.0] * 3}


def test_image_domain_and_hard_world_run_configs():
  """``--domain=image``: single-frame DeepLabv2 on the world's GTA5/
  Cityscapes-layout copies (19 classes, one alignment pass);
  ``--world=hard`` selects the hard target."""
  flags = adaptation.FLAGS
  old = flags.domain, flags.world
  try:
    flags.domain, flags.world = 'image', 'hard'
    for variant in adaptation.DEFAULT_VARIANTS['image']:
      c = adaptation.run_config(0, variant, 'hm', '/w')
      assert c.model.name == 'deeplabv2' and c.model.num_classes == 19
      assert c.data.class_set == 'cityscapes19'
      assert (c.data.source.dataset, c.data.target.dataset) == (
          'gta5',
          'cityscapes',
      )
      assert c.data.synthetic.shift == 'hard'
      assert c.dastc.alignment.pairs == 1
  finally:
    flags.domain, flags.world = old


def test_transformer_run_configs_and_folders():
  """``--model=mit_b0``: every run of the benchmark (warm starts and
  variants, video and image) is the MiT-B0 transformer with its exchange
  after the first stage, in a folder of its own; the variants stay what
  they are."""
  from dastc_jax.runtime import validation  # pylint: disable=g-import-not-at-top

  flags = adaptation.FLAGS
  old = flags.model, flags.domain, flags.workdir
  try:
    flags.model, flags.workdir = 'mit_b0', '/w'
    for domain, name in (('video', 'accel_daformer'), ('image', 'daformer')):
      flags.domain = domain
      assert adaptation.seed_dir(1) == f'/w/default-{domain}-mit-b0/seed1'
      runs = [adaptation.run_config(0, None, 'hm', '/w')] + [
          adaptation.run_config(0, v, 'hm', '/w')
          for v in adaptation.DEFAULT_VARIANTS[domain]
      ]
      for c in runs:
        assert (c.model.name, c.model.mit_variant) == (name, 'b0')
        assert c.dastc.feature_layer == 'c1'
        assert c.loss.aux_weight == 0.0
        validation.check_config(c)
      dastc = runs[1 + adaptation.DEFAULT_VARIANTS[domain].index('dastc')]
      assert dastc.method == 'dastc' and dastc.dastc.image_fusion
    flags.model, flags.domain = 'deeplab', 'video'
    assert adaptation.seed_dir(2) == '/w/default-video/seed2'
    assert adaptation.run_config(0, 'dastc', 'hm', '/w').model.name == (
        'accel_deeplabv2'
    )
  finally:
    flags.model, flags.domain, flags.workdir = old


def test_multiresolution_run_configs():
  """``--model=mit_b0_hrda``: the MiT-B0 transformer inside HRDA on frames
  twice the single-scale size, whose 0.5 context pass sees what the
  single-scale model sees, with a detail crop of half the frame; the MIC
  variants add only MIC (8-px blocks) to the run they extend. Every run
  (warm start and variant, video and image) passes validation."""
  from dastc_jax.models import hrda  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import validation  # pylint: disable=g-import-not-at-top

  flags = adaptation.FLAGS
  old = flags.model, flags.domain, flags.workdir
  variants = ('pseudo_label_only', 'dastc', 'pseudo_label_only_mic', 'mic')
  try:
    flags.workdir = '/w'
    for domain in ('video', 'image'):
      flags.domain = domain
      flags.model = 'mit_b0'
      single = adaptation.run_config(0, 'dastc', 'hm', '/w')
      mic_single = adaptation.run_config(0, 'mic', 'hm', '/w')
      validation.check_config(mic_single)
      assert not single.model.hrda.enabled and mic_single.dastc.mic.enabled
      flags.model = 'mit_b0_hrda'
      assert adaptation.seed_dir(0) == f'/w/default-{domain}-mit-b0-hrda/seed0'
      runs = {None: adaptation.run_config(0, None, 'hm', '/w')}
      runs.update(
          {v: adaptation.run_config(0, v, 'hm', '/w') for v in variants}
      )
      for v, c in runs.items():
        validation.check_config(c)
        h = c.model.hrda
        assert h.enabled and h.context_scale == 0.5, v
        assert c.model.mit_variant == 'b0', v
        for split in ('source', 'target', 'target_val'):
          single_hw = tuple(single.data[split].image_size)
          hw = tuple(c.data[split].image_size)
          assert hw == (2 * single_hw[0], 2 * single_hw[1]), (v, split)
          assert hrda.context_size(hw, 0.5) == single_hw, (v, split)
        assert tuple(c.data.target.image_size) == (128, 256)
        assert tuple(h.detail_crop) == (64, 128), v
        assert c.dastc.mic.enabled == bool(v and v.endswith('mic')), v
      for v in ('pseudo_label_only', 'dastc'):
        base, mic = (
            runs[v].to_dict(),
            runs['mic' if v == 'dastc' else v + '_mic'].to_dict(),
        )
        assert (
            mic['dastc']['mic']['block_size'],
            mic['dastc']['mic']['ratio'],
        ) == (
            8,
            0.7,
        )
        mic['dastc']['mic'] = base['dastc']['mic']
        assert mic == base, v
  finally:
    flags.model, flags.domain, flags.workdir = old


def test_class_table_averages_seeds_and_names_empty_classes():
  table = adaptation.class_table(
      {
          'warm start (hm)': {
              0: {'road': 50.0, 'pole': 0.0, 'sign': 0.0, 'train': None},
              1: {'road': 60.0, 'pole': None, 'sign': 0.0, 'train': None},
          },
          'dastc': {
              0: {'road': 70.0, 'pole': 1.0, 'sign': 0.0, 'train': None},
              1: {'road': 80.0, 'pole': 2.0, 'sign': 0.0, 'train': None},
          },
          'unfinished': {0: {'road': 1.0, 'pole': 1.0, 'sign': 1.0}},
      },
      [0, 1],
  )
  assert table.splitlines()[:4] == [
      '| class | warm start (hm) | dastc |',
      '|---|---:|---:|',
      '| road | 55.0 | 75.0 |',
      '| pole | 0.0 | 1.5 |',
  ]
  # A class without a score on a seed is averaged over the others.
  assert table.endswith(
      '0.0 in every run: sign.\n\nNot in the evaluated labels: train.'
  )


def test_prototype_helpers():
  """Per-class means, nearest-prototype classification by cosine among the
  classes present, and label sampling at the centres of a coarser grid."""
  from dastc_jax.benchmarks import prototypes  # pylint: disable=g-import-not-at-top

  feat = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
  label = np.array([0, 0, 2, 2])
  protos, counts = prototypes.prototypes(feat, label, 3)
  np.testing.assert_allclose(protos, [[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
  np.testing.assert_array_equal(counts, [2, 0, 2])
  # Class 1 is absent: never chosen, even for [1, 1], which is its own
  # direction (then a tie of classes 0 and 2: the lower index). Cosine, so
  # the scale of a feature does not matter.
  protos[1] = [1.0, 1.0]
  got = prototypes.nearest_prototype(
      np.array([[5.0, 0.1], [0.1, 0.2], [1.0, 1.0]]), protos, counts > 0
  )
  np.testing.assert_array_equal(got, [0, 2, 0])
  # Corners aligned, as the evaluation upsamples: a 3x3 grid on 5x5 labels
  # reads rows/columns 0, 2, 4.
  lab = np.arange(25).reshape(1, 5, 5)
  np.testing.assert_array_equal(
      prototypes._nearest_labels(lab, (3, 3)),  # pylint: disable=protected-access
      [[[0, 2, 4], [10, 12, 14], [20, 22, 24]]],
  )
  # The confusion matrix does not wrap around with uint8 labels (19 classes).
  cs = labels_lib.get_class_set('cityscapes19')
  label = np.array([18, 18, 3], np.uint8)
  pred = np.array([18, 3, 3], np.uint8)
  # IoU 0.5 for class 18 and for class 3 (the only classes present).
  assert prototypes._miou(pred, label, cs) == 50.0  # pylint: disable=protected-access
  # A statistic a run does not have (nothing logged) is '-', not 'nan'.
  cols = [('a', 'a', '{:.1f}'), ('b', 'b', '{:.1f}')]
  nan = float('nan')
  text = prototypes.table(
      {'v': [{'a': 1.0, 'b': nan}, {'a': 3.0, 'b': nan}]}, cols
  )
  assert text.splitlines()[-1] == '| v | 2.0 ± 1.4 | - |'


def test_alignment_diagnostics_see_what_uncentred_cosines_hide():
  """A shift shared by all classes makes uncentred class means look aligned
  (cosine near 1) while the centred cosine reads the classes' own
  directions; the classifier gap is in units of the distance between two
  source classes; the batch diagnostics count the classes that reach
  min_pixels in both domains and compare the two losses' gradients."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from dastc_jax.benchmarks import prototypes  # pylint: disable=g-import-not-at-top

  shared = np.array([10.0, 10.0, 10.0])
  ps = shared + np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  pt = shared + np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  both = np.array([True, True, True])
  fs = ft = np.repeat(shared[None], 4, 0)
  # The first two classes are swapped between the domains: uncentred
  # cosines stay above 0.99, centred ones are 0 (orthogonal) and 1.
  assert np.all(np.sum(prototypes._unit(ps) * prototypes._unit(pt), 1) > 0.99)  # pylint: disable=protected-access
  w = np.eye(3)  # logits = the feature
  ccos, gap = prototypes.class_gaps(ps, pt, fs, ft, both, w)
  np.testing.assert_allclose(ccos, [0.0, 0.0, 1.0], atol=1e-12)
  # Swapped classes are one class distance apart; the third coincides.
  np.testing.assert_allclose(gap, [1.0, 1.0, 0.0], atol=1e-12)
  c = synthetic.get_config('smoke')
  c.model.num_classes = 3
  c.dastc.alignment.min_pixels = 3
  rng = np.random.default_rng(0)
  # Two batches of 4 "images" of 5 pixels; per batch class 2 has 4 pixels
  # in the source but 2 in the target, so only classes 0 and 1 enter.
  ls = np.tile(np.array([0, 0, 1, 1, 2]), 8)
  lt = np.tile(np.array([0, 1, 1, 0, 0]), 8)
  lt[::10] = 2  # a class-2 pixel in every second target image
  img = np.repeat(np.arange(8), 5)
  fs = rng.normal(size=(40, 3))
  ft = rng.normal(size=(40, 3))
  d = prototypes.batch_diagnostics(
      c, (w, np.zeros(3)), fs, ls, img, ft, lt, img
  )
  assert d['classes'] == 2.0
  # The alignment's gradient enters with its weight.
  c.dastc.alignment.weight *= 10
  d10 = prototypes.batch_diagnostics(
      c, (w, np.zeros(3)), fs, ls, img, ft, lt, img
  )
  assert d['grad_ratio'] > 0
  np.testing.assert_allclose(d10['grad_ratio'], 10 * d['grad_ratio'], rtol=1e-4)


_FLOW_SPEED = """
from absl import flags
flags.FLAGS.mark_as_parsed()
from dastc_jax.benchmarks import flow
r = flow.throughput('raft_small', (128, 128), reps=1, iterations=2, batch=2)
assert r['batch'] == 2 and r['size'] == '128x128', r
assert len(r['ours_all']) == len(r['torch_all']) == 1, r
assert r['ours_s'] > 0 and r['torch_s'] > 0, r
md = flow._report([], [r], None, [])
assert '| raft_small | 128x128 | 2 | ' in md, md
assert 'raft_small batch 2 ours' in md, md
print('ok')
"""


@pytest.mark.integration
def test_flow_throughput_per_pair_over_a_batch_and_report():
  """Times are per pair over calls of ``batch`` pairs, for ours and
  torchvision's alike, and the report names the batch. (In a subprocess:
  the flow benchmark's flags share names with the adaptation benchmark's,
  which this module imports.)"""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      PYTHONPATH=repo,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='',
      JAX_DISABLE_MOST_OPTIMIZATIONS='1',
  )
  r = subprocess.run(
      [sys.executable, '-c', _FLOW_SPEED],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-3000:]


def test_step_md_real_size_section_is_rewritten_in_place():
  """benchmarks/memory.py owns step.md's real-size rows: a rerun replaces
  them between the markers, leaves the rest, and step.py keeps them."""
  from dastc_jax.benchmarks import memory  # pylint: disable=g-import-not-at-top

  row = {
      'config': 'viper',
      'variant': 'scan_remat',
      'model': 'accel_deeplabv2',
      'layers': [3, 4, 23, 3],
      'mit_variant': 'b5',
      'sizes': {'batch': 1, 'source': [720, 1280], 'target': [512, 1024]},
      'scan_blocks': True,
      'remat': True,
      'dtype': 'float32',
      'device': 'cpu',
      'compile_s': 52.4,
      'argument_gb': 0.8,
      'output_gb': 0.77,
      'temp_gb': 14.3,
      'peak_gb': 15.2,
      'step_s': [270.2, 263.4],
      'peak_rss_gb': 20.1,
      'commit': 'abc1234',
  }
  compiled_only = dict(row, variant='float32')
  del compiled_only['step_s']
  section = memory.step_section([row, compiled_only])
  assert (
      '| viper | scan_remat: scan, remat, float32 | accel_deeplabv2 R101 |'
      in section
  )
  assert (
      '| 52 | 0.80 | 0.77 | 14.3 | 15.2 | 270, 263 | 20.1 | abc1234 |'
      in section
  )
  assert 'float32: unrolled' not in section and '| float32:' not in section
  text = memory.with_step_section('# Train step\n\nrows\n', section)
  assert text.startswith('# Train step\n\nrows\n') and section in text
  again = memory.with_step_section(
      text, memory.step_section([dict(row, step_s=[1.0])])
  )
  assert again.count(memory.STEP_MD_BEGIN) == 1
  assert '| 1 | 20.1 |' in again and '270, 263' not in again
  assert again.startswith('# Train step\n\nrows\n')


def test_logged_scalars_are_averaged_per_run(tmp_path):
  """``benchmarks.logged`` averages a run's logged scalars (from a step on)
  and tabulates seed means; a tag the run never logged is NaN."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from dastc_jax.benchmarks import logged  # pylint: disable=g-import-not-at-top

  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step, value in ((0, 9.0), (50, 1.0), (100, 3.0)):
      tf.summary.scalar('swap_area_to_t_f0', value, step=step)
  writer.close()
  got = logged.run_means(str(tmp_path), ['swap_area_to_t_f0', 'absent'])
  assert got['swap_area_to_t_f0'] == 2.0  # steps 50 and 100
  assert np.isnan(got['absent'])
  text = logged.table({'dastc': [{'a': 1.0}, {'a': 3.0}]}, ['a'])
  assert '| dastc | 2.000 ± 1.414 (1.000, 3.000) |' in text


def test_half_size_variant_halves_every_crop_and_the_detail_crop():
  from dastc_jax.benchmarks import memory  # pylint: disable=g-import-not-at-top

  full = memory._config('gta5_hrda', 'float32')  # pylint: disable=protected-access
  half = memory._config('gta5_hrda', 'half_size')  # pylint: disable=protected-access
  assert memory._sizes(full)['source'] == (1024, 1024)  # pylint: disable=protected-access
  assert memory._sizes(half) == {  # pylint: disable=protected-access
      'batch': 2,
      'source': (512, 512),
      'target': (512, 512),
  }
  assert tuple(full.model.hrda.detail_crop) == (512, 512)
  assert tuple(half.model.hrda.detail_crop) == (256, 256)
  single = memory._config('gta5_vit', 'half_size')  # pylint: disable=protected-access
  assert memory._sizes(single)['target'] == (256, 256)  # pylint: disable=protected-access


def test_mit_ops_report_sums_blocks_times_depth():
  from dastc_jax.benchmarks import mit_ops  # pylint: disable=g-import-not-at-top

  rows = [
      {
          'stage': 1,
          'depth': 3,
          'tokens': 8,
          'dim': 4,
          'part': 'block',
          'jax_ms': 2.0,
          'torch_ms': 1.0,
          'ratio': 2.0,
      },
      {
          'stage': 1,
          'depth': 3,
          'tokens': 8,
          'dim': 4,
          'part': 'gelu',
          'jax_ms': 9.0,
          'torch_ms': 9.0,
          'ratio': 1.0,
      },
      {
          'stage': 2,
          'depth': 40,
          'tokens': 2,
          'dim': 8,
          'part': 'block',
          'jax_ms': 1.0,
          'torch_ms': 2.0,
          'ratio': 0.5,
      },
  ]
  text = mit_ops.report(rows, 'cmd', 'info')
  # Blocks only: JAX 2*3 + 1*40 = 46 ms, PyTorch 1*3 + 2*40 = 83 ms.
  assert 'JAX 46 ms, PyTorch 83 ms, ratio 0.55' in text
  assert '| 2 (40, 2, 8) | block | 1.00 | 2.00 | 0.50 | 40 | 80 |' in text


def test_head_ops_rows_and_the_heads_remainder():
  from dastc_jax.benchmarks import head_ops  # pylint: disable=g-import-not-at-top

  assert head_ops.parts((1, 6, 12)) == (
      'head',
      'head_forward',
      'aspp_1x1',
      'aspp_sep_d6',
      'aspp_sep_d12',
      'bottleneck',
      'adamw',
  )
  row = lambda part, j, t, note='': {
      'part': part,
      'note': note,
      'jax_ms': j,
      'torch_ms': t,
      'ratio': j / t,
  }
  rows = [
      row('head', 100.0, 60.0),
      row('head_forward', 20.0, 10.0),
      row('aspp_1x1', 10.0, 5.0),
      row('aspp_sep_d6', 20.0, 10.0),
      row('bottleneck', 30.0, 30.0),
      row('adamw', 8.0, 8.0, '85.0M parameters'),
  ]
  text = head_ops.report(rows, 'cmd', 'info')
  assert '| adamw (85.0M parameters) | 8.0 | 8.0 | 1.00 |' in text
  # The head minus aspp_1x1, aspp_sep_d6 and bottleneck: 100 - 60 = 40 ms
  # in JAX, 60 - 45 = 15 ms in PyTorch (head_forward is not a part of it).
  assert 'JAX 40 ms, PyTorch 15 ms.' in text


def test_profile_step_groups_operations_by_their_source():
  from dastc_jax.benchmarks import profile_step  # pylint: disable=g-import-not-at-top

  hlo = (
      '  %fusion.1 = f32[2]{0} fusion(%a), kind=kLoop, metadata={op_name='
      '"jit(run)/transpose(jvp())/while/body/closed_call/dot_general"}\n'
      '  %fusion.2 = f32[2]{0} fusion(%a), metadata={op_name='
      '"jit(run)/jvp()/conv_general_dilated"}\n'
      '  %add.3 = f32[2]{0} add(%a, %b), metadata={op_name="jit(run)/add"}\n'
      '  %copy.4 = f32[2]{0} copy(%a)\n'
  )
  sources = profile_step.op_sources(hlo)
  assert set(sources) == {'fusion.1', 'fusion.2', 'add.3'}
  times = {'fusion.1': 5e8, 'fusion.2': 3e8, 'add.3': 1e8, 'copy.4': 1e8}
  text = profile_step.report({'times': times, 'sources': sources}, 'c', 'i')
  assert '| encoder blocks (scan) | 50.0% |' in text
  assert '| forward/backward outside the blocks | 30.0% |' in text
  assert '| optimizer and metrics | 10.0% |' in text
  assert '| no source | 10.0% |' in text
  assert 'Summed operation time per step (all threads): 1.00 s.' in text


def test_report_only_without_finished_runs_is_an_error(tmp_path):
  """``--report_only`` over seeds with no finished runs says so and leaves
  the report file alone instead of writing a table of NaNs."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top

  output = tmp_path / 'report.md'
  output.write_text('earlier report')
  cache = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  try:
    with flagsaver.flagsaver(
        world='hard',
        workdir=str(tmp_path / 'runs'),
        seeds=['4'],
        variants=['dastc'],
        report_only=True,
        output=str(output),
    ):
      with pytest.raises(app.UsageError, match='hard-video: nothing'):
        adaptation.main([])
  finally:
    jax.config.update('jax_compilation_cache_dir', cache[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', cache[1])
  assert output.read_text() == 'earlier report'
