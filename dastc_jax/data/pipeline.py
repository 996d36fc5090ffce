"""grain pipelines: the paired source/target train stream and eval sets.

Per host, each domain is an index of records -> ``[process_index::
process_count]`` slice -> seeded shuffle (a new order each epoch) ->
infinite repeat -> decode -> resize/flip. The two domains are zipped into one
random-access dataset, batched and turned into one checkpointable iterator,
whose state goes into every checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np

from dastc_jax.data import io
from dastc_jax.data import labels
from dastc_jax.data import layouts
from dastc_jax.data import rare_index as rare_lib
from dastc_jax.data import transforms

# A frame "contains" a long-tail class if it has at least this many pixels.
RARE_MIN_PIXELS = 10

LAYOUTS = ('viper', 'cityscapes_seq')


def _path(data_root: str, p: str) -> str:
  return os.path.join(os.path.expanduser(data_root), os.path.expanduser(p))


def build_index(dcfg: ml_collections.ConfigDict, data_root: str,
                clip: str, section: str = 'config.data'
                ) -> list[layouts.Record]:
  """Lists the records of one dataset split from its on-disk layout.

  Args:
    dcfg: a domain section of ``config.data`` (``layout``, ``root``,
      ``flow_dir``, ``split``).
    data_root: folder that relative ``root``/``flow_dir`` are joined to.
    clip: ``train`` or ``val`` (which frames and flows a sample carries).
    section: the config section ``dcfg`` came from, for error messages.

  Returns:
    The records, sorted by id.
  """
  root, flow_dir = _path(data_root, dcfg.root), _path(data_root,
                                                      dcfg.flow_dir)
  if dcfg.layout == 'viper':
    return layouts.viper_index(root, flow_dir, dcfg.split)
  if dcfg.layout == 'cityscapes_seq':
    return layouts.cityscapes_seq_index(root, flow_dir, dcfg.split, clip)
  raise ValueError(f'Unknown {section}.layout={dcfg.layout!r}; expected one '
                   f'of {LAYOUTS}.')


def decoder(dcfg: ml_collections.ConfigDict, class_set: str,
            with_label: bool) -> grain.transforms.Map:
  """The decode transform of a layout."""
  if dcfg.layout == 'viper':
    return transforms.DecodeViper(remove_ego=dcfg.remove_ego_vehicle)
  return transforms.DecodeCityscapesSeq(class_set=class_set,
                                        with_label=with_label)


def source_rare_index(dcfg: ml_collections.ConfigDict, data_root: str,
                      records: list[layouts.Record],
                      class_set: str) -> rare_lib.RareIndex:
  """The long-tail index of a VIPER-layout split (built once, cached)."""
  if dcfg.layout != 'viper':
    raise ValueError(f'The fusion pastes need a labelled source layout; got '
                     f'{dcfg.layout!r}.')
  decode = decoder(dcfg, class_set, True)
  classes = labels.RARE_CLASSES[class_set]
  path = rare_lib.cache_path(
      os.path.join(os.path.expanduser(data_root), 'rare_index'),
      [r['id'] for r in records], classes, RARE_MIN_PIXELS)
  read = lambda i: decode.label(records[i]['labels'][0],
                                io.image_size(records[i]['frames'][0]))
  return rare_lib.load_or_build(path, len(records), read, classes,
                                RARE_MIN_PIXELS)


def domain_dataset(dcfg: ml_collections.ConfigDict, data_root: str,
                   class_set: str, *, clip: str, seed: int,
                   process_index: int, process_count: int,
                   per_axis_flow_scale: bool, keep_ids: bool = False,
                   section: str = 'config.data', with_label: bool = False,
                   fusion: dict[str, Any] | None = None) -> grain.MapDataset:
  """One domain's infinite, shuffled, decoded training stream on this host.

  Args:
    dcfg: the domain's section of ``config.data``.
    data_root: folder the dataset paths are relative to.
    class_set: benchmark class set (Cityscapes label map).
    clip: ``train`` or ``val`` frames per sample.
    seed: shuffle/augmentation seed of this domain.
    process_index: this host; it reads records ``process_index::count``.
    process_count: number of hosts.
    per_axis_flow_scale: flow-resize rule.
    keep_ids: keep the string ``id`` (for tests and debugging).
    section: the config section ``dcfg`` came from, for error messages.
    with_label: also decode a Cityscapes-Seq target's labels (the oracle).
    fusion: ``{'crop_size', 'num_classes_per_clip'}`` to add crop windows
      and long-tail patches for the fusion (source only).

  Returns:
    A random-access ``MapDataset`` of examples (a new order every epoch).
  """
  index = build_index(dcfg, data_root, clip, section)
  decode = decoder(dcfg, class_set, with_label=with_label)
  ds = grain.MapDataset.source(index)[process_index::process_count]
  ds = ds.seed(seed).shuffle().repeat()
  ds = ds.map(decode)
  ds = ds.map(transforms.Resize(
      image_size=tuple(dcfg.image_size) if dcfg.image_size else None,
      label_size='image', per_axis_flow_scale=per_axis_flow_scale))
  if dcfg.flip:
    ds = ds.random_map(transforms.RandomFlip(p=0.5,
                                             negate_dx=dcfg.flip_negate_dx))
  if fusion is not None:
    ds = ds.random_map(transforms.SampleFusionPatches(
        records=index,
        rare_index=source_rare_index(dcfg, data_root, index, class_set),
        decode=decode, num_classes_per_clip=fusion['num_classes_per_clip'],
        crop_size=tuple(fusion['crop_size']),
        image_size=tuple(dcfg.image_size) if dcfg.image_size else None))
  return ds if keep_ids else ds.map(transforms.DropKeys(('id',)))


def domain_seed(seed: int, name: str) -> int:
  """A per-domain 32-bit seed derived from the experiment seed."""
  return int(np.random.SeedSequence([seed, sum(map(ord, name))]
                                    ).generate_state(1)[0])


def make_train_dataset(config: ml_collections.ConfigDict, data_root: str, *,
                       local_batch_size: int, process_index: int = 0,
                       process_count: int = 1,
                       with_target: bool = True) -> grain.IterDataset:
  """The paired, batched source/target training stream of this host.

  Args:
    config: the full experiment config.
    data_root: folder the dataset paths are relative to.
    local_batch_size: examples per host and step.
    process_index: this host.
    process_count: number of hosts.
    with_target: also load target clips (source-only training does not).
      Their labels are decoded too: the oracle trains on them, DA-STC only
      monitors its pseudo-label accuracy with them.

  Returns:
    An ``IterDataset`` of ``{'source': {...}, 'target': {...}}`` numpy batches
    (leading axis ``local_batch_size``; no ``target`` without_target).
  """
  d = config.data
  kw = dict(process_index=process_index, process_count=process_count,
            per_axis_flow_scale=config.model.per_axis_flow_scale)
  fusion = None
  if config.method == 'dastc' and config.dastc.image_fusion:
    fusion = {'crop_size': _target_size(config, data_root),
              'num_classes_per_clip': config.dastc.num_rare_classes}
  src = domain_dataset(d.source, data_root, d.class_set, clip='train',
                       seed=domain_seed(config.seed, 'source'),
                       section='config.data.source', fusion=fusion, **kw)
  if with_target:
    tgt = domain_dataset(d.target, data_root, d.class_set, clip='train',
                         seed=domain_seed(config.seed, 'target'),
                         section='config.data.target', with_label=True,
                         **kw)
    paired = grain.experimental.ZipMapDataset([src, tgt]).map(_pair)
    if d.histogram_match:
      paired = paired.map(transforms.HistogramMatch())
  else:
    paired = src.map(_source_only)
  batched = paired.batch(local_batch_size, drop_remainder=True)
  it = batched.to_iter_dataset(grain.ReadOptions(
      num_threads=d.num_threads, prefetch_buffer_size=d.prefetch))
  if d.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.num_workers))
  return it


def _target_size(config: ml_collections.ConfigDict,
                 data_root: str) -> tuple[int, int]:
  """The target training image size (the fusion's crop size)."""
  if config.data.target.image_size:
    return tuple(config.data.target.image_size)
  rec = build_index(config.data.target, data_root, 'train',
                    'config.data.target')[0]
  return io.image_size(rec['frames'][0])


def _pair(st: tuple[Any, Any]) -> dict[str, Any]:
  return {'source': st[0], 'target': st[1]}


def _source_only(ex: dict[str, Any]) -> dict[str, Any]:
  return {'source': ex}


def make_eval_dataset(dcfg: ml_collections.ConfigDict, data_root: str,
                      class_set: str, per_axis_flow_scale: bool,
                      section: str = 'config.data') -> grain.MapDataset:
  """Decoded, resized evaluation examples in index order (with ``id``)."""
  if dcfg.label_size not in ('image', 'native'):
    raise ValueError(f"{section}.label_size must be 'image' or 'native', got "
                     f'{dcfg.label_size!r}')
  index = build_index(dcfg, data_root, 'val', section)
  ds = grain.MapDataset.source(index).map(decoder(dcfg, class_set, True))
  label_size = None if dcfg.label_size == 'native' else 'image'
  ds = ds.map(transforms.Resize(
      image_size=tuple(dcfg.image_size) if dcfg.image_size else None,
      label_size=label_size, per_axis_flow_scale=per_axis_flow_scale))
  if dcfg.layout == 'viper':
    # Evaluate frame t's label only.
    ds = ds.map(_viper_eval_label)
  return ds


def _viper_eval_label(ex: dict[str, Any]) -> dict[str, Any]:
  ex = dict(ex)
  ex['label'] = ex.pop('labels')[0]
  return ex


def eval_batches(ds: grain.MapDataset, *, global_batch_size: int,
                 process_index: int, process_count: int,
                 num_threads: int = 4) -> Iterator[dict[str, Any]]:
  """Yields this host's padded eval batches with a ``mask`` (big_vision).

  Every host yields the same number of batches; padded slots repeat example
  0 and have ``mask == False``.

  Args:
    ds: eval examples (random access).
    global_batch_size: examples per step over all hosts.
    process_index: this host.
    process_count: number of hosts.
    num_threads: decode threads.

  Yields:
    Batches with a leading axis of ``global_batch_size // process_count``.
  """
  n = len(ds)
  local = global_batch_size // process_count
  num_batches = -(-n // global_batch_size)
  slots = [b * global_batch_size + process_index * local + i
           for b in range(num_batches) for i in range(local)]

  def fetch(i):
    ex = dict(ds[i if i < n else 0])
    ex['mask'] = np.bool_(i < n)
    ex['index'] = np.int32(i)
    return ex

  it = grain.MapDataset.source(slots).map(fetch).batch(local).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads,
                         prefetch_buffer_size=num_threads))
  yield from it
