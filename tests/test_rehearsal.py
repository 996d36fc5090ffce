"""The rehearsal (``benchmarks/rehearsal.py``) at its ``--smoke`` size: every
documented command, from a rendered world in the real layouts through a
stand-in TPS file in the released key layout to training, evaluation and
prediction, exits 0 and leaves its outputs."""

import json
import os

import jax
import pytest

from dastc_jax.benchmarks import rehearsal


@pytest.mark.integration
def test_documented_commands_run_on_the_rehearsal_world(tmp_path, monkeypatch):
  # The children share the suite's compilation cache and settings.
  monkeypatch.setenv(
      'JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir
  )
  monkeypatch.setenv(
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
      str(jax.config.jax_persistent_cache_min_compile_time_secs),
  )
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  monkeypatch.setenv('XLA_FLAGS', '')
  work, out = tmp_path / 'r', tmp_path / 'rehearsal.md'
  rehearsal.main(
      [
          '--config=viper',
          '--smoke',
          '--no_raft',
          f'--workdir={work}',
          f'--output={out}',
      ]
  )
  with open(tmp_path / 'rehearsal.json') as f:
    res = json.load(f)
  names = [s['name'] for s in res['stages']]
  assert names == [
      'prepare_viper',
      'prepare_cityscapes_seq',
      'tps_standin_train',
      'tps_standin_export',
      'convert_tps_init',
      'convert_tps_aspp',
      'train',
      'eval',
      'predict',
  ]
  assert all(s['returncode'] == 0 and s['rss_gb'] > 0.1 for s in res['stages'])
  # The stand-in converted with --head_from_tps has no initialised head.
  with open(work / 'weights' / 'tps_init' / 'conversion.json') as f:
    assert not json.load(f)['missing_initialised']
  # The teacher labelled the first DA-STC step; the run evaluated at the
  # full label size; the eval job and the prediction wrote their outputs.
  # (better than chance over the 15 classes: a trained head, however briefly)
  assert res['pl_accuracy'] and res['pl_accuracy'][0][1] > 1.5 / 15
  assert 'target_val mIoU' in res['results']
  assert (work / 'eval' / 'eval' / 'summary.json').exists()
  assert len(os.listdir(work / 'prediction' / 'labels')) == 3
  text = out.read_text()
  assert '| train |' in text and 'Teacher pseudo-label accuracy' in text


def test_synthia_seq_world_is_prepared_by_the_synthia_builder(tmp_path):
  """The rehearsal's SYNTHIA-Seq render: 16-bit RGB labels with the class id
  in channel 0 and flows under the reference name, read back by the
  SYNTHIA-Seq builder into SYNTHIA12 train ids; the stages prepare that
  folder with the documented command."""
  import argparse  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import io  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import labels  # pylint: disable=g-import-not-at-top
  from dastc_jax.data.datasets import prepare  # pylint: disable=g-import-not-at-top

  params = rehearsal.render(str(tmp_path / 'world'), True, 'synthia_seq')
  seq = tmp_path / 'world' / 'SynthiaSeq' / 'SEQS-04-DAWN'
  raw = io.read_label16_channel0(str(seq / 'label' / '000002.png'))
  assert raw.dtype == np.uint16 and raw.shape == tuple(
      params['synthia_seq_size']
  )
  train_ids = set(np.unique(labels.SYNTHIA_TO_TRAIN[raw])) - {255}
  assert {0, 2, 8} <= train_ids  # road, building, sky
  prepare.prepare(
      'synthia_seq', str(seq), str(tmp_path / 'tfds'), check_counts=False
  )
  ds = tfds.builder('dastc_synthia_seq', data_dir=str(tmp_path / 'tfds'))
  assert ds.info.splits['train'].num_examples == 4  # t = 1..4 with t-1
  a = argparse.Namespace(
      config='synthia_seq', smoke=True, float32=False, steps=2, raft=False
  )
  first = rehearsal.stages(a, str(tmp_path))[0]
  assert first.name == 'prepare_synthia_seq'
  assert f'--manual_dir={tmp_path}/world/SynthiaSeq/SEQS-04-DAWN' in first.argv


def test_transformer_rehearsal_starts_from_an_imagenet_mit_file(tmp_path):
  """The transformer configs' stages: an ImageNet MiT stand-in converted
  with the documented command, the documented train command as configured
  (no memory flags) with the head warm-up shortened to one step; RAFT
  flows only for the video configs; GTA5 rendered at its own size."""
  import argparse  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  a = argparse.Namespace(
      config='gta5_vit', smoke=True, float32=False, steps=2, raft=True
  )
  image = rehearsal.stages(a, str(tmp_path))
  assert [s.name for s in image] == [
      'prepare_gta5',
      'prepare_cityscapes',
      'mit_standin',
      'convert_mit',
      'train',
      'eval',
      'predict',
  ]
  a.config = 'viper_vit'
  video = {s.name: s.argv for s in rehearsal.stages(a, str(tmp_path))}
  assert {'flow_raft', 'mit_standin', 'convert_mit'} <= set(video)
  train = video['train']
  assert f'--config.train.init_from={tmp_path}/weights/mit_b5' in train
  assert '--config.train.source_only_steps=1' in train
  assert '--config.train.num_steps=3' in train
  assert not any('remat' in x or 'scan_blocks' in x for x in train)
  params = rehearsal.render(str(tmp_path / 'world'), True, 'gta5_vit')
  with Image.open(tmp_path / 'world' / 'GTA5' / 'images' / '00001.png') as im:
    assert (
        im.size[::-1]
        == tuple(params['gta5_size'])
        == (rehearsal.SMOKE_SIZES['gta5'])
    )
