"""Wires everything together: ``train_and_evaluate`` and ``evaluate_checkpoint``.

Order (flax gemma / big_vision): data root -> mesh -> input pipeline ->
model, optimizer and state -> checkpoint restore -> jitted steps -> loop with
clu hooks (progress/ETA, scalars, checkpoints, periodic eval) -> final eval
with per-class tables and overlays.

Workdir layout::

  {workdir}/config.json                 the resolved config
  {workdir}/checkpoints/{step}/         orbax: state + data_iter
  {workdir}/events.out.tfevents.*       TensorBoard scalars and images
  {workdir}/eval/step_{N}/results.{json,md}, overlays/{split}/*.png
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from dastc_jax import checkpointing
from dastc_jax import evaluate
from dastc_jax import sharding as sharding_lib
from dastc_jax import state as state_lib
from dastc_jax import train_step as step_lib
from dastc_jax.data import labels as labels_lib
from dastc_jax.data import pipeline
from dastc_jax.data import synthetic


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


def resolve_data_root(config: ml_collections.ConfigDict) -> str:
  """The folder datasets are read from (generating the synthetic world)."""
  if config.data.synthetic.enabled:
    return synthetic.ensure_world(config.data.synthetic,
                                  config.data.synthetic.num_workers)
  return config.data.root


def _check_config(config: ml_collections.ConfigDict) -> None:
  cs = labels_lib.get_class_set(config.data.class_set)
  if cs.num_classes != config.model.num_classes:
    raise ValueError(
        f'config.model.num_classes={config.model.num_classes} but '
        f'config.data.class_set={cs.name!r} has {cs.num_classes} classes.')
  if config.method != 'source_only':
    raise ValueError(f"Unknown config.method={config.method!r}; expected "
                     "'source_only'.")
  for split in config.eval.splits:
    if split not in config.data:
      raise ValueError(f'config.eval.splits names {split!r}, which is not a '
                       'section of config.data.')


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, '.config.json.tmp')
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, os.path.join(workdir, 'config.json'))


def _host_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(sharding_lib.to_host(v)) for k, v in metrics.items()}


def _check_finite(metrics: dict[str, float], step: int,
                  ckpt: checkpointing.Checkpointer) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    ckpt.wait()  # let the pending (good) saves commit
    last = ckpt.latest_step()
    raise NonFiniteLossError(
        f'Non-finite values at step {step}: '
        + ', '.join(f'{k}={v}' for k, v in sorted(bad.items()))
        + '. Training stopped; nothing was saved after the failure. The last '
        f'good checkpoint is step {last} in {ckpt.directory}. Lower '
        'config.optim.lr or set config.optim.grad_clip_norm.')


def _eval_all(config: ml_collections.ConfigDict, data_root: str,
              eval_step: Any, state: state_lib.TrainState,
              data_sharding: jax.NamedSharding, out_dir: str,
              step: int, num_overlays: int) -> list[evaluate.SplitResult]:
  cs = labels_lib.get_class_set(config.data.class_set)
  results = []
  if not config.eval.splits:
    return results
  for split in config.eval.splits:
    ds = pipeline.make_eval_dataset(config.data[split], data_root,
                                    cs.name, config.model.per_axis_flow_scale)
    results.append(evaluate.evaluate_split(
        split, eval_step, state.params, state.batch_stats, ds, class_set=cs,
        global_batch_size=config.eval.batch_size,
        data_sharding=data_sharding, num_overlays=num_overlays,
        overlay_dir=os.path.join(out_dir, 'overlays', split)))
  if jax.process_index() == 0:
    table = evaluate.write_results(out_dir, results, step)
    print(f'\nPer-class IoU (%) at step {step} ({cs.name}):\n{table}\n',
          flush=True)
  return results


def _jit_steps(config, graphdef, tx, repl, data):
  train_step = jax.jit(step_lib.make_train_step(config, graphdef, tx),
                       in_shardings=(repl, data), out_shardings=(repl, repl),
                       donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(config, graphdef),
                      in_shardings=(repl, repl, data),
                      out_shardings=(repl, data))
  return train_step, eval_step


@dataclasses.dataclass
class _Run:
  """The objects a training run wires together (built once, in order)."""
  config: ml_collections.ConfigDict
  workdir: str
  data_root: str
  train_iter: Any
  train_step: Any
  eval_step: Any
  data_sharding: jax.NamedSharding
  ckpt: checkpointing.Checkpointer
  writer: Any
  report: Any

  def evaluate(self, state, step: int, num_overlays: int):
    out_dir = os.path.join(self.workdir, 'eval', f'step_{step}')
    return _eval_all(self.config, self.data_root, self.eval_step, state,
                     self.data_sharding, out_dir, step, num_overlays)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains (resuming from ``workdir`` if possible), then evaluates.

  Args:
    config: the experiment config.
    workdir: output folder (checkpoints, logs, eval tables, overlays).

  Returns:
    ``{split: mIoU}`` of the final evaluation, in %.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  _check_config(config)
  workdir = os.path.abspath(workdir)
  _write_config(config, workdir)
  data_root = resolve_data_root(config)

  # Mesh and input pipeline.
  mesh = sharding_lib.make_mesh(config)
  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  local_bs = sharding_lib.local_batch_size(config.train.batch_size, mesh)
  train_iter = iter(pipeline.make_train_dataset(
      config, data_root, local_batch_size=local_bs,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      with_target=config.method != 'source_only'))

  # Model, optimizer, state; restore the latest checkpoint if any.
  graphdef, state, tx = state_lib.create_train_state(config)
  state = jax.device_put(state, repl)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      max_to_keep=config.train.max_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, checkpointing.abstract_with_sharding(
        state, repl), train_iter)
  start = int(jax.device_get(state.step))
  train_step, eval_step = _jit_steps(config, graphdef, tx, repl, data)

  # Logging and progress hooks (process 0 writes).
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config).items()
                          if isinstance(v, (int, float, str, bool))})
  report = periodic_actions.ReportProgress(
      num_train_steps=config.train.num_steps, writer=writer,
      every_steps=config.train.log_every)
  logging.info('Training from step %d to %d on %d devices (%d hosts), global '
               'batch %d.', start, config.train.num_steps, mesh.devices.size,
               jax.process_count(), config.train.batch_size)
  run = _Run(config, workdir, data_root, train_iter, train_step, eval_step,
             data, ckpt, writer, report)
  try:
    with metric_writers.ensure_flushes(writer):
      state = _train_loop(run, state, start)
      final_step = int(jax.device_get(state.step))
      results = run.evaluate(state, final_step, config.eval.num_overlays)
      _write_eval_scalars(writer, final_step, results)
  finally:
    ckpt.close()  # waits for pending saves, also when a step failed
    if hasattr(train_iter, 'close'):
      train_iter.close()
  return {r.name: 100 * r.miou for r in results}


def _train_loop(run: _Run, state: state_lib.TrainState,
                start: int) -> state_lib.TrainState:
  """Runs steps ``start..num_steps``; returns the final state."""
  config, ckpt = run.config, run.ckpt
  num_steps = config.train.num_steps
  window, prev = [], None
  t_start = time.time()
  for step in range(start, num_steps):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      with run.report.timed('data', wait_jax_async_dispatch=False):
        batch = sharding_lib.shard_batch(next(run.train_iter),
                                         run.data_sharding)
      state, metrics = run.train_step(state, batch)
    if prev is not None:  # check step-1 while this step runs
      _check_finite(_host_scalars(prev[1]), prev[0], ckpt)
    prev = (step + 1, metrics)
    window.append(metrics)
    done = step + 1
    if jax.process_index() == 0:
      run.report(done)
    last = done == num_steps
    if done % config.train.log_every == 0 or last:
      host = [_host_scalars(m) for m in window]
      _check_finite(host[-1], done, ckpt)
      scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      run.writer.write_scalars(done, scalars)
      eta = (time.time() - t_start) / (done - start) * (num_steps - done)
      logging.info('step %d/%d  loss %.4f  (ETA %.0fs)', done, num_steps,
                   scalars['loss'], eta)
      window = []
    if done % config.train.checkpoint_every == 0 or last:
      _check_finite(_host_scalars(metrics), done, ckpt)
      ckpt.save(done, state, run.train_iter)
    if (config.train.eval_every and done % config.train.eval_every == 0
        and not last):
      with run.report.timed('eval'):
        res = run.evaluate(state, done, 0)
      run.writer.write_scalars(done, {f'eval/{r.name}/miou': 100 * r.miou
                                      for r in res})
  if prev is not None:
    _check_finite(_host_scalars(prev[1]), prev[0], ckpt)
  ckpt.wait()
  return state


def _write_eval_scalars(writer, step: int,
                        results: list[evaluate.SplitResult]) -> None:
  if not results:
    return
  scalars = {}
  for r in results:
    scalars[f'eval/{r.name}/miou'] = 100 * r.miou
    for i in r.class_set.scored:
      if not np.isnan(r.iou[i]):
        scalars[f'eval/{r.name}/iou/{r.class_set.classes[i]}'] = (
            100 * r.iou[i])
  writer.write_scalars(step, scalars)
  writer.flush()


def _flat(config: ml_collections.ConfigDict, prefix: str = ''
          ) -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _resolve_checkpoint(workdir: str, checkpoint: str) -> tuple[str, int]:
  """(checkpoint root, step) from '', a step number, a step dir or a root."""
  root = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not checkpoint:
    return root, -1
  if checkpoint.isdigit():
    return root, int(checkpoint)
  path = os.path.abspath(os.path.expanduser(checkpoint))
  if not os.path.exists(path):
    raise checkpointing.CheckpointError(f'Checkpoint path {path} does not '
                                        'exist.')
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path.rstrip('/')), int(base)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), -1
  return path, -1


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str = '') -> dict[str, float]:
  """Evaluates one checkpoint on ``config.eval.splits``.

  Args:
    config: the experiment config the checkpoint was trained with.
    workdir: output folder; results go to ``{workdir}/eval/step_{N}``.
    checkpoint: '' (latest in ``{workdir}/checkpoints``), a step number, a
      step folder, a checkpoint root or a training workdir.

  Returns:
    ``{split: mIoU}`` in %.
  """
  _check_config(config)
  data_root = resolve_data_root(config)
  mesh = sharding_lib.make_mesh(config)
  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  root, step = _resolve_checkpoint(workdir, checkpoint)
  ckpt = checkpointing.Checkpointer(root, async_save=False)
  if step < 0:
    step = ckpt.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(f'No checkpoint found in {root}.')
  elif step not in ckpt.all_steps():
    raise checkpointing.CheckpointError(
        f'No checkpoint step {step} in {root}; available: {ckpt.all_steps()}')
  abstract = state_lib.abstract_train_state(config)
  state = ckpt.restore(step, checkpointing.abstract_with_sharding(abstract,
                                                                  repl))
  ckpt.close()
  graphdef, _, _ = state_lib.init_model(config, config.seed)
  eval_step = jax.jit(step_lib.make_eval_step(config, graphdef),
                      in_shardings=(repl, repl, data),
                      out_shardings=(repl, data))
  out_dir = os.path.join(os.path.abspath(workdir), 'eval', f'step_{step}')
  results = _eval_all(config, data_root, eval_step, state, data, out_dir,
                      step, config.eval.num_overlays)
  return {r.name: 100 * r.miou for r in results}
