"""Evaluation on a val split: global confusion matrix, IoU tables, overlays."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from dastc_jax import paths
from dastc_jax.data import labels as labels_lib
from dastc_jax.data import pipeline
from dastc_jax.evaluation import metrics as metrics_lib
from dastc_jax.evaluation import visualize
from dastc_jax.runtime import sharding as sharding_lib


@dataclasses.dataclass
class SplitResult:
  """Scores of one evaluated split."""

  name: str
  confusion: np.ndarray
  num_images: int
  class_set: labels_lib.ClassSet

  @property
  def iou(self) -> np.ndarray:
    return metrics_lib.iou_per_class(self.confusion)

  @property
  def miou(self) -> float:
    return metrics_lib.mean_iou(self.confusion, self.class_set.scored)

  def extra(self) -> dict[str, float]:
    """The class set's second mean (e.g. SYNTHIA's mIoU13), if any."""
    if self.class_set.also_report is None:
      return {}
    name, drop = self.class_set.also_report
    keep = [i for i in self.class_set.scored if i not in drop]
    return {name: metrics_lib.mean_iou(self.confusion, keep)}

  def to_json(self) -> dict[str, Any]:
    iou = self.iou
    return {
        'miou': _pct(self.miou),
        **{k: _pct(v) for k, v in self.extra().items()},
        'iou': {
            c: _pct(iou[i])
            for i, c in enumerate(self.class_set.classes)
            if i in self.class_set.scored
        },
        'pixel_accuracy': _pct(metrics_lib.pixel_accuracy(self.confusion)),
        'num_images': self.num_images,
        'scored_classes': len(self.class_set.scored),
    }


def _pct(x: float) -> float | None:
  return None if np.isnan(x) else round(100.0 * float(x), 2)


def evaluate_splits(
    config: ml_collections.ConfigDict,
    data_root: str,
    eval_step: Callable[..., Any],
    params: Any,
    batch_stats: Any,
    data_sharding: jax.NamedSharding,
    out_dir: str,
    step: int,
    num_overlays: int,
) -> list[SplitResult]:
  """Evaluates every split of ``config.eval.splits``; writes the tables.

  The eval batch is rounded up to a multiple of the device count (padded
  slots are masked), so ``config.eval.batch_size`` never has to follow the
  mesh.

  Returns:
    One result per split (empty if ``config.eval.splits`` is empty).
  """
  cs = labels_lib.get_class_set(config.data.class_set)
  n_dev = data_sharding.mesh.devices.size
  global_bs = -(-config.eval.batch_size // n_dev) * n_dev
  results = []
  for split in config.eval.splits:
    ds = pipeline.make_eval_dataset(
        config.data[split],
        data_root,
        cs.name,
        config.model.per_axis_flow_scale,
        section=f'config.data.{split}',
    )
    results.append(
        evaluate_split(
            split,
            eval_step,
            params,
            batch_stats,
            ds,
            class_set=cs,
            global_batch_size=global_bs,
            data_sharding=data_sharding,
            num_overlays=num_overlays,
            overlay_dir=paths.resolve(out_dir) / 'overlays' / split,
        )
    )
  if results and jax.process_index() == 0:
    table = write_results(out_dir, results, step)
    print(
        f'\nPer-class IoU (%) at step {step} ({cs.name}):\n{table}\n',
        flush=True,
    )
  return results


def evaluate_split(
    name: str,
    eval_step: Callable[..., Any],
    params: Any,
    batch_stats: Any,
    ds: Any,
    *,
    class_set: labels_lib.ClassSet,
    global_batch_size: int,
    data_sharding: jax.NamedSharding,
    num_overlays: int = 0,
    overlay_dir: str | None = None,
) -> SplitResult:
  """Runs ``eval_step`` over every example of ``ds``.

  Args:
    name: split name for logs and files.
    eval_step: jitted ``(params, batch_stats, batch) -> (confusion, pred)``.
    params: model parameters.
    batch_stats: BatchNorm running averages.
    ds: eval examples (random access, with ``id``).
    class_set: the benchmark's classes.
    global_batch_size: examples per step over all hosts.
    data_sharding: sharding of the batch axis.
    num_overlays: how many overlay PNGs to write (process 0).
    overlay_dir: where to write them.

  Returns:
    The split's scores.
  """
  total = np.zeros((class_set.num_classes,) * 2, np.int64)
  written = 0
  for batch in pipeline.eval_batches(
      ds,
      global_batch_size=global_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  ):
    host = {
        k: batch[k] for k in ('frames', 'flow', 'label', 'mask') if k in batch
    }  # no flow in the image domain
    cm, pred = eval_step(
        params, batch_stats, sharding_lib.shard_batch(host, data_sharding)
    )
    total += sharding_lib.to_host(cm).astype(np.int64)
    if overlay_dir and written < num_overlays and jax.process_index() == 0:
      pred = sharding_lib.local_rows(pred)
      for i in range(len(pred)):
        if written >= num_overlays or not batch['mask'][i]:
          continue
        panel = visualize.overlay_panel(
            batch['frames'][i, 0],
            batch['label'][i],
            pred[i],
            class_set.palette(),
        )
        visualize.save_png(
            paths.resolve(overlay_dir) / f'{batch["id"][i]}.png', panel
        )
        written += 1
  result = SplitResult(name, total, len(ds), class_set)
  logging.info('%s: mIoU %.2f over %d images', name, 100 * result.miou, len(ds))
  return result


def format_table(results: Sequence[SplitResult]) -> str:
  """Markdown table: one row per class, one column per split, then mIoU."""
  cs = results[0].class_set
  head = '| class | ' + ' | '.join(r.name for r in results) + ' |'
  sep = '|---|' + '---:|' * len(results)
  rows = [head, sep]
  for i in cs.scored:
    vals = [r.iou[i] for r in results]
    rows.append(
        f'| {cs.classes[i]} | '
        + ' | '.join('-' if np.isnan(v) else f'{100 * v:.1f}' for v in vals)
        + ' |'
    )
  rows.append(
      '| **mIoU** | '
      + ' | '.join(f'**{100 * r.miou:.1f}**' for r in results)
      + ' |'
  )
  for name in results[0].extra():
    rows.append(
        f'| {name} | '
        + ' | '.join(f'{100 * r.extra()[name]:.1f}' for r in results)
        + ' |'
    )
  return '\n'.join(rows)


def write_results(
    out_dir: str, results: Sequence[SplitResult], step: int
) -> str:
  """Writes ``results.json`` and ``results.md`` (atomically) to ``out_dir``.

  Returns:
    The markdown table.
  """
  out_dir = paths.resolve(out_dir)
  payload = {'step': step, 'splits': {r.name: r.to_json() for r in results}}
  table = format_table(results)
  md = (
      f'# Evaluation at step {step}\n\n'
      f'Per-class IoU (%), {len(results[0].class_set.scored)} scored '
      f'classes ({results[0].class_set.name}).\n\n{table}\n'
  )
  for name, text in (
      ('results.json', json.dumps(payload, indent=2)),
      ('results.md', md),
  ):
    paths.write_atomic(out_dir / name, text)
  return table


def write_eval_scalars(writer, step: int, results: list[SplitResult]) -> None:
  """mIoU, extra means and per-class IoU (%) as TensorBoard scalars."""
  if not results:
    return
  scalars = {}
  for r in results:
    scalars[f'eval/{r.name}/miou'] = 100 * r.miou
    for name, value in r.extra().items():
      scalars[f'eval/{r.name}/{name}'] = 100 * value
    for i in r.class_set.scored:
      if not np.isnan(r.iou[i]):
        scalars[f'eval/{r.name}/iou/{r.class_set.classes[i]}'] = 100 * r.iou[i]
  writer.write_scalars(step, scalars)
  writer.flush()


def write_eval_images(
    writer, step: int, out_dir: paths.PathLike, results: list[SplitResult]
) -> int:
  """The overlay panels written under ``out_dir/overlays/{split}/`` as
  TensorBoard images (``eval/{split}/overlay/{id}``); returns how many."""
  images = {}
  for r in results:
    folder = paths.resolve(out_dir) / 'overlays' / r.name
    if not folder.is_dir():
      continue
    for png in sorted(folder.glob('*.png')):
      with png.open('rb') as f:
        img = np.asarray(Image.open(f).convert('RGB'))
      images[f'eval/{r.name}/overlay/{png.stem}'] = img[None]
  if images:
    writer.write_images(step, images)
    writer.flush()
  return len(images)
