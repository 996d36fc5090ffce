"""Orbax checkpoints of the train state and the grain iterator state.

This is the only module that imports orbax. A checkpoint step holds two
items: ``state`` (the ``TrainState`` pytree) and ``data_iter`` (the grain
iterator position, one JSON file per process). Orbax writes each step into a
temporary folder and renames it when complete, so a crash during a save
never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from dastc_jax import paths
from dastc_jax import errors


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the config."""


class Checkpointer:
  """Saves and restores ``(state, data_iter)`` under ``directory``."""

  def __init__(
      self,
      directory: paths.PathLike,
      *,
      max_to_keep: int = 3,
      async_save: bool = True,
      read_only: bool = False,
  ):
    self.directory = paths.resolve(directory)
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f'No checkpoint folder at {self.directory}.')
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data_iter')
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def latest_step_committed(self) -> int | None:
    """The latest step after every pending save has committed."""
    self._mngr.wait_until_finished()
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None) -> None:
    """Saves asynchronously; ``wait()`` blocks until it is committed."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(
      self, step: int, abstract_state: Any, data_iter: Any = None
  ) -> Any:
    """Restores ``state`` (and the iterator in place) from ``step``.

    Args:
      step: checkpoint step.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings.
      data_iter: grain iterator to set to the saved position, or None.

    Returns:
      The restored state.
    """
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types on mismatches.
      raise CheckpointError(
          f'Cannot restore checkpoint {self.directory}/{step}: '
          f'{type(e).__name__}: {str(e)[:500]}. Was it written with this '
          'config (architecture, class count), and is it complete?'
      ) from e
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return restored['state']

  def restore_weights(
      self, step: int, params_like: Any, stats_like: Any
  ) -> tuple[Any, Any]:
    """Loads only ``params`` and ``batch_stats`` of a checkpoint.

    The checkpoint may come from another method or optimizer (e.g. a
    source-only warm start for DA-STC): the whole saved tree is read and the
    weights are matched by path to ``params_like``/``stats_like``.

    Raises:
      CheckpointError: naming missing, unexpected and mismatched keys.
    """
    try:
      saved = self._mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
      )['state']
    except Exception as e:  # orbax raises many types on bad folders.
      raise CheckpointError(
          f'Cannot read checkpoint {self.directory}/{step}: '
          f'{type(e).__name__}: {str(e)[:300]}. Is it complete (not '
          'truncated or partly copied) and an orbax checkpoint of '
          'dastc_jax?'
      ) from e
    out = []
    for name, like in (('params', params_like), ('batch_stats', stats_like)):
      if name not in saved:
        raise CheckpointError(
            f'Checkpoint {self.directory}/{step} has no ' f'{name!r}.'
        )
      out.append(
          _match_tree(saved[name], like, f'{self.directory}/{step}', name)
      )
    return tuple(out)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def flat_keys(tree: Any) -> dict[str, Any]:
  """``{'a/b/0': leaf}`` of any pytree (dict keys and sequence indices)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): v
      for path, v in flat
  }


def _match_tree(saved: Any, like: Any, where: str, name: str) -> Any:
  """``saved`` re-keyed to the structure of ``like``; errors name keys."""
  got, want = flat_keys(saved), flat_keys(like)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = sorted(
      k
      for k in set(want) & set(got)
      if tuple(got[k].shape) != tuple(want[k].shape)
  )
  if missing or unexpected or mismatched:
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected)):
      if keys:
        parts.append(
            f'{len(keys)} {label} ({", ".join(keys[:5])}'
            f'{", ..." if len(keys) > 5 else ""})'
        )
    if mismatched:
      parts.append(
          'shape mismatches ('
          + ', '.join(
              f'{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}'
              for k in mismatched[:5]
          )
          + ')'
      )
    raise CheckpointError(
        f'{name} of {where} do not fit this model: '
        + '; '.join(parts)
        + '. Is it the same '
        'architecture and class count?'
    )
  leaves, treedef = jax.tree_util.tree_flatten(like)
  keys = list(flat_keys(like))
  return jax.tree_util.tree_unflatten(
      treedef,
      [
          jax.numpy.asarray(got[k], dtype=leaf.dtype)
          for k, leaf in zip(keys, leaves)
      ],
  )


def resolve(workdir: paths.PathLike, checkpoint: str) -> tuple[epath.Path, int]:
  """(checkpoint root, step or -1 for latest) from a user's ``--checkpoint``.

  Args:
    workdir: the run folder; its ``checkpoints/`` is the default root.
    checkpoint: '' (latest), a step number, a step folder
      (``.../checkpoints/900``), a checkpoint root or a training workdir;
      local or ``gs://``-style.
  """
  root = paths.resolve(workdir) / 'checkpoints'
  if not checkpoint:
    return root, -1
  if checkpoint.isdigit():
    return root, int(checkpoint)
  path = paths.resolve(checkpoint.rstrip('/'))
  if not path.exists():
    raise CheckpointError(f'Checkpoint path {path} does not exist.')
  if path.is_file():
    raise CheckpointError(
        f'--checkpoint={checkpoint} is a file; it takes a checkpoint folder '
        "(a run's workdir, its checkpoints/ or one step folder). A PyTorch "
        'or safetensors weight file is converted first: python -m '
        'dastc_jax.convert --config=CONFIG --source=' + checkpoint + ' '
        '--output=DIR, then --checkpoint=DIR (docs/weights.md).'
    )
  if path.name.isdigit() and (path / 'state').is_dir():
    return path.parent, int(path.name)
  if (path / 'checkpoints').is_dir():
    return path / 'checkpoints', -1
  return path, -1


def load_weights(
    root: paths.PathLike, step: int, params_like: Any, stats_like: Any
) -> tuple[Any, Any, int]:
  """``(params, batch_stats, step)`` of ``root``'s ``step`` (-1: latest),
  read-only: the only way weights are read outside a resume.

  ``params_like``/``stats_like`` give the expected structure (arrays or
  shape structs, optionally with shardings).
  """
  ckpt = Checkpointer(root, async_save=False, read_only=True)
  try:
    step = ckpt.latest_step() if step < 0 else step
    if step is None:
      raise CheckpointError(f'No checkpoint found in {root}.')
    params, stats = ckpt.restore_weights(step, params_like, stats_like)
  finally:
    ckpt.close()
  return params, stats, step


def abstract_with_sharding(state: Any, sharding: Any) -> Any:
  """Shape/dtype structs of ``state`` placed with ``sharding`` (one sharding
  for every leaf, or a matching tree of shardings)."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, state)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state,
      sharding,
  )
