r"""Prepares a dataset from its original layout into TFDS ArrayRecord files.

Usage::

  python -m dastc_jax.prepare --dataset=viper \
      --manual_dir=data/Viper --data_dir=data/tfds

Flows are looked up next to ``manual_dir`` under the reference folder names
(``data/estimated_optical_flow_viper_train`` ...) unless
``--train_flow_dir`` / ``--val_flow_dir`` say otherwise.

The command is idempotent and resumable:

* a prepared split is never rewritten (TFDS writes into an ``incomplete.*``
  folder and renames it when complete; a rerun finds the complete folder);
* the expensive per-sample work (full decodes, label maps, checks) is cached
  under ``{data_dir}/{name}/.prepare_cache`` as it goes, so a rerun after an
  interruption (even a SIGKILL) only redoes the samples that were not
  finished, then removes the cache;
* leftovers of a killed run (``incomplete.*``) are removed under a lock, so
  two preparations of one dataset never run at once.

It also writes each split's per-sample label histograms (``stats/``), from
which the pipeline derives the rare-class index of the fusion pastes.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from dastc_jax import paths
from dastc_jax.data.datasets import builders
from dastc_jax.data.datasets import layouts
from dastc_jax.data.datasets import prepared
from dastc_jax.data import io

VERSION = prepared.VERSION
prepared_dir = prepared.prepared_dir
is_prepared = prepared.is_prepared
command = prepared.command


def default_flow_dir(
    spec: builders.Spec, manual_dir: str, split: str
) -> str | None:
  """The reference location: ``data/estimated_optical_flow_*`` beside the
  dataset folder (SYNTHIA-Seq sits one level deeper, in SynthiaSeq/)."""
  if split not in spec.flow_dirs:
    return None
  parent = os.path.dirname(os.path.abspath(manual_dir))
  candidates = [
      os.path.join(parent, spec.flow_dirs[split]),
      os.path.join(os.path.dirname(parent), spec.flow_dirs[split]),
  ]
  for c in candidates:
    if os.path.isdir(c):
      return c
  return candidates[0]


def stored_size_path(data_dir: str, spec: builders.Spec, split: str) -> str:
  """Records the size the split's frames were stored at (or 'native')."""
  return os.path.join(
      data_dir, spec.tfds_name, 'stats', f'{split}_stored_size.json'
  )


def _check_stored_size(
    data_dir: str, spec: builders.Spec, split: str, size: tuple[int, int] | None
) -> None:
  """Refuses to mix storage sizes: a split prepared (or half-prepared) at
  one size is never continued at another."""
  path = stored_size_path(data_dir, spec, split)
  want = list(size) if size else 'native'
  if os.path.exists(path):
    with open(path) as f:
      held = json.load(f)['frames']
  elif os.path.exists(
      os.path.join(prepared_dir(data_dir, spec, split), 'dataset_info.json')
  ):
    held = 'native'  # written before sizes were recorded
  else:
    # Nothing written yet: record the size first, so that an interrupted
    # run is never continued at another size.
    paths.write_atomic(path, json.dumps({'frames': want}))
    return
  if held != want:
    raise io.DataError(
        f'{spec.name} {split} in {data_dir} is stored at {held} frames; '
        f'asked for {want}. Prepare each storage size into its own '
        '--data_dir.'
    )


def _input_paths(rec: dict[str, Any]) -> list[str]:
  paths = list(rec['frames'])
  paths += rec.get('labels', [])
  if 'label' in rec:
    paths.append(rec['label'])
  return paths


def _stamp(rec: dict[str, Any], size: tuple[int, int] | None) -> str:
  out = []
  for p in _input_paths(rec):
    st = os.stat(p)
    out.append([p, st.st_size, st.st_mtime_ns])
  return json.dumps({'files': out, 'size': size})


class _SampleCache:
  """Per-sample results of ``builders.encode``, keyed by the input files."""

  def __init__(
      self,
      directory: str,
      spec: builders.Spec,
      sizes: dict[str, tuple[int, int]],
  ):
    self.directory = directory
    self.spec = spec
    self.sizes = sizes  # split -> stored frame size (absent: native)
    self.hits = 0
    self.misses = 0

  def _path(self, split: str, rec: dict[str, Any]) -> str:
    return os.path.join(self.directory, split, f'{rec["id"]}.npz')

  def get(
      self, split: str, rec: dict[str, Any]
  ) -> tuple[dict[str, bytes], np.ndarray]:
    """The cached encode of ``rec`` if its files are unchanged, else new."""
    path = self._path(split, rec)
    size = self.sizes.get(split)
    stamp = _stamp(rec, size)
    if os.path.exists(path):
      try:
        with np.load(path, allow_pickle=False) as z:
          if str(z['stamp']) == stamp:
            cached = {
                k[4:]: z[k].tobytes() for k in z.files if k.startswith('png_')
            }
            self.hits += 1
            return cached, z['hist']
      except Exception:  # pylint: disable=broad-except
        # A cache entry cut short by a kill: redo the sample.
        logging.info('Unreadable cache entry %s; redoing the sample.', path)
    cached, hist = builders.encode(self.spec, rec)
    if size is not None:
      cached = builders.resize_encoded(self.spec, split, rec, cached, size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}.npz'
    np.savez(
        tmp,
        stamp=np.array(stamp),
        hist=hist,
        **{f'png_{k}': np.frombuffer(v, np.uint8) for k, v in cached.items()},
    )
    os.replace(tmp, path)
    self.misses += 1
    return cached, hist


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise RuntimeError(
          f'Another preparation holds {path}; wait for it to ' 'finish.'
      ) from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _splits_to_prepare(
    spec: builders.Spec,
    manual_dir: str,
    flow_dirs: dict[str, str | None],
    splits: Sequence[str] | None,
) -> list[str]:
  if splits:
    bad = [s for s in splits if s not in spec.splits]
    if bad:
      raise ValueError(
          f'{spec.name} has no split {bad[0]!r}; expected ' f'{spec.splits}.'
      )
    return list(splits)
  out = []
  for split in spec.splits:
    if (
        spec.name == 'viper'
        and split == 'val'
        and not (
            os.path.isdir(os.path.join(manual_dir, 'val', 'img'))
            and flow_dirs.get('val')
            and os.path.isdir(flow_dirs['val'])
        )
    ):
      logging.info(
          'VIPER val (frames or flows) not found; preparing train ' 'only.'
      )
      continue
    out.append(split)
  return out


def prepare(
    dataset: str,
    manual_dir: str,
    data_dir: str,
    *,
    flow_dirs: dict[str, str] | None = None,
    splits: Sequence[str] | None = None,
    check_counts: bool = True,
    train_size: tuple[int, int] | None = None,
) -> dict[str, int]:
  """Prepares ``dataset`` (idempotent, resumable); see the module doc.

  Args:
    dataset: a name in ``builders.SPECS``.
    manual_dir: the dataset folder in its original layout.
    data_dir: the TFDS data folder to write into.
    flow_dirs: flow folder per split (default: the reference locations).
    splits: splits to prepare (default: all present).
    check_counts: compare full copies with the official sample counts
      (off for the synthetic world).
    train_size: store the train split's frames, labels and flows at this
      ``(H, W)`` (the training resolution; same aspect ratio as the frames)
      instead of natively, so that reading skips the full-size decode and
      the resize. Evaluation splits stay native.

  Returns:
    ``{split: number of samples}``.

  Raises:
    io.DataError: a file is missing, corrupt or not what the layout needs.
  """
  spec = builders.get_spec(dataset)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(manual_dir):
    raise io.DataError(f'--manual_dir={manual_dir} is not a folder.')
  dirs = {s: default_flow_dir(spec, manual_dir, s) for s in spec.splits}
  dirs.update(
      {
          k: os.path.abspath(os.path.expanduser(v))
          for k, v in (flow_dirs or {}).items()
          if v
      }
  )
  todo = _splits_to_prepare(spec, manual_dir, dirs, splits)
  base = os.path.join(data_dir, spec.tfds_name)
  counts = {}
  with _lock(os.path.join(base, '.prepare.lock')):
    for stale in glob.glob(
        os.path.join(base, '**', 'incomplete.*'), recursive=True
    ):
      logging.info('Removing the leftovers of an interrupted run: %s', stale)
      shutil.rmtree(stale, ignore_errors=True)
    sizes = {'train': tuple(train_size)} if train_size else {}
    cache = _SampleCache(os.path.join(base, '.prepare_cache'), spec, sizes)
    # Cityscapes-Seq has one builder config per split (their clips differ);
    # the other datasets write all their splits in one version folder.
    groups = [[s] for s in todo] if spec.name == 'cityscapes_seq' else [todo]
    for group in groups:
      counts.update(
          _prepare_splits(
              spec, group, manual_dir, data_dir, dirs, cache, check_counts
          )
      )
    shutil.rmtree(cache.directory, ignore_errors=True)
  return counts


def _prepare_splits(
    spec: builders.Spec,
    splits: list[str],
    manual_dir: str,
    data_dir: str,
    flow_dirs: dict[str, str | None],
    cache: _SampleCache,
    check_counts: bool = True,
) -> dict[str, int]:
  """Writes one TFDS version folder holding ``splits`` and their stats."""
  for split in splits:
    _check_stored_size(data_dir, spec, split, cache.sizes.get(split))
  if all(is_prepared(data_dir, spec, s) for s in splits):
    counts = {s: len(builders.load_stats(data_dir, spec, s)[0]) for s in splits}
    logging.info(
        '%s %s already prepared in %s: %s', spec.name, splits, data_dir, counts
    )
    return counts
  records = {}
  for split in splits:
    records[split] = builders.index(
        spec, manual_dir, split, flow_dirs.get(split)
    )
    if cache.sizes.get(split) and records[split]:
      builders.check_stored_size(spec, records[split][0], cache.sizes[split])
    if check_counts:
      layouts.check_count(spec.name, split, manual_dir, records[split])
  hists = {s: {} for s in splits}

  def example(split: str, rec: dict[str, Any]) -> builders.Example:
    cached, hist = cache.get(split, rec)
    hists[split][rec['id']] = hist
    return {
        **builders.cheap_features(
            spec, split, rec, cached, cache.sizes.get(split)
        ),
        **{k: v for k, v in cached.items() if k.startswith('label')},
    }

  cls = builders.BUILDERS[spec.name]
  kw = {'config': splits[0]} if spec.name == 'cityscapes_seq' else {}
  builder = cls(data_dir=data_dir, records=records, example_fn=example, **kw)
  folder = prepared_dir(data_dir, spec, splits[0])
  if not os.path.exists(os.path.join(folder, 'dataset_info.json')):
    logging.info(
        'Preparing %s %s from %s: %s samples',
        spec.name,
        splits,
        manual_dir,
        {s: len(r) for s, r in records.items()},
    )
    hits0 = cache.hits
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
        file_format='array_record',
    )
    if cache.hits > hits0:
      logging.info(
          'Resumed: %d samples came from the cache of an ' 'interrupted run.',
          cache.hits - hits0,
      )
  else:
    with open(os.path.join(folder, 'dataset_info.json')) as f:
      written = {x['name'] for x in json.load(f).get('splits', [])}
    if set(splits) - written:
      raise io.DataError(
          f'{folder} was prepared without the split(s) '
          f'{sorted(set(splits) - written)}. A prepared version folder is '
          'never rewritten: prepare into another --data_dir, or delete '
          f'{folder} and prepare again.'
      )
  counts = {}
  for split in splits:
    for rec in records[split]:
      if rec['id'] not in hists[split]:  # prepared, stats missing (killed)
        hists[split][rec['id']] = cache.get(split, rec)[1]
    ids = [r['id'] for r in records[split]]
    path = builders.stats_path(data_dir, spec, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}.npz'
    np.savez(
        tmp,
        ids=np.array(ids),
        histogram=np.stack([hists[split][i] for i in ids]),
    )
    os.replace(tmp, path)
    counts[split] = len(ids)
  logging.info('%s ready in %s: %s', spec.name, folder, counts)
  return counts
