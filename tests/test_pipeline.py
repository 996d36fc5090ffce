"""The paired grain stream: shapes, determinism, checkpointing, host shards."""

import chex
import jax
import numpy as np

from dastc_jax.data import pipeline
from dastc_jax.runtime import checkpointing


def _leaves_equal(a, b):
  try:
    chex.assert_trees_all_equal(a, b)
  except AssertionError:
    return False
  return True


def _train_iter(config, root, **kw):
  return iter(
      pipeline.make_train_dataset(config, root, local_batch_size=4, **kw)
  )


def test_paired_batches_shapes_and_dtypes(smoke_config, tiny_data):
  c = smoke_config
  c.data.source.image_size = (36, 64)  # exercise resize + flow rescaling
  batch = next(_train_iter(c, tiny_data))
  src, tgt = batch['source'], batch['target']
  assert src['frames'].shape == (4, 2, 36, 64, 3)
  assert src['frames'].dtype == np.uint8
  assert src['labels'].shape == (4, 2, 36, 64)
  assert src['flow'].shape == (4, 36, 64, 2)
  assert src['flow'].dtype == np.float32
  h, w = c.data.target.image_size
  assert tgt['frames'].shape == (4, 3, h, w, 3)
  for k in ('flow', 'flow_t_t2', 'flow_t1_t2'):
    assert tgt[k].shape == (4, h, w, 2)
  assert tgt['label'].shape == (4, h, w)  # monitoring / the oracle
  assert set(np.unique(src['labels'])) <= set(range(15)) | {255}
  # Fusion inputs: a crop window of the target size inside the source
  # frame, and long-tail patches cropped to it.
  assert src['crop'].shape == (4, 2)
  assert np.all(src['crop'][:, 0] <= 36 - h) and np.all(
      src['crop'][:, 1] <= 64 - w
  )
  k = c.dastc.num_rare_classes
  assert src['rare_frames'].shape == (4, k, h, w, 3)
  assert src['rare_labels'].shape == (4, k, h, w)
  assert (src['rare_classes'] >= 0).any()  # some patch was found
  for b in range(4):
    for j in range(k):
      cls = src['rare_classes'][b, j]
      if cls >= 0:  # the patch really holds its class inside the window
        assert np.count_nonzero(src['rare_labels'][b, j] == cls) > 5
  no_target = next(_train_iter(c, tiny_data, with_target=False))
  assert set(no_target) == {'source'}


def test_stream_is_deterministic_and_resumes_exactly(smoke_config, tiny_data):
  it = _train_iter(smoke_config, tiny_data)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  again = _train_iter(smoke_config, tiny_data)
  assert all(_leaves_equal(a, next(again)) for a in first)
  resumed = _train_iter(smoke_config, tiny_data)
  resumed.set_state(state)
  assert all(_leaves_equal(e, next(resumed)) for e in expected)
  smoke_config.seed += 1
  other = _train_iter(smoke_config, tiny_data)
  assert not _leaves_equal(first[0], next(other))


def test_hosts_read_disjoint_halves_and_epochs_reshuffle(
    smoke_config, tiny_data
):
  c = smoke_config
  kw = dict(seed=7, per_axis_flow_scale=False, keep_ids=True)
  n = len(pipeline.data_source(c.data.source, tiny_data)[1])
  ids = []
  for p in range(2):
    ds = pipeline.domain_dataset(
        c.data.source,
        tiny_data,
        'viper15',
        process_index=p,
        process_count=2,
        **kw,
    )
    ids.append([ds[i]['id'] for i in range(n // 2)])
  assert not set(ids[0]) & set(ids[1])
  assert len(set(ids[0]) | set(ids[1])) == 2 * (n // 2)
  ds = pipeline.domain_dataset(
      c.data.source,
      tiny_data,
      'viper15',
      process_index=0,
      process_count=1,
      **kw,
  )
  epoch0 = [ds[i]['id'] for i in range(n)]
  epoch1 = [ds[n + i]['id'] for i in range(n)]
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_paired_stream_round_trips_through_a_checkpoint(
    smoke_config, tiny_data, tmp_path
):
  it = _train_iter(smoke_config, tiny_data)
  for _ in range(2):
    next(it)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  state = {'w': np.arange(3.0)}
  ckpt.save(2, state, it)
  ckpt.wait()
  expected = next(it)
  fresh = _train_iter(smoke_config, tiny_data)
  restored = ckpt.restore(
      2,
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
      fresh,
  )
  ckpt.close()
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert _leaves_equal(expected, next(fresh))
  assert set(expected) == {'source', 'target'}


def test_multiprocess_workers_yield_the_same_stream(smoke_config, tiny_data):
  ref = _train_iter(smoke_config, tiny_data)
  expected = [next(ref) for _ in range(2)]
  smoke_config.data.num_workers = 2
  it = _train_iter(smoke_config, tiny_data)
  got = [next(it) for _ in range(2)]
  it.close()
  assert all(_leaves_equal(a, b) for a, b in zip(expected, got))


def test_eval_batches_pad_with_a_mask(smoke_config, tiny_data):
  c = smoke_config
  ds = pipeline.make_eval_dataset(
      c.data.target_val, tiny_data, 'viper15', False
  )
  n = len(ds)
  batches = list(
      pipeline.eval_batches(
          ds, global_batch_size=3, process_index=0, process_count=1
      )
  )
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == n and len(masks) == 3 * -(-n // 3)
  ids = [i for b in batches for i, m in zip(b['id'], b['mask']) if m]
  assert len(set(ids)) == n
  # Native-size labels (the real protocol: 1024x2048 for Cityscapes).
  assert batches[0]['label'].shape[1:] == tuple(c.data.synthetic.target_size)


def test_stored_at_train_size_reads_like_resizing_on_read(
    smoke_config, tiny_world, tmp_path
):
  """``prepare --train_size``: frames and labels equal what the pipeline's
  resize gives from the native copy; flows to the int16 0.1 px step; a
  second storage size in the same data_dir is refused."""
  import os  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import io as io_lib  # pylint: disable=g-import-not-at-top
  from dastc_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from dastc_jax.data.datasets import prepare  # pylint: disable=g-import-not-at-top

  manual = os.path.join(tiny_world, 'Viper')
  flows = {
      'train': os.path.join(tiny_world, 'estimated_optical_flow_viper_train')
  }
  native, small = str(tmp_path / 'native'), str(tmp_path / 'small')
  for root, size in ((native, None), (small, (36, 64))):
    prepare.prepare(
        'viper',
        manual,
        root,
        flow_dirs=flows,
        splits=['train'],
        check_counts=False,
        train_size=size,
    )
  c = smoke_config

  def read(root):
    spec, source = pipeline.data_source(c.data.source, root)
    decode = pipeline.decoder(spec, 'train', c.data.class_set, True)
    return [decode.map(source[i]) for i in range(len(source))]

  resize = transforms.Resize(image_size=(36, 64))
  pairs = list(zip(read(native), read(small)))
  assert len(pairs) == 6
  for a, b in pairs:
    a = resize.map(a)
    np.testing.assert_array_equal(a['frames'], b['frames'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_allclose(a['flow'], b['flow'], rtol=0, atol=0.051)
    assert b['frames'].shape[1:3] == (36, 64)
  with pytest.raises(io_lib.DataError, match=r'stored at \[36, 64\]'):
    prepare.prepare(
        'viper',
        manual,
        small,
        flow_dirs=flows,
        splits=['train'],
        check_counts=False,
    )
  with pytest.raises(io_lib.DataError, match='another aspect ratio'):
    prepare.prepare(
        'viper',
        manual,
        str(tmp_path / 'bad'),
        flow_dirs=flows,
        splits=['train'],
        check_counts=False,
        train_size=(36, 36),
    )
