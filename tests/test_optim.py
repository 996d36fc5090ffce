"""Parameter groups, the poly schedule and frozen BatchNorm affine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import synthetic as synthetic_config
from configs import viper as viper_config
from configs import viper_vit as viper_vit_config
from dastc_jax.runtime import optim
from dastc_jax.runtime import state as state_lib


def _labels_by_group(labels):
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  out = {}
  for path, g in flat:
    out.setdefault(g, []).append(jax.tree_util.keystr(path))
  return out


def test_parameter_groups():
  c = viper_config.get_config('smoke')
  _, params, _ = state_lib.init_model(c, 0)
  groups = _labels_by_group(optim.param_labels(params, True))
  assert set(groups) == {'backbone', 'fusion', 'head', 'frozen'}
  assert groups['fusion'] == ["['sf_layer']['kernel']"]
  assert all('head' in k for k in groups['head'])
  assert all(
      k.endswith("['scale']") or k.endswith("['bias']")
      for k in groups['frozen']
  )
  assert all('kernel' in k for k in groups['backbone'])
  unfrozen = _labels_by_group(optim.param_labels(params, False))
  assert 'frozen' not in unfrozen


def test_reference_schedule_values():
  o = viper_config.get_config().optim
  s = optim.group_schedules(o)
  lr = lambda i: 1e-4 * (1 - i / 250000) ** 0.9
  for step in (0, 1000, 40000):
    np.testing.assert_allclose(float(s['backbone'](step)), lr(step), rtol=1e-5)
    np.testing.assert_allclose(
        float(s['fusion'](step)), 10 * lr(step), rtol=1e-5
    )
    np.testing.assert_allclose(float(s['head'](step)), 10 * lr(step), rtol=1e-5)
  # After 40k of 250k poly steps the decay has only reached ~0.855.
  np.testing.assert_allclose(
      float(s['backbone'](40000)) / 1e-4, 0.855, atol=1e-3
  )
  o.constant_head_lr = True  # the reference bug: heads never decay
  s = optim.group_schedules(o)
  np.testing.assert_allclose(float(s['head'](40000)), 1e-3, rtol=1e-6)


def test_warmup_then_poly():
  o = synthetic_config.get_config().optim
  s = optim.lr_schedule(o)
  assert float(s(0)) < 1e-8
  np.testing.assert_allclose(
      float(s(o.warmup_steps)),
      o.lr * (1 - o.warmup_steps / o.schedule_steps) ** o.poly_power,
      rtol=1e-5,
  )
  assert float(s(o.schedule_steps)) == 0.0
  # Every step against the closed form: a linear ramp, then poly decay over
  # the absolute step.
  steps = np.arange(o.schedule_steps + 5)
  w, total, p = o.warmup_steps, o.schedule_steps, o.poly_power
  ramp = o.lr * (o.warmup_ratio + (1 - o.warmup_ratio) * steps / w)
  poly = o.lr * np.clip(1 - steps / total, 0, 1) ** p
  np.testing.assert_allclose(
      np.asarray(s(steps)),
      np.where(steps < w, ramp, poly),
      rtol=1e-4,
      atol=1e-9,
  )


def test_frozen_bn_affine_is_untouched_and_heads_move_10x():
  c = viper_config.get_config('smoke')
  c.method = 'source_only'
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.0
  graphdef, st, tx = state_lib.create_train_state(c)
  del graphdef
  grads = jax.tree.map(jnp.ones_like, st.params)
  # One compiled update (eager would compile each op per parameter shape).
  updates, _ = jax.jit(tx.update)(grads, st.opt_state, st.params)
  bn = updates['backbone']['bn1']
  assert float(jnp.abs(bn['scale']).max()) == 0.0
  assert float(jnp.abs(bn['bias']).max()) == 0.0
  lr = float(optim.lr_schedule(c.optim)(0))
  np.testing.assert_allclose(
      updates['backbone']['conv1']['kernel'], -lr, rtol=1e-6
  )
  np.testing.assert_allclose(
      updates['head']['classifier']['kernel'], -10 * lr, rtol=1e-6
  )
  np.testing.assert_allclose(updates['sf_layer']['kernel'], -10 * lr, rtol=1e-6)
  assert optax.tree.norm(updates) > 0


def test_adaptation_phase_restarts_the_schedule():
  c = synthetic_config.get_config()
  assert c.method == 'dastc' and c.train.source_only_steps == 1200
  s = optim.lr_schedule(c.optim, optim.adaptation_start(c))
  lr = c.optim.lr
  assert float(s(0)) < 1e-8  # warm-up of the warm start
  assert float(s(1199)) < 0.01 * lr  # decayed by the end of the warm start
  assert float(s(1200)) < 1e-8  # the adaptation phase warms up again
  np.testing.assert_allclose(
      float(s(1250)), lr * (1 - 50 / 300) ** 0.9, rtol=1e-5
  )
  assert float(s(1500)) == 0.0


def test_vit_norms_get_no_weight_decay():
  """With zero gradients AdamW's update is the decay alone: -lr * wd * p
  for every parameter but the MiT LayerNorms (``optim.no_weight_decay``),
  which stay where they are."""
  c = viper_vit_config.get_config('smoke')
  assert tuple(c.optim.no_weight_decay) == ('norm',)
  c.method = 'source_only'
  c.optim.warmup_steps = 0
  _, st, tx = state_lib.create_train_state(c)
  grads = jax.tree.map(jnp.zeros_like, st.params)
  # One compiled update (eager would compile each op per parameter shape).
  updates, _ = jax.jit(tx.update)(grads, st.opt_state, st.params)
  labels = optim.param_labels(st.params, c.model.freeze_bn_affine)
  lrs = {g: float(s(0)) for g, s in optim.group_schedules(c.optim).items()}
  flat_u = jax.tree_util.tree_flatten_with_path(updates)[0]
  flat_p = jax.tree.leaves(st.params)
  flat_l = jax.tree.leaves(labels)
  exempt = 0
  for (path, u), p, g in zip(flat_u, flat_p, flat_l):
    name = optim.path_name(path)
    if 'norm' in name:
      assert name.startswith('backbone/'), name
      exempt += 1
      np.testing.assert_array_equal(u, 0.0, err_msg=name)
    else:
      np.testing.assert_allclose(
          u,
          -lrs[g] * c.optim.weight_decay * p,
          rtol=1e-5,
          atol=1e-12,
          err_msg=name,
      )
  # Patch-embedding, attention-reduction, block and stage norms (scale and
  # bias each) of the 4 stages.
  assert exempt >= 4 * 2 * 3


def test_the_initial_state_comes_with_the_same_graph_as_the_traced_build():
  """create_train_state returns the graph of the model it built (no second,
  traced build); it equals the graph of the shape-only build."""
  for c in (
      viper_config.get_config('smoke'),
      viper_vit_config.get_config('smoke'),
  ):
    c.method = 'source_only'
    graphdef, _, _ = state_lib.create_train_state(c)
    assert graphdef == state_lib.model_graphdef(c)
    assert state_lib.create_train_state(c, abstract=True)[0] == graphdef
