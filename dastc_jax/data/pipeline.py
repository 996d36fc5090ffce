"""grain pipelines on prepared TFDS data: the paired train stream, eval sets.

Per host, each domain is a ``tfds.data_source`` (ArrayRecord, random
access) -> ``[process_index::process_count]`` slice -> seeded shuffle (a new
order each epoch) -> infinite repeat -> decode (or, with rare-class
sampling, a seeded draw of class then record from the whole split) ->
resize / random scale and crop / flip (the same on every frame, label and
flow of a clip). The two domains are zipped into one random-access
dataset, batched and turned into one checkpointable iterator, whose state
goes into every checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

from absl import logging
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from dastc_jax import errors
from dastc_jax.data import checked_source
from dastc_jax.data.datasets import builders
from dastc_jax.data.datasets import prepared as prepare
from dastc_jax.data import io
from dastc_jax.data import labels
from dastc_jax.data import rare_class_sampling as rcs_lib
from dastc_jax.data import rare_index as rare_lib
from dastc_jax.data import transforms

# A frame "contains" a long-tail class if it has at least this many pixels.
RARE_MIN_PIXELS = 10


def data_source(
    dcfg: ml_collections.ConfigDict,
    data_dir: str,
    section: str = 'config.data',
    only: tuple[str, ...] | None = None,
    on_error: str = 'fail',
):
  """The prepared split of a domain section, or an error that says how to
  prepare it.

  Args:
    dcfg: a domain section of ``config.data`` (``dataset``, ``split``).
    data_dir: the TFDS data folder.
    section: the config section ``dcfg`` came from, for error messages.
    only: decode only these features (the others stay encoded bytes).
    on_error: what an undecodable record does (``checked_source``).

  Returns:
    ``(spec, source)``: the dataset spec and a random-access data source.
  """
  try:
    spec = builders.get_spec(dcfg.dataset)
  except ValueError as e:
    raise errors.ConfigError(f'{section}.dataset: {e}') from None
  if dcfg.split not in spec.splits:
    raise errors.ConfigError(
        f'{section}.split={dcfg.split!r}: {spec.name} has '
        f'splits {spec.splits}.'
    )
  data_dir = os.path.expanduser(data_dir)
  if not prepare.is_prepared(data_dir, spec, dcfg.split):
    raise io.DataError(
        f'{section}: {spec.name}/{dcfg.split} is not prepared in '
        f'{os.path.abspath(data_dir)}. Prepare it once (--manual_dir is '
        'the dataset folder in its original layout; README, "Datasets"):\n'
        '  ' + prepare.command(spec.name, data_dir, spec.manual_dir)
    )
  decoders = None
  if only is not None:
    frame_keys, flow_keys = builders.split_keys(spec, dcfg.split)
    keys = [*frame_keys, *flow_keys, 'label_t', 'label_t1', 'label']
    decoders = {
        k: tfds.decode.SkipDecoding()
        for k in keys
        if k not in only and k in _feature_keys(spec, dcfg.split)
    }
  ds = tfds.data_source(
      builders.tfds_name(spec, dcfg.split),
      split=dcfg.split,
      data_dir=data_dir,
      decoders=decoders,
  )
  shards = [
      (fi.filename, fi.take)
      for fi in ds.dataset_info.splits[dcfg.split].file_instructions
  ]
  ids, _ = builders.load_stats(data_dir, spec, dcfg.split)
  if len(ids) != len(ds) or any(
      _record_id(ds, i, shards, on_error, ids, f'{section}: {spec.name}')
      != ids[i]
      for i in {0, len(ds) - 1}
  ):
    raise io.DataError(
        f'{section}: the statistics of {spec.name}/{dcfg.split} in '
        f'{data_dir} do not match its records; prepare it again into a new '
        '--data_dir.'
    )
  ids = tfds.data_source(
      builders.tfds_name(spec, dcfg.split),
      split=dcfg.split,
      data_dir=data_dir,
      decoders={
          k: tfds.decode.SkipDecoding() for k in _feature_keys(spec, dcfg.split)
      },
  )
  return spec, checked_source.CheckedSource(
      ds,
      name=f'{spec.name}/{dcfg.split}',
      data_dir=os.path.abspath(data_dir),
      policy=on_error,
      id_source=ids,
      shards=shards,
  )


def _record_id(
    ds,
    index: int,
    shards: list[tuple[str, int]],
    on_error: str,
    ids,
    what: str,
) -> str:
  """The id of record ``index`` for the statistics check. An unreadable
  record is a DataError that names its shard file, or with
  ``on_error='skip'`` a warning (the record is skipped when read)."""
  try:
    return ds[index]['id'].decode()
  except Exception as e:  # pylint: disable=broad-except
    where = checked_source.shard_of(shards, index)
    msg = (
        f'{what} record {index} ({where[2:]}) cannot be read: '
        f'{type(e).__name__}: '
        f'{str(e)[:300]}'
    )
    if on_error == 'skip':
      logging.warning('%s; it will be skipped.', msg)
      return ids[index]
    raise io.DataError(
        msg + '. The prepared data was corrupted or replaced after '
        'preparation: prepare the dataset again into a new --data_dir, or '
        "set config.data.on_error='skip' to skip such records."
    ) from e


def _feature_keys(spec: builders.Spec, split: str) -> set[str]:
  frame_keys, flow_keys = builders.split_keys(spec, split)
  labels_ = (
      ('label_t', 'label_t1')[: len(frame_keys)] if spec.source else ('label',)
  )
  return {*frame_keys, *flow_keys, *labels_}


def decoder(
    spec: builders.Spec, split: str, class_set: str, with_label: bool
) -> transforms.FromPrepared:
  """The transform from prepared records to examples."""
  frame_keys, flow_keys = builders.split_keys(spec, split)
  if spec.label_space not in ('cityscapes_ids', class_set):
    raise errors.ConfigError(
        f'{spec.name} is labelled with the {spec.label_space} classes, but '
        f'config.data.class_set={class_set!r}.'
    )
  return transforms.FromPrepared(
      frame_keys=frame_keys,
      flow_keys=tuple(flow_keys),
      source=spec.source,
      class_set=class_set,
      raw_label_ids=spec.label_space == 'cityscapes_ids',
      with_label=with_label,
  )


def _train_id_histograms(
    spec: builders.Spec, data_dir: str, split: str, class_set: str
) -> np.ndarray:
  """``[N, 256]`` frame-t label pixel counts per record, in the train ids of
  ``class_set`` (from the statistics preparation wrote)."""
  _, hist = builders.load_stats(data_dir, spec, split)
  if spec.label_space == 'cityscapes_ids':
    lut = labels.CITYSCAPES_MAPS[class_set]
    counts = np.zeros((hist.shape[0], 256), np.int64)
    np.add.at(counts, (slice(None), lut), hist)
    hist = counts
  return hist


def source_rare_index(
    spec: builders.Spec, data_dir: str, split: str, class_set: str
) -> rare_lib.RareIndex:
  """The long-tail index of a labelled source split, from its statistics."""
  if not spec.source:
    raise errors.ConfigError(
        f'The fusion pastes need a labelled source; '
        f'{spec.name} is a target dataset.'
    )
  hist = _train_id_histograms(spec, data_dir, split, class_set)
  return rare_lib.from_histograms(
      hist, labels.RARE_CLASSES[class_set], RARE_MIN_PIXELS
  )


def rare_class_table(
    spec: builders.Spec,
    data_dir: str,
    dcfg: ml_collections.ConfigDict,
    class_set: str,
    section: str = 'config.data.source',
) -> rcs_lib.RareClassTable:
  """What rare-class sampling draws from in a labelled split."""
  if not spec.source:
    raise errors.ConfigError(
        f'{section}.rare_class_sampling needs a labelled source; '
        f'{spec.name} is a target dataset.'
    )
  rcs = dcfg.rare_class_sampling
  hist = _train_id_histograms(spec, data_dir, dcfg.split, class_set)
  try:
    return rcs_lib.build_table(
        hist,
        labels.CLASS_SETS[class_set].num_classes,
        rcs.temperature,
        rcs.min_pixels,
        where=f'{spec.name} {dcfg.split}',
    )
  except ValueError as e:
    raise errors.ConfigError(
        f'{section}.rare_class_sampling.min_pixels={rcs.min_pixels}: {e}'
    ) from None


def native_size(
    dcfg: ml_collections.ConfigDict, data_dir: str, section: str = 'config.data'
) -> tuple[int, int]:
  """``(H, W)`` a domain's frames have after resizing (or natively)."""
  if dcfg.image_size:
    return tuple(dcfg.image_size)
  _, ds = data_source(dcfg, data_dir, section)
  return tuple(ds[0]['frame_t'].shape[:2])


def _augment(ds, dcfg: ml_collections.ConfigDict, per_axis_flow_scale: bool):
  rcs = dcfg.rare_class_sampling
  ds = ds.map(
      transforms.Resize(
          image_size=tuple(dcfg.image_size) if dcfg.image_size else None,
          label_size='image',
          per_axis_flow_scale=per_axis_flow_scale,
      )
  )
  margins = tuple(dcfg.get('pseudo_margins') or (0, 0, 0, 0))
  if (
      tuple(dcfg.scale) != (1.0, 1.0)
      or dcfg.crop_size
      or any(margins)
      or rcs.enabled
  ):
    ds = ds.random_map(
        transforms.RandomScaleCrop(
            scale=tuple(dcfg.scale),
            crop_size=tuple(dcfg.crop_size) if dcfg.crop_size else None,
            per_axis_flow_scale=per_axis_flow_scale,
            pseudo_margins=margins,
            cat_max_ratio=float(dcfg.cat_max_ratio),
            # DAFormer checks the crop only when min_crop_ratio > 0.
            rcs_min_pixels=(
                rcs.min_pixels * rcs.min_crop_ratio
                if rcs.enabled and rcs.min_crop_ratio > 0
                else -1.0
            ),
        )
    )
  if dcfg.flip:
    ds = ds.random_map(
        transforms.RandomFlip(p=0.5, negate_dx=dcfg.flip_negate_dx)
    )
  return ds


def domain_dataset(
    dcfg: ml_collections.ConfigDict,
    data_dir: str,
    class_set: str,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    per_axis_flow_scale: bool,
    keep_ids: bool = False,
    section: str = 'config.data',
    with_label: bool = False,
    fusion: dict[str, Any] | None = None,
    on_error: str = 'fail',
) -> grain.MapDataset:
  """One domain's infinite, shuffled, decoded training stream on this host.

  Args:
    dcfg: the domain's section of ``config.data``.
    data_dir: the TFDS data folder.
    class_set: benchmark class set (label maps).
    seed: shuffle/augmentation seed of this domain.
    process_index: this host; it reads records ``process_index::count``.
    process_count: number of hosts.
    per_axis_flow_scale: flow-resize rule.
    keep_ids: keep the string ``id`` (for tests and debugging).
    section: the config section ``dcfg`` came from, for error messages.
    with_label: also decode a target's labels (the oracle).
    fusion: ``{'crop_size', 'num_classes_per_clip'}`` to add crop windows
      and long-tail patches for the fusion (source only).
    on_error: ``config.data.on_error`` (undecodable records).

  Returns:
    A random-access ``MapDataset`` of examples (a new order every epoch).
  """
  spec, source = data_source(dcfg, data_dir, section, on_error=on_error)
  decode = decoder(spec, dcfg.split, class_set, with_label=with_label)
  if dcfg.rare_class_sampling.enabled:
    # Every host draws from the whole split, with its own random stream.
    table = rare_class_table(spec, data_dir, dcfg, class_set, section)
    host_seed = int(
        np.random.SeedSequence([seed, process_index]).generate_state(1)[0]
    )
    ds = grain.MapDataset.range(sys.maxsize).seed(host_seed)
    ds = ds.random_map(rcs_lib.PickRareClass(table))
    ds = ds.map(rcs_lib.FetchPicked(source=source, decode=decode))
  else:
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.seed(seed).shuffle().repeat().map(decode)
  ds = _augment(ds, dcfg, per_axis_flow_scale)
  if fusion is not None:
    # Patches need frame t and its label only: the other features of those
    # records are not decoded.
    _, patch_source = data_source(
        dcfg, data_dir, section, only=('frame_t', 'label_t'), on_error=on_error
    )
    ds = ds.random_map(
        transforms.SampleFusionPatches(
            source=patch_source,
            rare_index=source_rare_index(spec, data_dir, dcfg.split, class_set),
            decode=decode,
            num_classes_per_clip=fusion['num_classes_per_clip'],
            crop_size=tuple(fusion['crop_size']),
            image_size=tuple(dcfg.image_size) if dcfg.image_size else None,
        )
    )
  return ds if keep_ids else ds.map(transforms.DropKeys(('id',)))


def domain_seed(seed: int, name: str) -> int:
  """A per-domain 32-bit seed derived from the experiment seed."""
  return int(
      np.random.SeedSequence([seed, sum(map(ord, name))]).generate_state(1)[0]
  )


def make_train_dataset(
    config: ml_collections.ConfigDict,
    data_dir: str,
    *,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    with_target: bool = True,
) -> grain.IterDataset:
  """The paired, batched source/target training stream of this host.

  Args:
    config: the full experiment config.
    data_dir: folder the dataset paths are relative to.
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
  kw = dict(
      process_index=process_index,
      process_count=process_count,
      per_axis_flow_scale=config.model.per_axis_flow_scale,
      on_error=config.data.on_error,
  )
  fusion = None
  if config.method == 'dastc' and config.dastc.image_fusion:
    fusion = {
        'crop_size': _target_size(config, data_dir),
        'num_classes_per_clip': config.dastc.num_rare_classes,
    }
  src = domain_dataset(
      d.source,
      data_dir,
      d.class_set,
      seed=domain_seed(config.seed, 'source'),
      section='config.data.source',
      fusion=fusion,
      **kw,
  )
  if with_target:
    tgt = domain_dataset(
        d.target,
        data_dir,
        d.class_set,
        seed=domain_seed(config.seed, 'target'),
        section='config.data.target',
        with_label=True,
        **kw,
    )
    paired = grain.experimental.ZipMapDataset([src, tgt]).map(_pair)
    if d.histogram_match:
      paired = paired.map(transforms.HistogramMatch())
  else:
    paired = src.map(_source_only)
  batched = paired.batch(local_batch_size, drop_remainder=True)
  it = batched.to_iter_dataset(
      grain.ReadOptions(
          num_threads=d.num_threads, prefetch_buffer_size=d.prefetch
      )
  )
  if d.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return it


def _target_size(
    config: ml_collections.ConfigDict, data_dir: str
) -> tuple[int, int]:
  """The target training image size (the fusion's crop size)."""
  t = config.data.target
  if t.crop_size:
    return tuple(t.crop_size)
  return native_size(t, data_dir, 'config.data.target')


def _pair(st: tuple[Any, Any]) -> dict[str, Any]:
  return {'source': st[0], 'target': st[1]}


def _source_only(ex: dict[str, Any]) -> dict[str, Any]:
  return {'source': ex}


def make_eval_dataset(
    dcfg: ml_collections.ConfigDict,
    data_dir: str,
    class_set: str,
    per_axis_flow_scale: bool,
    section: str = 'config.data',
) -> grain.MapDataset:
  """Decoded, resized evaluation examples in index order (with ``id``;
  ``dcfg.label_size`` checked by ``runtime/validation.py``)."""
  spec, source = data_source(dcfg, data_dir, section)
  ds = grain.MapDataset.source(source).map(
      decoder(spec, dcfg.split, class_set, True)
  )
  label_size = None if dcfg.label_size == 'native' else 'image'
  ds = ds.map(
      transforms.Resize(
          image_size=tuple(dcfg.image_size) if dcfg.image_size else None,
          label_size=label_size,
          per_axis_flow_scale=per_axis_flow_scale,
      )
  )
  if spec.source:
    # Evaluate frame t's label only.
    ds = ds.map(_viper_eval_label)
  return ds


def _viper_eval_label(ex: dict[str, Any]) -> dict[str, Any]:
  ex = dict(ex)
  ex['label'] = ex.pop('labels')[0]
  return ex


def eval_batches(
    ds: grain.MapDataset,
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    num_threads: int = 4,
) -> Iterator[dict[str, Any]]:
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
  slots = [
      b * global_batch_size + process_index * local + i
      for b in range(num_batches)
      for i in range(local)
  ]

  def fetch(i):
    ex = dict(ds[i if i < n else 0])
    ex['mask'] = np.bool_(i < n)
    ex['index'] = np.int32(i)
    return ex

  it = (
      grain.MapDataset.source(slots)
      .map(fetch)
      .batch(local)
      .to_iter_dataset(
          grain.ReadOptions(
              num_threads=num_threads, prefetch_buffer_size=num_threads
          )
      )
  )
  yield from it
