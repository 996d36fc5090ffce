"""Checkpoint evaluation jobs: one checkpoint, a folder of them, or a watch.

  python -m dastc_jax.main --config=configs/viper.py --mode=eval \
      --workdir=runs/viper_eval --checkpoint=runs/viper [--watch]

Only the weights (``params``, ``batch_stats``) of a checkpoint are read, so
training checkpoints of any method and converted PyTorch weights
(``dastc_jax.convert``) evaluate the same way. For every step the job writes
``{workdir}/eval/step_{N}/results.{json,md}`` (per-class IoU) and TensorBoard
scalars; a step whose results already exist is not recomputed, so a job can
be restarted. ``{workdir}/eval/summary.{json,md}`` lists every evaluated
step with two numbers, labelled apart:

* **last**: the mIoU of the last checkpoint (what a run produces);
* **best on val**: the best mIoU over the steps, chosen on the evaluation
  split itself (the reference's old "video_best" oracle selection: an
  optimistic number, not a held-out result).

``--watch`` polls the checkpoint folder and evaluates each new committed
step until the run's last step (``config.train.num_steps``) is done or no new
checkpoint appears for ``--watch_timeout`` seconds.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from dastc_jax import paths
from dastc_jax.data import roots
from dastc_jax.evaluation import evaluate
from dastc_jax.evaluation import forward
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import validation


class _Evaluator:
  """The mesh, jitted eval step and data root of one config (built once)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validation.check_config(config)
    self.config = config
    self.workdir = paths.resolve(workdir)
    self.data_root = roots.resolve_data_root(config, generate=False)
    self.mesh = sharding_lib.make_mesh(config)
    self.data = sharding_lib.data_sharding(self.mesh)
    # Shapes only: the weights come from the checkpoints.
    self.params_like, self.stats_like = jax.eval_shape(
        lambda: state_lib.init_model(config, 0)[1:]
    )
    shard = sharding_lib.state_shardings(
        {'params': self.params_like, 'batch_stats': self.stats_like}, self.mesh
    )
    self.param_sharding = shard['params']
    self.stats_sharding = shard['batch_stats']
    self.eval_step = jax.jit(
        forward.make_eval_step(config, state_lib.model_graphdef(config)),
        in_shardings=(shard['params'], shard['batch_stats'], self.data),
        out_shardings=(sharding_lib.replicated(self.mesh), self.data),
    )
    self.writer = None

  def load(self, root: paths.PathLike, step: int) -> tuple[Any, Any]:
    """The weights of ``root/step``, placed on the mesh."""
    params, stats, _ = checkpointing.load_weights(
        root, step, self.params_like, self.stats_like
    )
    return (
        jax.device_put(params, self.param_sharding),
        jax.device_put(stats, self.stats_sharding),
    )

  def out_dir(self, step: int) -> epath.Path:
    return self.workdir / 'eval' / f'step_{step}'

  def evaluate(
      self, root: paths.PathLike, step: int, *, reuse: bool = True
  ) -> dict[str, float]:
    """``{split: mIoU %}`` of ``root/step`` (existing results reused)."""
    path = self.out_dir(step) / 'results.json'
    if reuse and path.exists():
      saved = json.loads(path.read_text())
      if set(saved.get('splits', {})) == set(self.config.eval.splits):
        logging.info('Step %d already evaluated (%s).', step, path)
        return {k: v['miou'] for k, v in saved['splits'].items()}
    params, stats = self.load(root, step)
    results = evaluate.evaluate_splits(
        self.config,
        self.data_root,
        self.eval_step,
        params,
        stats,
        self.data,
        self.out_dir(step),
        step,
        self.config.eval.num_overlays,
    )
    if jax.process_index() == 0:
      evaluate.write_eval_scalars(self._writer(), step, results)
      evaluate.write_eval_images(
          self._writer(), step, self.out_dir(step), results
      )
    return {r.name: 100 * r.miou for r in results}

  def _writer(self):
    if self.writer is None:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top

      self.writer = metric_writers.create_default_writer(
          os.fspath(self.workdir / 'eval')
      )
    return self.writer


def _root_and_steps(
    workdir: str, checkpoint: str
) -> tuple[epath.Path, list[int]]:
  """Checkpoint root and the explicitly named step (or [] = all steps)."""
  root, step = checkpointing.resolve(workdir, checkpoint)
  if not root.is_dir():
    raise checkpointing.CheckpointError(f'No checkpoint folder at {root}.')
  return root, ([step] if step >= 0 else [])


def _steps_in(root: str) -> list[int]:
  ckpt = checkpointing.Checkpointer(root, async_save=False, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, checkpoint: str = ''
) -> dict[str, float]:
  """Evaluates one checkpoint (the latest one if a folder is given).

  Args:
    config: the experiment config (model, class set, eval splits).
    workdir: output folder; results go to ``{workdir}/eval/step_{N}``.
    checkpoint: '' (latest in ``{workdir}/checkpoints``), a step number, a
      step folder, a checkpoint root, a training workdir or a converted
      weights folder.

  Returns:
    ``{split: mIoU}`` in %.
  """
  root, steps = _root_and_steps(workdir, checkpoint)
  available = _steps_in(root)
  if not available:
    raise checkpointing.CheckpointError(f'No checkpoint found in {root}.')
  step = steps[0] if steps else available[-1]
  if step not in available:
    raise checkpointing.CheckpointError(
        f'No checkpoint step {step} in {root}; available: {available}'
    )
  return _Evaluator(config, workdir).evaluate(root, step, reuse=False)


def summarize(
    per_step: dict[int, dict[str, float]], split: str
) -> dict[str, Any]:
  """Last-checkpoint and best-on-val numbers of ``split``."""
  steps = sorted(per_step)
  last = steps[-1]
  best = max(steps, key=lambda s: (per_step[s][split], -s))
  return {
      'split': split,
      'last': {'step': last, 'miou': per_step[last][split]},
      'best_on_val': {
          'step': best,
          'miou': per_step[best][split],
          'note': 'oracle selection on the evaluated split',
      },
      'steps': {str(s): per_step[s] for s in steps},
  }


def evaluated_steps(workdir: str, splits) -> dict[int, dict[str, float]]:
  """``{step: {split: mIoU}}`` of every ``eval/step_N/results.json`` with
  these splits (also those written by other jobs, e.g. an eval array)."""
  out = {}
  base = paths.resolve(workdir) / 'eval'
  for sub in base.iterdir() if base.is_dir() else ():
    name, path = sub.name, sub / 'results.json'
    if not (name.startswith('step_') and path.is_file()):
      continue
    res = json.loads(path.read_text()).get('splits', {})
    if set(res) == set(splits):
      out[int(name[len('step_') :])] = {k: v['miou'] for k, v in res.items()}
  return out


def write_summary(
    workdir: str, per_step: dict[int, dict[str, float]], root: str
) -> dict[str, Any]:
  """Writes ``eval/summary.{json,md}`` atomically; returns the JSON.

  ``per_step`` is merged with the other steps evaluated in ``workdir``.
  """
  per_step = {
      **evaluated_steps(workdir, next(iter(per_step.values()))),
      **per_step,
  }
  splits = sorted(next(iter(per_step.values())))
  summary = {
      'checkpoints': os.fspath(root),
      'splits': {s: summarize(per_step, s) for s in splits},
  }
  lines = [
      '# Checkpoint evaluation',
      '',
      f'Checkpoints: `{root}`',
      '',
      '| step | ' + ' | '.join(splits) + ' |',
      '|---:|' + '---:|' * len(splits),
  ]
  for step in sorted(per_step):
    lines.append(
        f'| {step} | '
        + ' | '.join(f'{per_step[step][s]:.2f}' for s in splits)
        + ' |'
    )
  lines.append('')
  for s in splits:
    r = summary['splits'][s]
    lines.append(
        f'- **{s}, last checkpoint** (step {r["last"]["step"]}): '
        f'mIoU {r["last"]["miou"]:.2f}'
    )
    lines.append(
        f'- {s}, best on val (oracle selection over '
        f'{len(per_step)} checkpoints, step '
        f'{r["best_on_val"]["step"]}): mIoU '
        f'{r["best_on_val"]["miou"]:.2f}'
    )
  out = paths.resolve(workdir) / 'eval'
  for name, text in (
      ('summary.json', json.dumps(summary, indent=2)),
      ('summary.md', '\n'.join(lines) + '\n'),
  ):
    paths.write_atomic(out / name, text)
  return summary


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint: str = '',
    *,
    watch: bool = False,
    watch_interval: float = 60.0,
    watch_timeout: float = 3600.0,
    clock=time.monotonic,
    sleep=time.sleep,
) -> dict[str, Any]:
  """The ``--mode=eval`` job: one step, every step of a folder, or a watch.

  Args:
    config: the experiment config.
    workdir: output folder (eval tables, summary, TensorBoard).
    checkpoint: a step / step folder (that checkpoint only), or a folder
      (every checkpoint in it); '' = ``{workdir}/checkpoints``.
    watch: keep polling for new checkpoints.
    watch_interval: seconds between polls.
    watch_timeout: stop watching after this many seconds without a new
      checkpoint (0 = never).
    clock: time source (tests).
    sleep: sleep function (tests).

  Returns:
    The summary (see :func:`write_summary`).
  """
  root, only = _root_and_steps(workdir, checkpoint)
  ev = _Evaluator(config, workdir)
  per_step: dict[int, dict[str, float]] = {}
  last_new = clock()
  final = config.train.num_steps
  try:
    while True:
      available = _steps_in(root) if root.is_dir() else []
      if only and only[0] not in available:
        raise checkpointing.CheckpointError(
            f'No checkpoint step {only[0]} in {root}; available: '
            f'{available}'
        )
      todo = [s for s in (only or available) if s not in per_step]
      for step in todo:
        # Rounded like results.json, so fresh and reused steps compare.
        per_step[step] = {
            k: round(v, 2) for k, v in ev.evaluate(root, step).items()
        }
        write_summary(workdir, per_step, root)
        last_new = clock()
      if not watch or only or final in per_step:
        break
      if watch_timeout and clock() - last_new > watch_timeout:
        logging.info(
            'No new checkpoint in %s for %.0f s: stopping.', root, watch_timeout
        )
        break
      logging.info(
          'Watching %s for new checkpoints (evaluated: %s).',
          root,
          sorted(per_step),
      )
      sleep(watch_interval)
  finally:
    if ev.writer is not None:
      ev.writer.close()
  if not per_step:
    raise checkpointing.CheckpointError(f'No checkpoint found in {root}.')
  summary = write_summary(workdir, per_step, root)
  print(
      (paths.resolve(workdir) / 'eval' / 'summary.md').read_text(), flush=True
  )
  return summary
