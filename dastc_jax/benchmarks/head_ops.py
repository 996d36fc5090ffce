"""The MiT step outside the encoder blocks: the DAFormer head's parts and
the AdamW update, JAX against PyTorch eager.

  python -m dastc_jax.benchmarks.head_ops --output=benchmarks/head_ops.md

The counterpart of ``mit_ops`` (the blocks) for the rest of the source-only
step of ``benchmarks/step.py --model=vit``. At the stride-4 grid of a given
input (default 128x256, one frame: the head runs with gradients on frame t
only), times in JAX (``jax.jit``, this package's modules and CPU settings)
and in PyTorch eager (the restatement of ``tests/torch_daformer.py``, 2
threads), one call of each in turn:

* ``head``: the whole DAFormer head in training mode (embeddings, resizes,
  separable ASPP, bottleneck, dropout, classifier), forward + backward
  (gradients of its parameters and of the four encoder maps);
* ``head_forward``: the head in eval mode without gradients (the key
  frame's pass);
* ``aspp_1x1``, ``aspp_sep_d{6,12,18}``, ``bottleneck``: the fusion's
  modules alone, forward + backward, on the concatenated embeddings;
* ``adamw``: one AdamW update of every parameter of the model (the
  config's MiT variant + head), JAX's from the package's optimizer
  (``runtime/optim.py``), PyTorch's ``torch.optim.AdamW`` over tensors of
  the same shapes.

Each row's ms per call and the JAX / PyTorch ratio (median of the paired
per-call ratios). ``torch`` is an optional benchmark dependency (pinned in
requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import viper_vit as viper_vit_config
from dastc_jax.benchmarks import mit_ops
from dastc_jax.models import daformer
from dastc_jax.models import mit
from dastc_jax.runtime import state as state_lib

Runner = Callable[[], float]


def parts(dilations: tuple[int, ...]) -> tuple[str, ...]:
  """The rows, in order, for the head's ASPP ``dilations``."""
  sep = tuple(f'aspp_sep_d{d}' for d in dilations if d != 1)
  return ('head', 'head_forward', 'aspp_1x1') + sep + ('bottleneck', 'adamw')


def _timed(fn: Callable[[], Any]) -> Runner:
  def one() -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t

  one()  # compile / warm up
  return one


def _jax_module(part: str, cin: int, embed: int, dilations, classes, dims):
  rngs = nnx.Rngs(0)
  if part in ('head', 'head_forward'):
    return daformer.DAFormerHead(
        dims, classes, embed=embed, dilations=dilations, rngs=rngs
    )
  if part == 'aspp_1x1':
    return daformer.ConvModule(cin, embed, 1, dtype=None, rngs=rngs)
  if part == 'bottleneck':
    return daformer.ConvModule(
        len(dilations) * embed, embed, 3, dtype=None, rngs=rngs
    )
  d = int(part.rsplit('d', 1)[1])
  return daformer.SeparableConvModule(
      cin, embed, d, bn_group_size=0, dtype=None, rngs=rngs
  )


def jax_runner(part, feats, x, embed, dilations, classes, dims) -> Runner:
  """``part`` jitted in JAX: forward + backward (``head_forward``: eval
  forward only) on the ``feats`` maps or the fused input ``x``."""
  cin = x.shape[-1]
  module = _jax_module(part, cin, embed, dilations, classes, dims)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if part == 'head_forward':
    fwd = jax.jit(lambda p, f, r: nnx.merge(graphdef, p, r)(f, train=False)[0])
    return _timed(lambda: fwd(params, feats, rest))
  if part == 'head':
    inputs = feats
    key = jax.random.key(0)
    call = lambda m, f: m(f, train=True, dropout_key=key)[0]
  else:
    inputs = x if part != 'bottleneck' else x[..., : len(dilations) * embed]
    call = lambda m, f: m(f, True)
  out = jax.eval_shape(
      lambda p, f, r: call(nnx.merge(graphdef, p, r, copy=True), f),
      params,
      inputs,
      rest,
  )
  g = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)

  def loss(p, f, r):
    return jnp.sum(call(nnx.merge(graphdef, p, r, copy=True), f) * g)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return _timed(lambda: grad(params, inputs, rest))


def torch_runner(part, feats, x, embed, dilations, classes, dims) -> Runner:
  """The same part in PyTorch eager (``tests/torch_daformer.py``)."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_daformer  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(2)
  torch.manual_seed(0)
  nchw = lambda a: torch.tensor(
      np.asarray(a).transpose(0, 3, 1, 2).copy(), requires_grad=True
  )
  cin = x.shape[-1]
  if part in ('head', 'head_forward'):
    mod = torch_daformer.DAFormerHead(dims, classes, embed, dilations)
    inputs = [nchw(f) for f in feats]
    fwd = lambda: mod(inputs)[0]
  elif part == 'aspp_1x1':
    mod = torch_daformer.ConvModule(cin, embed, 1)
  elif part == 'bottleneck':
    mod = torch_daformer.ConvModule(len(dilations) * embed, embed, 3)
  else:
    d = int(part.rsplit('d', 1)[1])
    mod = torch_daformer.SeparableConv(cin, embed, d)
  if part not in ('head', 'head_forward'):
    width = len(dilations) * embed if part == 'bottleneck' else cin
    xin = nchw(np.asarray(x)[..., :width])
    fwd = lambda: mod(xin)
  if part == 'head_forward':
    mod.eval()

    def forward_only() -> float:
      t = time.perf_counter()
      with torch.no_grad():
        fwd()
      return time.perf_counter() - t

    forward_only()
    return forward_only
  mod.train()
  g = torch.tensor(
      np.random.default_rng(1).normal(size=tuple(fwd().shape)),
      dtype=torch.float32,
  )

  def one() -> float:
    t = time.perf_counter()
    mod.zero_grad(set_to_none=True)
    (fwd() * g).sum().backward()
    return time.perf_counter() - t

  one()
  return one


def adamw_runners(config) -> tuple[Runner, Runner, int]:
  """One AdamW update of the model's parameters: JAX (the package's
  optimizer) and PyTorch (the same shapes); and the parameter count."""
  import torch  # pylint: disable=g-import-not-at-top

  _, state, tx = state_lib.create_train_state(config)
  params = state.params
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  def apply(p, o, g):
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o

  update = jax.jit(apply, donate_argnums=(1,))
  box = {'opt': state.opt_state}

  def jax_step():
    new, box['opt'] = update(params, box['opt'], grads)
    return new

  leaves = jax.tree.leaves(params)
  tparams = [torch.nn.Parameter(torch.zeros(p.shape)) for p in leaves]
  for p in tparams:
    p.grad = torch.full(p.shape, 1e-3)
  opt = torch.optim.AdamW(
      tparams, lr=config.optim.lr, weight_decay=config.optim.weight_decay
  )

  def torch_step() -> float:
    t = time.perf_counter()
    opt.step()
    return time.perf_counter() - t

  torch_step()
  return _timed(jax_step), torch_step, sum(p.size for p in leaves)


def run(variant: str, hw: tuple[int, int], reps: int, classes: int):
  """Every row: medians and paired ratios."""
  c = viper_vit_config.get_config()
  c.model.mit_variant = variant
  c.model.num_classes = classes
  c.mesh.data = 1
  c.method = 'source_only'
  spec = mit.VARIANTS[variant]
  embed = c.model.head_features
  dilations = tuple(c.model.daformer_dilations)
  rng = np.random.default_rng(0)
  feats = [
      jnp.asarray(
          rng.normal(size=(1, hw[0] // s, hw[1] // s, d)), jnp.float32
      )  # [1, H/s, W/s, C_i]
      for s, d in zip((4, 8, 16, 32), spec.dims)
  ]
  x = jnp.asarray(
      rng.normal(size=(1, hw[0] // 4, hw[1] // 4, len(spec.dims) * embed)),
      jnp.float32,
  )  # the concatenated embeddings, [1, H/4, W/4, 4 * embed]
  rows = []
  for part in parts(dilations):
    if part == 'adamw':
      jax_one, torch_one, n = adamw_runners(c)
      note = f'{n / 1e6:.1f}M parameters'
    else:
      args = (part, feats, x, embed, dilations, classes, spec.dims)
      jax_one, torch_one = jax_runner(*args), torch_runner(*args)
      note = ''
    rows.append(
        {
            'part': part,
            'note': note,
            **mit_ops.alternate(jax_one, torch_one, reps),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def report(rows: list[dict[str, Any]], command: str, info: str) -> str:
  """The markdown table."""
  lines = [
      '# The MiT step outside the blocks: JAX vs PyTorch eager',
      '',
      f'Command: `{command}`',
      '',
      info,
      '',
      '| part | JAX ms | PyTorch ms | JAX / PyTorch (paired median) |',
      '|---|---:|---:|---:|',
  ]
  for r in rows:
    name = f'{r["part"]} ({r["note"]})' if r['note'] else r['part']
    lines.append(
        f'| {name} | {r["jax_ms"]:.1f} | {r["torch_ms"]:.1f} | '
        f'{r["ratio"]:.2f} |'
    )
  by = {r['part']: r for r in rows}
  fused = [
      r
      for r in rows
      if r['part'].startswith('aspp') or r['part'] == 'bottleneck'
  ]
  if 'head' in by and fused:
    rest = lambda k: by['head'][k] - sum(r[k] for r in fused)
    lines += [
        '',
        'The head minus its fusion modules timed alone (embeddings, '
        'resizes, concatenations, dropout, classifier, and whatever the '
        f'whole program adds): JAX {rest("jax_ms"):.0f} ms, PyTorch '
        f'{rest("torch_ms"):.0f} ms.',
    ]
  lines.append('')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', default='b5')
  p.add_argument('--size', default='128,256', help='input H,W')
  p.add_argument('--classes', type=int, default=15)
  p.add_argument('--reps', type=int, default=7)
  p.add_argument('--output', required=True, help='markdown report')
  a = p.parse_args(argv)
  hw = tuple(int(v) for v in a.size.split(','))
  mit_ops.setup_cpu(hw)
  rows = run(a.variant, hw, a.reps, a.classes)
  info = (
      f'MiT-{a.variant.upper()} feature maps of one {hw[0]}x{hw[1]} image, '
      f'{a.classes} classes, float32, {a.reps} calls of each, alternated; '
      f'{mit_ops.versions()}'
  )
  command = 'python -m dastc_jax.benchmarks.head_ops ' + ' '.join(argv)
  text = report(rows, command, info)
  mit_ops.save(a.output, text, {'command': command, 'info': info, 'rows': rows})


if __name__ == '__main__':
  main(sys.argv[1:])
