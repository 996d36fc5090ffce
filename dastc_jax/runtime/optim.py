"""Optimizers with DeepLab parameter groups and the poly LR schedule.

Groups (docs/reference_code.md, "Training"): ``backbone`` (conv1..layer4),
``fusion`` (the
score-fusion ``sf_layer``), ``head`` (aux ``layer5`` and main ``layer7``,
and HRDA's ``scale_attention``)
and ``frozen`` (BatchNorm scale/bias when ``model.freeze_bn_affine``). Each
group's LR is ``lr_mult[group] * schedule(step)``. The reference leaves the
head group at a constant ``10 * base`` (``optim.constant_head_lr``, a bug
flag that is off by default).

``no_weight_decay`` names substrings of parameter paths (``a/b/c``) that get
no weight decay in any group: the transformer presets exempt every MiT
LayerNorm (``'norm'``), as the released ViT scripts do (docs/vit.md).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from dastc_jax import errors

GROUPS = ('backbone', 'fusion', 'head')


# config.optim.name and config.optim.schedule.
OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('poly', 'constant')


def param_labels(params: Any, freeze_bn_affine: bool) -> Any:
  """Labels each parameter leaf with its group name."""

  def label(path, _):
    keys = path_name(path).split('/')
    top = keys[0]
    if top == 'sf_layer':
      return 'fusion'
    if top in ('head', 'aux_head', 'scale_attention'):
      return 'head'
    if top == 'backbone':
      is_bn = keys[-1] in ('scale', 'bias') and any(
          k.startswith('bn') or k.endswith('_bn') for k in keys
      )
      return 'frozen' if (is_bn and freeze_bn_affine) else 'backbone'
    raise ValueError(f'No optimizer group for parameter {"/".join(keys)}')

  return jax.tree_util.tree_map_with_path(label, params)


def adaptation_start(config: ml_collections.ConfigDict) -> int:
  """The step where DA-STC's adaptation phase starts (0: one phase)."""
  return config.train.source_only_steps if config.method == 'dastc' else 0


def lr_schedule(
    config: ml_collections.ConfigDict, restart_at: int = 0, scale: float = 1.0
) -> optax.Schedule:
  """Base LR schedule (times ``scale``): linear warm-up, then poly decay.

  Built from optax schedules only. Poly decay is
  ``lr * (1 - step / schedule_steps) ** poly_power`` over the absolute step;
  after a warm-up of ``w`` steps it continues from where it would be at
  ``w``, which is again a polynomial schedule (with initial value
  ``lr * (1 - w / schedule_steps) ** poly_power`` over the remaining steps).

  With ``restart_at > 0`` (a source-only warm start inside the run) the
  warm start decays over ``[0, restart_at)`` and the adaptation phase gets
  its own warm-up and decay over ``[restart_at, schedule_steps)``, as if it
  started from a checkpoint (the reference adapts from a TPS checkpoint).
  """
  if restart_at > 0:
    first = lr_schedule(_with_steps(config, restart_at), scale=scale)
    second = lr_schedule(
        _with_steps(config, config.schedule_steps - restart_at), scale=scale
    )
    return optax.join_schedules([first, second], [restart_at])
  o = config
  lr = scale * o.lr
  total = max(o.schedule_steps, 1)
  warm = min(o.warmup_steps, total)
  if o.schedule == 'constant':
    base = optax.constant_schedule(lr)
  elif o.schedule == 'poly':
    base = optax.polynomial_schedule(
        init_value=lr * (1.0 - warm / total) ** o.poly_power,
        end_value=0.0,
        power=o.poly_power,
        transition_steps=max(total - warm, 1),
    )
  else:
    raise errors.ConfigError(
        f'Unknown config.optim.schedule={o.schedule!r}; '
        f'expected one of {SCHEDULES}.'
    )
  if warm == 0:
    return base
  ramp = optax.linear_schedule(lr * o.warmup_ratio, lr, warm)
  return optax.join_schedules([ramp, base], [warm])


def _with_steps(
    config: ml_collections.ConfigDict, steps: int
) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  out.schedule_steps = max(int(steps), 1)
  out.warmup_steps = min(config.warmup_steps, max(int(steps) // 5, 0))
  return out


def group_schedules(
    config: ml_collections.ConfigDict, restart_at: int = 0
) -> dict[str, optax.Schedule]:
  """Per-group LR schedules (multipliers applied)."""
  out = {}
  for g in GROUPS:
    mult = config.lr_mult[g]
    if g == 'head' and config.constant_head_lr:
      out[g] = optax.constant_schedule(mult * config.lr)
    else:
      out[g] = lr_schedule(config, restart_at, scale=mult)
  return out


def path_name(path: tuple[Any, ...]) -> str:
  """``a/b/c`` for a pytree key path (dict keys, attributes, indices)."""
  return '/'.join(
      str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
      for k in path
  )


def decay_mask(no_weight_decay: tuple[str, ...]) -> Any:
  """A mask function for optax: True where weight decay applies, False for a
  parameter whose path contains one of ``no_weight_decay``; None (decay
  everywhere, no mask state) when that tuple is empty."""
  keys = tuple(no_weight_decay)
  if not keys:
    return None

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(k in path_name(path) for k in keys), params
    )

  return mask


def _group_tx(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  mask = decay_mask(config.no_weight_decay)
  if config.name == 'sgd':
    # PyTorch SGD: weight decay is added to the gradient before momentum.
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=config.momentum),
    )
  if config.name == 'adamw':
    return optax.adamw(
        schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        mask=mask,
    )
  raise errors.ConfigError(
      f'Unknown config.optim.name={config.name!r}; expected one of '
      f'{OPTIMIZERS}.'
  )


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    freeze_bn_affine: bool,
    restart_at: int = 0,
) -> optax.GradientTransformation:
  """Builds the grouped optimizer for ``params``.

  Args:
    config: ``config.optim``.
    params: parameter pytree (for the labels).
    freeze_bn_affine: keep BatchNorm scale/bias fixed.
    restart_at: step where the adaptation phase's schedule starts.

  Returns:
    An optax transformation.
  """
  schedules = group_schedules(config, restart_at)
  txs = {g: _group_tx(config, schedules[g]) for g in GROUPS}
  txs['frozen'] = optax.set_to_zero()
  tx = optax.multi_transform(txs, param_labels(params, freeze_bn_affine))
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
