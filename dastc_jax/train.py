"""Wires a training run together: ``train_and_evaluate``.

Order (flax gemma / big_vision): data root -> mesh -> input pipeline ->
model, optimizer and state (or a restore of the latest checkpoint) -> jitted
steps -> loop with clu hooks (progress/ETA, scalars, checkpoints, periodic
eval) -> final eval with per-class tables and overlays.

Workdir layout::

  {workdir}/config.json                 the resolved config
  {workdir}/checkpoints/{step}/         orbax: state + data_iter
  {workdir}/events.out.tfevents.*       TensorBoard scalars
  {workdir}/eval/step_{N}/results.{json,md}, overlays/{split}/*.png
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import ml_collections
import numpy as np

from dastc_jax import paths
from dastc_jax.data import pipeline
from dastc_jax.data import roots
from dastc_jax.evaluation import evaluate
from dastc_jax.evaluation import forward
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import divergence
from dastc_jax.runtime import preemption
from dastc_jax.runtime import progress as progress_lib
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import steps as step_lib
from dastc_jax.runtime import teacher_start
from dastc_jax.runtime import validation
from dastc_jax.runtime import workdir as workdir_lib

check_config = validation.check_config
resolve_data_root = roots.resolve_data_root
write_eval_scalars = evaluate.write_eval_scalars


NonFiniteLossError = divergence.NonFiniteLossError


def _host_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(sharding_lib.to_host(v)) for k, v in metrics.items()}


def _make_steps(config, graphdef, tx, state_sharding, data, repl):
  """Jitted train step(s): ``[(first_step, fn), ...]`` in order."""
  jit = lambda fn: jax.jit(
      fn,
      in_shardings=(state_sharding, data),
      out_shardings=(state_sharding, repl),
      donate_argnums=(0,),
  )
  if config.method == 'target_only':
    return [(0, jit(step_lib.make_train_step(config, graphdef, tx, 'target')))]
  source = (0, jit(step_lib.make_train_step(config, graphdef, tx, 'source')))
  if config.method in ('source_only', 'source_only_hm'):
    return [source]
  adapt = (
      config.train.source_only_steps,
      jit(step_lib.make_dastc_step(config, graphdef, tx)),
  )
  return [source, adapt] if config.train.source_only_steps > 0 else [adapt]


def phase_names(config, train_steps) -> list[tuple[int, str]]:
  """``[(first_step, name)]`` of the run's phases: ``warm_start`` then
  ``dastc``, or the method alone."""
  if config.method == 'dastc' and len(train_steps) == 2:
    return [(train_steps[0][0], 'warm_start'), (train_steps[1][0], 'dastc')]
  return [(train_steps[0][0], config.method)]


def _estimate_later_phases(prog, run, step, state, batch) -> None:
  """FLOPs ratio of each later phase's step to this one's (for the ETA)."""
  later = [(f, n) for f, n in prog.phases if f > step]
  if not later:
    return
  here = progress_lib.flops(run.step_fn(step).lower(state, batch))
  for first, name in later:
    there = progress_lib.flops(run.step_fn(first).lower(state, batch))
    if here and there:
      prog.ratio[name] = there / here
      logging.info(
          "The %s step costs %.1fx this phase's in FLOPs (ETA estimate).",
          name,
          prog.ratio[name],
      )


def _jit_eval_step(config, graphdef, state_sharding, repl, data):
  """The jitted eval step; parameters keep the state's (FSDP) sharding."""
  return jax.jit(
      forward.make_eval_step(config, graphdef),
      in_shardings=(state_sharding.params, state_sharding.batch_stats, data),
      out_shardings=(repl, data),
  )


@dataclasses.dataclass
class _Run:
  """The objects a training run wires together (built once, in order)."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  data_root: str
  train_iter: Any
  train_steps: list[tuple[int, Any]]
  eval_step: Any
  data_sharding: jax.NamedSharding
  ckpt: checkpointing.Checkpointer
  writer: Any
  report: Any

  def step_fn(self, step: int):
    """The jitted step function in charge of ``step`` (warm start, adapt)."""
    return [fn for first, fn in self.train_steps if first <= step][-1]

  def evaluate(self, state, step: int, num_overlays: int):
    return evaluate.evaluate_splits(
        self.config,
        self.data_root,
        self.eval_step,
        state.params,
        state.batch_stats,
        self.data_sharding,
        self.workdir / 'eval' / f'step_{step}',
        step,
        num_overlays,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool = False,
) -> dict[str, float]:
  """Trains (resuming from ``workdir`` if possible), then evaluates.

  Args:
    config: the experiment config.
    workdir: output folder (checkpoints, logs, eval tables, overlays).
    allow_config_change: resume although keys that change training differ
      from the run's last config (``workdir.check_and_write_config``).

  Returns:
    ``{split: mIoU}`` of the final evaluation, in %.
  """
  check_config(config)
  workdir = paths.resolve(workdir)
  ckpt_dir = workdir / 'checkpoints'
  if not (
      ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  ):
    teacher_start.check(config)  # no pseudo-labels from an initialised head
  changed = workdir_lib.check_and_write_config(
      config, workdir, allow_changes=allow_config_change
  )
  if changed:
    logging.warning(
        'Resuming with a config that differs from the last one in: %s (both '
        'are kept in %s).',
        ', '.join(changed),
        workdir,
    )
  data_root = resolve_data_root(config)

  # Mesh and input pipeline.
  mesh = sharding_lib.make_mesh(config)
  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  local_bs = sharding_lib.local_batch_size(config.train.batch_size, mesh)
  train_iter = iter(
      pipeline.make_train_dataset(
          config,
          data_root,
          local_batch_size=local_bs,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
          with_target=config.method != 'source_only',
      )
  )

  # Model, optimizer and state: restore the latest checkpoint, or init.
  ckpt = checkpointing.Checkpointer(
      workdir / 'checkpoints', max_to_keep=config.train.max_checkpoints
  )
  latest = ckpt.latest_step()
  graphdef, state, tx = state_lib.create_train_state(
      config,
      abstract=latest is not None,
      sizes=state_lib.carried_sizes(config, data_root),
  )
  state_sharding = sharding_lib.state_shardings(state, mesh)
  if latest is None:
    if config.train.init_from:
      state = state_lib.init_from_checkpoint(config, state)
    state = state_lib.load_frozen_teacher(config, state)
    state = jax.device_put(state, state_sharding)
  else:
    state = ckpt.restore(
        latest,
        checkpointing.abstract_with_sharding(state, state_sharding),
        train_iter,
    )
  start = int(jax.device_get(state.step))
  train_steps = _make_steps(config, graphdef, tx, state_sharding, data, repl)
  eval_step = _jit_eval_step(config, graphdef, state_sharding, repl, data)

  # Scalars to TensorBoard and metrics.jsonl (process 0), not the console.
  # (clu's TensorBoard writer imports TensorFlow, about 2.5 s: only once
  # the config and the data have been checked, so that a bad one is
  # reported without that wait.)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import metrics_file  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    writer = metric_writers.AsyncMultiWriter(
        [
            metric_writers.SummaryWriter(os.fspath(workdir)),
            metrics_file.MetricsFile(workdir / 'metrics.jsonl'),
        ]
    )
  else:
    writer = metric_writers.MultiWriter([])
  if start == 0:
    hparams = traverse_util.flatten_dict(config.to_dict(), sep='.')
    writer.write_hparams(
        {
            k: v
            for k, v in hparams.items()
            if isinstance(v, (int, float, str, bool))
        }
    )
  report = periodic_actions.ReportProgress(
      num_train_steps=config.train.num_steps,
      writer=writer,
      every_steps=config.train.log_every,
  )
  logging.info(
      'Training from step %d to %d on %d devices (%d hosts), global '
      'batch %d.',
      start,
      config.train.num_steps,
      mesh.devices.size,
      jax.process_count(),
      config.train.batch_size,
  )
  run = _Run(
      config,
      workdir,
      data_root,
      train_iter,
      train_steps,
      eval_step,
      data,
      ckpt,
      writer,
      report,
  )
  try:
    with metric_writers.ensure_flushes(writer):
      state = _train_loop(run, state, start)
      final_step = int(jax.device_get(state.step))
      results = run.evaluate(state, final_step, config.eval.num_overlays)
      write_eval_scalars(writer, final_step, results)
      if jax.process_index() == 0:
        evaluate.write_eval_images(
            writer, final_step, workdir / 'eval' / f'step_{final_step}', results
        )
    final = workdir / 'eval' / f'step_{final_step}'
    logging.info(
        'Done. Checkpoints: %s. Results: %s (results.md, results.json%s). '
        'Metrics: %s and TensorBoard (tensorboard --logdir %s).',
        ckpt_dir,
        final,
        ', overlays/' if config.eval.num_overlays else '',
        workdir / 'metrics.jsonl',
        workdir,
    )
  finally:
    ckpt.close()  # waits for pending saves, also when a step failed
    if hasattr(train_iter, 'close'):
      train_iter.close()
  return {r.name: 100 * r.miou for r in results}


def _train_loop(
    run: _Run, state: state_lib.TrainState, start: int
) -> state_lib.TrainState:
  """Runs steps ``start..num_steps``; returns the final state.

  Every step's loss and gradient norm are checked for finiteness: step k-1
  while step k runs (no pipeline stall), and step k itself before anything
  derived from it is logged or saved.
  """
  config, ckpt = run.config, run.ckpt
  monitor = divergence.Monitor(
      config.train.nonfinite, config.train.max_consecutive_skips
  )

  def check(metrics, step):
    if metrics is not None:
      monitor.check(
          _host_scalars(metrics),
          step,
          ckpt.directory,
          ckpt.latest_step_committed,
      )

  preempt = preemption.Preemption()
  try:
    state = _loop(run, state, start, check, monitor, preempt)
  finally:
    preempt.close()
  ckpt.wait()
  return state


def _loop(
    run: _Run,
    state: state_lib.TrainState,
    start: int,
    check,
    monitor: divergence.Monitor,
    preempt: preemption.Preemption,
) -> state_lib.TrainState:
  """Steps ``start..num_steps`` with logging, saves, evals, preemption."""
  config, ckpt = run.config, run.ckpt
  num_steps = config.train.num_steps
  window, prev = [], None
  phases = phase_names(config, run.train_steps)
  prog = progress_lib.Progress(phases, num_steps, start)
  bad_records = 0  # undecodable records passed over (data.on_error=skip)
  for step in range(start, num_steps):
    starts_phase = prog.before_step(step)
    if starts_phase:
      logging.info(
          'Phase %s from step %d: compiling its step (its first step takes '
          'longer).',
          prog.phase(step),
          step,
      )
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      with run.report.timed('data', wait_jax_async_dispatch=False):
        host = next(run.train_iter)
        bad_records += sum(
            int(np.sum(host[d].pop('bad_records')))
            for d in host
            if 'bad_records' in host[d]
        )
        batch = sharding_lib.shard_batch(host, run.data_sharding)
      state, metrics = run.step_fn(step)(state, batch)
    if starts_phase:
      jax.block_until_ready(metrics)
      prog.after_step(step)
      logging.info(
          'Phase %s: first step (with compilation) took %s.',
          prog.phase(step),
          progress_lib.duration(prog.first_step_s),
      )
      if jax.process_index() == 0:
        _estimate_later_phases(prog, run, step, state, batch)
    done = step + 1
    check(prev, done - 1)
    prev = metrics
    window.append(metrics)
    if jax.process_index() == 0:
      run.report(done)
    last = done == num_steps
    log = done % config.train.log_every == 0 or last
    save = done % config.train.checkpoint_every == 0 or last
    if log or save:
      check(metrics, done)
      prev = None
    if log:
      host = [_host_scalars(m) for m in window]
      keys = sorted({k for m in host for k in m})  # phases log other terms
      # Skipped steps (non-finite terms) count, but do not poison the means.
      scalars = {
          k: float(
              np.mean(
                  [m[k] for m in host if k in m and np.isfinite(m[k])]
                  or [np.nan]
              )
          )
          for k in keys
      }
      scalars['skipped_total'] = float(monitor.total_skipped)
      if config.data.on_error == 'skip':
        scalars['data/bad_records_total'] = float(bad_records)
      # Each phase's loss under its own tag (their scales differ).
      scalars[f'loss/{prog.phase(done - 1)}'] = scalars.pop('loss')
      run.writer.write_scalars(done, scalars)
      logging.info(
          '%s', prog.line(done, scalars[f'loss/{prog.phase(done - 1)}'])
      )
      window = []
    if save:
      ckpt.save(done, state, run.train_iter)
    if not last and preempt.reached(done):
      check(metrics, done)  # never save what a bad step produced
      if not save:
        ckpt.save(done, state, run.train_iter)
      ckpt.wait()
      raise preemption.Preempted(done, ckpt.directory)
    if (
        config.train.eval_every
        and done % config.train.eval_every == 0
        and not last
    ):
      with run.report.timed('eval'):
        res = run.evaluate(state, done, 0)
      run.writer.write_scalars(
          done, {f'eval/{r.name}/miou': 100 * r.miou for r in res}
      )
  return state
