"""Identical blocks run as one ``lax.scan``: one compiled body, not N.

A stage of identical blocks (ResNet-101's layer3 has 22 after its first
block, MiT-B5's third stage 40) unrolled into the train step makes XLA
compile every copy of every pass separately; the DA-STC step runs the
backbone in several passes, so the program grows to hundreds of thousands of
lines and compiles for many minutes at the real configs' sizes
(benchmarks/memory.md). :func:`scan_blocks` keeps the parameters where they
are (one entry per block, so checkpoints and converted weights do not
change): it stacks the blocks' states inside the step, scans one merged
block over them, and writes the updated BatchNorm statistics back. The
arithmetic is the same as the unrolled loop.

By default (``model.scan_recompute``) the scanned body is recomputed in the
backward pass (``jax.checkpoint``, as ``model.remat`` does): a scan keeps
every residual of every iteration stacked, and XLA cannot drop or fuse them
across iterations as it does in an unrolled loop. Measured on the DA-STC
steps at their real sizes (benchmarks/memory.md): without the recomputation
the VIPER CNN step needed 35.8 GB where the unrolled step needs 24.0 GB, and
the transformer step 117 GB where the recomputing scan needed 42.3 GB (both
transformer figures before the depthwise convolutions' backward pass kept
one copy of their input instead of nine; the recomputing scan now needs
16.9 GB). The recomputation is what makes the transformer's scanned step
slow on the CPU (benchmarks/step_vit.md), so it can be turned off where
memory allows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def scan_blocks(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    apply: Callable[[nnx.Module, jax.Array, Any], jax.Array],
    per_block: Any = None,
    recompute: bool = True,
) -> jax.Array:
  """``x`` through ``blocks`` in order, as one scan over their states.

  Args:
    blocks: modules of one structure (the same parameter shapes and static
      attributes that ``apply`` reads).
    x: the first block's input; every block maps it to the same shape.
    apply: ``apply(block, x, per_block_i) -> x``.
    per_block: a pytree whose leaves have a leading axis of
      ``len(blocks)`` (e.g. random keys, drop-path rates), or None.
    recompute: recompute the body in the backward pass (``jax.checkpoint``)
      instead of keeping every iteration's activations.

  Returns:
    The last block's output. The blocks' ``nnx.BatchStat`` variables hold
    their updated values afterwards (as after the unrolled loop).
  """
  graphdef, _ = nnx.split(blocks[0])
  states = [nnx.split(b)[1] for b in blocks]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)

  def body(carry, inputs):
    state, extra = inputs
    block = nnx.merge(graphdef, state)
    y = apply(block, carry, extra)
    return y, nnx.state(block, nnx.BatchStat)

  if recompute:
    body = jax.checkpoint(body)
  x, stats = jax.lax.scan(body, x, (stacked, per_block))
  for i, block in enumerate(blocks):
    nnx.update(block, jax.tree.map(lambda a, i=i: a[i], stats))
  return x
