"""Where the MiT step's time goes: its parts, JAX against PyTorch eager.

  python -m dastc_jax.benchmarks.mit_ops --output=benchmarks/mit_ops.md

For each of the four stages of a MiT variant (default B5) at the token grid
of a given input (default 128x256, two frames: the source-only step's
encoder input), times forward + backward (gradients of the input and of
every parameter) of one block's parts, in JAX (``jax.jit``, this package's
modules and CPU settings) and in PyTorch eager (``transformers``' Segformer
modules, 2 threads), one call of each in turn:

* ``norm``: the block's LayerNorm;
* ``attention``: spatial-reduction attention (query, reduction conv +
  LayerNorm, keys/values, softmax, output projection);
* ``mix_ffn``: fc1, depthwise 3x3 conv, exact GELU, fc2;
* ``dwconv`` and ``gelu``: those two alone, at the hidden width;
* ``block``: the whole pre-norm block (both residual branches).

Each row's ms per call and the JAX / PyTorch ratio (median of the paired
per-call ratios); ``x depth`` multiplies a block's time by the stage's
depth, which is what the encoder spends there per step. ``torch``,
``transformers`` are optional benchmark dependencies (pinned in
requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dastc_jax.benchmarks import provenance
from dastc_jax.models import mit
from dastc_jax.runtime import host_malloc
from dastc_jax.runtime import xla_cpu

PARTS = ('norm', 'attention', 'mix_ffn', 'dwconv', 'gelu', 'block')


def _jax_part(part: str, dim: int, heads: int, sr: int, hidden: int):
  """The JAX module of ``part`` and its input's channel count."""
  rngs = nnx.Rngs(0)
  f32 = jnp.float32
  if part == 'norm':
    return mit._layer_norm(dim, mit.BLOCK_EPS, dtype=f32, rngs=rngs), dim  # pylint: disable=protected-access
  if part == 'attention':
    return (
        mit.Attention(dim, heads, sr, eps=mit.EMBED_EPS, dtype=f32, rngs=rngs),
        dim,
    )
  if part == 'mix_ffn':
    return mit.MixFFN(dim, hidden, dtype=f32, rngs=rngs), dim
  if part == 'dwconv':
    return mit.DWConv(hidden, dtype=f32, rngs=rngs), hidden
  if part == 'gelu':
    return None, hidden
  return mit.Block(dim, heads, sr, 4, 0.0, dtype=f32, rngs=rngs), dim


def jax_runner(part, dim, heads, sr, hidden, b, h, w) -> Callable[[], float]:
  """One jitted forward + backward of ``part`` on ``[b, h, w, C]``."""
  module, c = _jax_part(part, dim, heads, sr, hidden)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  if module is None:
    apply = lambda s, x: jax.nn.gelu(x, approximate=False)
    state = {}
  else:
    graphdef, state = nnx.split(module)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    if part == 'block':
      apply = lambda s, x: nnx.merge(graphdef, s)(x, None)
  step = jax.jit(
      jax.grad(lambda s, x: jnp.sum(apply(s, x) * g), argnums=(0, 1))
  )
  jax.block_until_ready(step(state, x))

  def one() -> float:
    t = time.perf_counter()
    jax.block_until_ready(step(state, x))
    return time.perf_counter() - t

  return one


def torch_runner(part, dim, heads, sr, hidden, b, h, w):
  """The same part in PyTorch eager (``transformers``' Segformer)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import SegformerConfig  # pylint: disable=g-import-not-at-top
  from transformers.models.segformer import modeling_segformer as sm  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(2)
  cfg = SegformerConfig(hidden_act='gelu', layer_norm_eps=mit.BLOCK_EPS)
  c = dim
  if part == 'norm':
    mod = torch.nn.LayerNorm(dim, eps=mit.BLOCK_EPS)
    fwd = lambda x: mod(x)
  elif part == 'attention':
    mod = sm.SegformerAttention(cfg, dim, heads, sr)
    fwd = lambda x: mod(x, h, w)[0]
  elif part == 'mix_ffn':
    mod = sm.SegformerMixMLP(cfg, dim, hidden_features=hidden)
    fwd = lambda x: mod(x, h, w)
  elif part == 'dwconv':
    mod, c = sm.SegformerDepthWiseConv(hidden), hidden
    fwd = lambda x: mod(x, h, w)
  elif part == 'gelu':
    mod, c = None, hidden
    fwd = lambda x: torch.nn.functional.gelu(x)
  else:
    mod = sm.SegformerLayer(cfg, dim, heads, 0.0, sr, 4)
    fwd = lambda x: mod(x, h, w)
  if mod is not None:
    mod.train()
  rng = np.random.default_rng(0)
  x = torch.tensor(
      rng.normal(size=(b, h * w, c)), dtype=torch.float32, requires_grad=True
  )
  g = torch.tensor(rng.normal(size=(b, h * w, c)), dtype=torch.float32)

  def one() -> float:
    t = time.perf_counter()
    if mod is not None:
      mod.zero_grad(set_to_none=True)
    x.grad = None
    (fwd(x) * g).sum().backward()
    return time.perf_counter() - t

  one()
  return one


def run(variant: str, hw: tuple[int, int], frames: int, reps: int):
  """Every (stage, part): medians and paired ratios."""
  spec = mit.VARIANTS[variant]
  rows = []
  for stage in range(4):
    stride = 4 * 2**stage
    h, w = hw[0] // stride, hw[1] // stride
    dim, heads, sr = spec.dims[stage], spec.heads[stage], spec.sr_ratios[stage]
    hidden = dim * spec.mlp_ratio
    for part in PARTS:
      args = (part, dim, heads, sr, hidden, frames, h, w)
      rows.append(
          {
              'stage': stage + 1,
              'depth': spec.depths[stage],
              'tokens': h * w,
              'dim': dim,
              'part': part,
              **alternate(jax_runner(*args), torch_runner(*args), reps),
          }
      )
      print(json.dumps(rows[-1]), flush=True)
  return rows


def alternate(
    jax_one: Callable[[], float], torch_one: Callable[[], float], reps: int
) -> dict[str, float]:
  """``reps`` calls of each, one of each in turn: the median ms of each and
  the median of the paired JAX / PyTorch ratios."""
  times = {'jax': [], 'torch': []}
  for _ in range(reps):
    times['jax'].append(jax_one())
    times['torch'].append(torch_one())
  ratios = [a / b for a, b in zip(times['jax'], times['torch'])]
  return {
      'jax_ms': 1e3 * statistics.median(times['jax']),
      'torch_ms': 1e3 * statistics.median(times['torch']),
      'ratio': statistics.median(ratios),
  }


def report(rows: list[dict[str, Any]], command: str, info: str) -> str:
  """The markdown table, with the per-stage block totals."""
  lines = [
      "# The MiT step's parts: JAX vs PyTorch eager",
      '',
      f'Command: `{command}`',
      '',
      info,
      '',
      '| stage (depth, tokens, width) | part | JAX ms | PyTorch ms | JAX / '
      'PyTorch (paired median) | JAX ms x depth | PyTorch ms x depth |',
      '|---|---|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
        f'| {r["stage"]} ({r["depth"]}, {r["tokens"]}, {r["dim"]}) | '
        f'{r["part"]} | {r["jax_ms"]:.2f} | {r["torch_ms"]:.2f} | '
        f'{r["ratio"]:.2f} | {r["jax_ms"] * r["depth"]:.0f} | '
        f'{r["torch_ms"] * r["depth"]:.0f} |'
    )
  blocks = [r for r in rows if r['part'] == 'block']
  tj = sum(r['jax_ms'] * r['depth'] for r in blocks)
  tt = sum(r['torch_ms'] * r['depth'] for r in blocks)
  lines += [
      '',
      f'All blocks of the encoder, forward + backward (block x depth, '
      f'summed): JAX {tj:.0f} ms, PyTorch {tt:.0f} ms, ratio {tj / tt:.2f}.',
      '',
  ]
  return '\n'.join(lines)


def setup_cpu(hw: tuple[int, int]) -> None:
  """The host allocator and XLA:CPU settings ``python -m dastc_jax.main``
  uses for a transformer at this frame size (XLA reads its flags when the
  first computation starts the backend, so call this first)."""
  host_malloc.configure(pixels=hw[0] * hw[1])
  xla_cpu.set_defaults(pixels=hw[0] * hw[1], model='daformer')


def versions() -> str:
  """CPU count, jax and torch releases, the code's commit, XLA_FLAGS."""
  import torch  # pylint: disable=g-import-not-at-top

  return (
      f'{os.cpu_count()} CPU cores; jax {jax.__version__}, torch '
      f'{torch.__version__}; code at {provenance.commit()}; XLA_FLAGS '
      f'`{os.environ.get("XLA_FLAGS", "")}`.'
  )


def save(output: str, text: str, raw: dict[str, Any]) -> None:
  """Prints ``text``, writes it to ``output`` and ``raw`` to the .json
  beside it."""
  print(text)
  with open(output, 'w') as f:
    f.write(text)
  with open(os.path.splitext(output)[0] + '.json', 'w') as f:
    json.dump(raw, f, indent=1)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', default='b5')
  p.add_argument('--size', default='128,256', help='input H,W')
  p.add_argument('--frames', type=int, default=2, help='images per call')
  p.add_argument('--reps', type=int, default=7)
  p.add_argument('--output', required=True, help='markdown report')
  a = p.parse_args(argv)
  hw = tuple(int(v) for v in a.size.split(','))
  setup_cpu(hw)
  rows = run(a.variant, hw, a.frames, a.reps)
  info = (
      f'MiT-{a.variant.upper()}, {a.frames} images of {hw[0]}x{hw[1]}, '
      f'float32, {a.reps} calls of each, alternated; {versions()}'
  )
  command = 'python -m dastc_jax.benchmarks.mit_ops ' + ' '.join(argv)
  text = report(rows, command, info)
  save(a.output, text, {'command': command, 'info': info, 'rows': rows})


if __name__ == '__main__':
  main(sys.argv[1:])
