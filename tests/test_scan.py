"""``model.scan_blocks``: identical blocks as one scan give the unrolled
network's values (loss, gradients, BatchNorm statistics), with and without
remat, for the ResNet and the MiT encoder (drop-path keys and rates per
block)."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dastc_jax.models import mit
from tests import test_models


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
        x, y, rtol=1e-4, atol=1e-5 * max(np.abs(x).max(), 1e-6)
    )


def test_resnet_stage_scan_equals_the_unrolled_loop():
  x = jax.random.normal(jax.random.key(0), (2, 2, 33, 41, 3))
  flow = jax.random.normal(jax.random.key(1), (2, 33, 41, 2))
  outs = {}
  for scan, remat in ((False, False), (True, False), (True, True)):
    cfg = test_models._cfg(
        layers=(1, 2, 3, 1),
        remat=remat,  # pylint: disable=protected-access
        scan_blocks=scan,
    )
    g, p, s = test_models._split(cfg)  # pylint: disable=protected-access

    def loss(p, s, g=g):
      m = nnx.merge(g, p, s)
      out = m.clip(x, flow, train=True, rng=jax.random.key(3))
      stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
      return jnp.sum(jnp.tanh(out['pred']) ** 2), stats

    outs[scan, remat] = jax.jit(jax.value_and_grad(loss, has_aux=True))(p, s)
  ref = outs[False, False]
  for key in ((True, False), (True, True)):
    (value, stats), grad = outs[key]
    np.testing.assert_allclose(value, ref[0][0], rtol=1e-6)
    _close(ref[0][1], stats)  # running averages of every block moved alike
    _close(ref[1], grad)
  # The scanned program does not grow with the depth of a stage (the
  # unrolled one grows by a copy per block): lowered train-step gradients
  # of layer3 with 3 and 9 blocks.
  lines = {}
  for scan in (False, True):
    for depth in (3, 9):
      cfg = test_models._cfg(layers=(1, 1, depth, 1), scan_blocks=scan)  # pylint: disable=protected-access
      g, p, s = test_models._split(cfg)  # pylint: disable=protected-access
      f = jax.jit(
          jax.grad(
              lambda p, s, g=g: jnp.sum(
                  nnx.merge(g, p, s).clip(
                      x, flow, train=True, rng=jax.random.key(3)
                  )['pred']
                  ** 2
              )
          )
      )
      lines[scan, depth] = f.lower(p, s).as_text().count('\n')
  grow = {k: lines[k, 9] - lines[k, 3] for k in (False, True)}
  assert grow[True] < grow[False] / 5, lines


def test_mit_stage_scan_equals_the_unrolled_loop():
  spec = mit.VARIANTS['b0']  # 2 blocks per stage
  x = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)

  def build(scan, recompute=True):
    return nnx.eval_shape(
        lambda: mit.MiT(
            spec,
            drop_path_rate=0.3,
            scan_blocks=scan,
            scan_recompute=recompute,
            rngs=nnx.Rngs(0),
        )
    )

  # True: scanned, body recomputed; 'keep': scanned, activations kept.
  graphdefs = {
      False: nnx.split(build(False))[0],
      True: nnx.split(build(True))[0],
      'keep': nnx.split(build(True, recompute=False))[0],
  }
  state = jax.tree.map(
      lambda v: jnp.asarray(
          np.random.default_rng(v.size).normal(0, 0.2, v.shape), np.float32
      ),
      nnx.split(build(False))[1],
  )

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def run(state, scan, remat, rng):
    def loss(st):
      m = nnx.merge(graphdefs[scan], st)
      m.remat = remat
      return sum(jnp.sum(jnp.tanh(v) ** 2) for v in m(x, rng=rng).values())

    return jax.value_and_grad(loss)(state)

  key = jax.random.key(4)
  ref = run(state, False, False, key)
  # Each scanned program compiled once (ahead of time, for its memory
  # analysis too).
  compiled = {
      s: run.lower(state, s, False, key).compile() for s in (True, 'keep')
  }
  for scan in (True, 'keep'):
    got = compiled[scan](state, key)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    _close(ref[1], got[1])
  # Keeping the activations costs memory: the compiled gradient's
  # temporaries (the recomputing scan keeps only each block's input;
  # measured 13.3 MB against 14.1 MB at this size, two blocks per stage).
  temp = {
      s: c.memory_analysis().temp_size_in_bytes for s, c in compiled.items()
  }
  assert temp['keep'] > temp[True] + 2**19, temp
  # Drop path is live (another key, another loss) in the scan too.
  assert (
      abs(float(compiled[True](state, jax.random.key(5))[0]) - float(ref[0]))
      > 1e-3
  )


def test_scan_min_blocks_picks_the_stages_to_scan():
  """``model.scan_min_blocks``: only runs of at least that many identical
  blocks become a scan (one ``while`` loop each in the program); shorter
  stages run unrolled. MiT-B0 has 2 blocks per stage."""
  x = jnp.zeros((1, 32, 48, 3))

  def loops(min_blocks):
    model = mit.MiT(
        mit.VARIANTS['b0'],
        scan_blocks=True,
        scan_min_blocks=min_blocks,
        rngs=nnx.Rngs(0),
    )
    graphdef, state = nnx.split(model)
    text = jax.jit(lambda st: nnx.merge(graphdef, st)(x)).lower(state).as_text()
    return text.count('stablehlo.while')

  assert loops(2) == 4 and loops(3) == 0
