"""The flow files of the video datasets, computed with RAFT.

Writes exactly what ``prepare`` reads (docs/optical_flow.md): the reference
file names, the flow t -> s on frame t's grid pointing into frame s (channel
0 = dx), stored as ``np.save(name, np.int16(10 * F))`` at the reference
resolution (:data:`REFERENCE_SIZE`). Which pairs a split needs comes from
the dataset's layout (``data/datasets/layouts.py``): VIPER and SYNTHIA-Seq
t->t-1, Cityscapes-Seq train t->t-1, t->t-2 and t-1->t-2, val t->t-1.

Robustness: finished files are checked and skipped, so a rerun continues an
interrupted one; each file is written to a temporary sibling and renamed;
a folder records its estimator in ``flow_estimator.json`` and flows of two
estimators are never mixed in one folder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import io as io_lib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import numpy as np

from dastc_jax import errors
from dastc_jax import paths
from dastc_jax.data import io
from dastc_jax.data.datasets import builders
from dastc_jax.flow import estimate

# (H, W) at which the reference flows are stored: Cityscapes-Seq at half
# resolution (the network's input grid), VIPER at 0.5333 of 1080x1920,
# SYNTHIA-Seq on the full 760x1280 frame (prepare cuts it like the frame).
REFERENCE_SIZE = {
    'cityscapes_seq': (512, 1024),
    'viper': (576, 1024),
    'synthia_seq': (760, 1280),
}
DATASETS = tuple(sorted(REFERENCE_SIZE))
MARKER = 'flow_estimator.json'


class FlowError(errors.UserError, ValueError):
  """Flows cannot be computed or written as asked."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One flow file: frame t's grid, pointing into frame s."""

  frame_t: str
  frame_s: str
  output: str
  kind: str = 'flow'  # the record's key: flow, flow_t_t2 or flow_t1_t2


def list_jobs(
    dataset: str, manual_dir: str, split: str, flow_dir: str
) -> list[Job]:
  """The flow files ``split`` of ``dataset`` needs, in the layout's order."""
  if dataset not in REFERENCE_SIZE:
    raise FlowError(
        f'--dataset={dataset!r} has no flows; expected one of ' f'{DATASETS}.'
    )
  spec = builders.get_spec(dataset)
  records = builders.index(
      spec, manual_dir, split, flow_dir, require_flows=False
  )
  jobs = {}
  for rec in records:
    frames = rec['frames']
    # Which frames of the record each flow joins (Cityscapes-Seq: t, t-1,
    # t-2; the others: t, t-1).
    which = {'flow': (0, 1), 'flow_t_t2': (0, 2), 'flow_t1_t2': (1, 2)}
    flows = {'flow': rec['flow']} if 'flow' in rec else rec['flows']
    for kind, out in flows.items():
      t, s = which[kind]
      jobs.setdefault(out, Job(frames[t], frames[s], out, kind))
  return list(jobs.values())


def is_done(path: str, hw: Sequence[int]) -> bool:
  """Whether ``path`` is a complete int16 flow of size ``hw``."""
  try:
    arr = np.load(path, mmap_mode='r', allow_pickle=False)
    return arr.dtype == np.int16 and arr.shape == (hw[0], hw[1], 2)
  except (OSError, ValueError, EOFError):  # missing, truncated, empty
    return False


def encode(flow: np.ndarray) -> bytes:
  """``np.save`` bytes of ``int16(10 F)`` (truncated, clipped to int16)."""
  buf = io_lib.BytesIO()
  np.save(buf, np.clip(10.0 * flow, -32768, 32767).astype(np.int16))
  return buf.getvalue()


def claim_folder(flow_dir: str, info: dict[str, Any]) -> None:
  """Records the estimator in ``flow_dir``; refuses a folder of another.

  Raises:
    FlowError: when ``flow_dir`` holds flows of another estimator (another
      ``flow_estimator.json``, or flow files without one: FlowNet2's).
  """
  marker = os.path.join(flow_dir, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      held = json.load(f)
    if held != info:
      diff = {
          k: (held.get(k), info.get(k))
          for k in set(held) | set(info)
          if held.get(k) != info.get(k)
      }
      raise FlowError(
          f'{flow_dir} holds flows of another estimator ({MARKER}: '
          + ', '.join(
              f'{k}={a!r}, now {b!r}' for k, (a, b) in sorted(diff.items())
          )
          + '). Flows of two estimators are never mixed in one folder: choose '
          'another --output_dir, or delete that folder to recompute it.'
      )
    return
  if os.path.isdir(flow_dir) and any(
      n.endswith('_int16_x10.npy') for n in os.listdir(flow_dir)
  ):
    raise FlowError(
        f'{flow_dir} already holds flow files from another estimator (no '
        f'{MARKER}; e.g. the released FlowNet2 flows). Flows of two '
        'estimators are never mixed in one folder: choose another '
        '--output_dir.'
    )
  paths.write_atomic(marker, json.dumps(info, indent=2, sort_keys=True))


def _read_pair(job: Job, hw: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  t, s = io.read_rgb(job.frame_t), io.read_rgb(job.frame_s)
  if t.shape != s.shape:
    raise FlowError(
        f'Frames of one clip differ in size: {job.frame_t} is '
        f'{t.shape[:2]}, {job.frame_s} is {s.shape[:2]}.'
    )
  return estimate.resize_frame(t, hw), estimate.resize_frame(s, hw)


def _write(job: Job, flow: np.ndarray, written: int) -> None:
  try:
    paths.write_atomic(job.output, encode(flow))
  except OSError as e:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    raise FlowError(
        f'Cannot write {job.output}: '
        f'{"the disk is full" if full else e.strerror or e}. The {written} '
        'flows finished in this run are kept (no partial file is left); '
        'rerun the same command to continue.'
    ) from e


def _batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
  for i in range(0, len(jobs), size):
    yield jobs[i : i + size]


def generate(
    jobs: list[Job],
    flows_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    hw: Sequence[int],
    batch_size: int,
    threads: int = 4,
    report_every_s: float = 30.0,
) -> dict[str, Any]:
  """Computes and writes the ``jobs`` not finished yet.

  Args:
    jobs: what to write (:func:`list_jobs`), already split between hosts.
    flows_fn: ``(frames_t, frames_s) [B, H, W, 3] uint8 -> [B, H, W, 2]``.
    hw: the size to estimate and store at (multiples of 8).
    batch_size: pairs per call of ``flows_fn``.
    threads: frame decoding threads (the next batch is read while the
      current one is estimated).
    report_every_s: seconds between progress lines.

  Returns:
    ``{'total', 'skipped', 'written', 'seconds', 'pairs_per_s'}``.
  """
  todo = [j for j in jobs if not is_done(j.output, hw)]
  skipped = len(jobs) - len(todo)
  if skipped:
    logging.info(
        '%d of %d flows are already there; computing %d.',
        skipped,
        len(jobs),
        len(todo),
    )
  for d in sorted({os.path.dirname(j.output) for j in todo}):
    os.makedirs(d, exist_ok=True)
  written, start, last = 0, time.time(), time.time()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    read = lambda batch: [pool.submit(_read_pair, j, hw) for j in batch]
    batches = list(_batches(todo, batch_size))
    pending = read(batches[0]) if batches else []
    for i, batch in enumerate(batches):
      pairs = [f.result() for f in pending]
      pending = read(batches[i + 1]) if i + 1 < len(batches) else []
      flows = flows_fn(
          np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
      )
      for job, flow in zip(batch, flows):
        _write(job, flow, written)
        written += 1
      now = time.time()
      if now - last >= report_every_s or written == len(todo):
        rate = written / max(now - start, 1e-9)
        eta = (len(todo) - written) / max(rate, 1e-9)
        logging.info(
            'flows %d/%d (%.2f pairs/s, %.0f s left)',
            skipped + written,
            len(jobs),
            rate,
            eta,
        )
        last = now
  seconds = time.time() - start
  return {
      'total': len(jobs),
      'skipped': skipped,
      'written': written,
      'seconds': round(seconds, 2),
      'pairs_per_s': round(written / seconds, 3) if written else None,
  }


def estimator_info(estimator: Any, hw: Sequence[int]) -> dict[str, Any]:
  """What ``flow_estimator.json`` records (equal info = same estimator)."""
  return {
      **estimator.info(),
      'size': list(hw),
      'format': 'int16(10 F), t -> s on frame t grid, channel 0 = dx',
  }


def default_splits_and_dirs(
    dataset: str,
    manual_dir: str,
    splits: Sequence[str] | None,
    given: dict[str, str | None],
) -> tuple[list[str], dict[str, str]]:
  """The splits to compute (default: those whose frames are present) and
  their output folders (default: where ``prepare`` looks)."""
  from dastc_jax.data.datasets import prepare  # pylint: disable=g-import-not-at-top

  if dataset not in REFERENCE_SIZE:
    raise FlowError(
        f'--dataset={dataset!r} has no flows; expected one of ' f'{DATASETS}.'
    )
  spec = builders.get_spec(dataset)
  if not os.path.isdir(manual_dir):
    raise FlowError(f'--manual_dir={manual_dir} is not a folder.')
  if splits:
    bad = [s for s in splits if s not in spec.splits]
    if bad:
      raise FlowError(
          f'{dataset} has no split {bad[0]!r}; expected one of '
          f'{spec.splits}.'
      )
  else:
    frames = {
        'viper': '{split}/img',
        'cityscapes_seq': 'leftImg8bit_sequence/{split}',
    }.get(dataset)
    splits = [
        s
        for s in spec.splits
        if frames is None
        or s == 'train'
        or os.path.isdir(os.path.join(manual_dir, frames.format(split=s)))
    ]
  dirs = {
      s: os.path.abspath(
          given.get(s) or prepare.default_flow_dir(spec, manual_dir, s)
      )
      for s in splits
  }
  return list(splits), dirs


def run(
    dataset: str,
    manual_dir: str,
    splits: Sequence[str],
    flow_dirs: dict[str, str],
    estimator: Any,
    *,
    hw: Sequence[int] | None = None,
    batch_size: int = 0,
    host: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
  """Writes the flows of ``splits`` into ``flow_dirs[split]``.

  Args:
    dataset: ``viper``, ``synthia_seq`` or ``cityscapes_seq``.
    manual_dir: the dataset folder in its original layout.
    splits: the splits to compute.
    flow_dirs: output folder per split.
    estimator: ``estimate.RaftEstimator`` or ``dis.DisFlow`` (anything with
      ``flows``, ``info``, ``name`` and ``devices``).
    hw: storage size (default: the reference size of ``dataset``).
    batch_size: pairs per step (default: 2 per local device).
    host: ``(index, count)``: this host computes every count-th file.

  Returns:
    Per split, the counts and rate of :func:`generate`.
  """
  hw = tuple(hw or REFERENCE_SIZE[dataset])
  if hw[0] % 8 or hw[1] % 8:
    raise FlowError(f'--size={hw[0]},{hw[1]}: RAFT needs multiples of 8.')
  batch_size = batch_size or 2 * len(estimator.devices)
  info = estimator_info(estimator, hw)
  out = {}
  for split in splits:
    flow_dir = flow_dirs[split]
    jobs = list_jobs(dataset, manual_dir, split, flow_dir)
    if jobs:
      fh, fw = io.image_size(jobs[0].frame_t)
      if abs(hw[0] / hw[1] - fh / fw) > 0.01 * fh / fw:
        raise FlowError(
            f'--size={hw[0]},{hw[1]} has another aspect ratio than the frames '
            f'({fh}x{fw}, e.g. {jobs[0].frame_t}); flows must be a scaled '
            "copy of the frame's grid (SYNTHIA-Seq: of the full 760x1280 "
            'frame).'
        )
    claim_folder(flow_dir, info)
    mine = jobs[host[0] :: host[1]]
    logging.info(
        '%s %s: %d flows (%d on this host) -> %s with %s at %dx%d',
        dataset,
        split,
        len(jobs),
        len(mine),
        flow_dir,
        estimator.name,
        hw[0],
        hw[1],
    )
    out[split] = {
        'flow_dir': flow_dir,
        **generate(mine, estimator.flows, hw=hw, batch_size=batch_size),
    }
  return out
